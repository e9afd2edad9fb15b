"""Config schema and loader: every malformed config stops with one ConfigError naming key, YAML line and fix."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ftlab.config import DATASET_TYPES, RL_METHODS, Config, DatasetConfig, check_supported, load_config
from ftlab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BAD = sorted(CONFIGS.glob("bad_*.yaml"))
EXAMPLES = sorted((ROOT / "ftlab" / "assets" / "configs").glob("*.yaml"))
MINIMAL = "base_model: ftlab:tiny\ndatasets:\n  - path: ftlab:data/chat.jsonl\n    type: chat_template\n"


def expectations(path: Path):
    "Each fixture starts with `# expect: KEY @ LINE ~ TEXT` lines (`-` for no key), one per problem."
    out = []
    for line in path.read_text().splitlines():
        m = re.match(r"#\s*expect:\s*(\S+)\s*@\s*(\d+)\s*~\s*(.+)$", line)
        if m: out.append((None if m[1] == "-" else m[1], int(m[2]), m[3].strip()))
    return out


def errors_of(source, *args, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        load_config(source, *args, **kw)
    return ei.value


# --- malformed configs ---------------------------------------------------------------------------------------------

def test_enough_bad_fixtures():
    assert len(BAD) >= 20
    assert all(expectations(p) for p in BAD), [p.name for p in BAD if not expectations(p)]


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_bad_config(path):
    expected = expectations(path)
    err = errors_of(path)                       # a ConfigError, not a pydantic / yaml exception
    assert len(err.problems) == len(expected), f"expected {len(expected)} problem(s), got:\n{err}"
    for key, line, text in expected:
        hits = [p for p in err.problems if p.key == key and p.line == line and text in p.message]
        assert hits, f"no problem with key={key} line={line} containing {text!r} in:\n{err}"
        shown = str(hits[0])
        assert f"line {line}" in shown and (key is None or f"key `{key}`" in shown)
        assert hits[0].source == str(path)     # the file is named
        assert hits[0].fix, f"no fix for {shown}"
    assert "Traceback" not in str(err)


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_bad_config_as_text_has_same_lines(path):
    "The same YAML given as text (a notebook cell) points at the same lines, without a file name."
    err = errors_of(path.read_text())
    assert sorted((p.key, p.line) for p in err.problems) == sorted((k, l) for k, l, _ in expectations(path))
    assert all(p.source is None for p in err.problems)


def test_sample_message_verbatim():
    err = errors_of(CONFIGS / "bad_wrong_type_int.yaml")
    assert str(err) == (f"{CONFIGS / 'bad_wrong_type_int.yaml'}, line 4, key `lora_r`: expected a whole number, "
                        "got 'sixteen'\n  fix: write e.g. `lora_r: 8`")


def test_many_problems_reported_in_one_go_sorted_by_line():
    err = errors_of(CONFIGS / "bad_many_problems.yaml")
    assert str(err).startswith("6 problems:")
    lines = [p.line for p in err.problems]
    assert lines == sorted(lines)


@pytest.mark.parametrize("text, key, line, hint", [
    (MINIMAL + "lora_rr: 8\n", "lora_rr", 5, "did you mean `lora_r`?"),
    (MINIMAL + "learnig_rate: 0.1\n", "learnig_rate", 5, "did you mean `learning_rate`?"),
    (MINIMAL + "gradient_acumulation_steps: 2\n", "gradient_acumulation_steps", 5, "did you mean `gradient_accumulation_steps`?"),
    (MINIMAL + "    feild: text\n", "datasets[0].feild", 5, "did you mean `field`?"),
    (MINIMAL + "    roles_to_trian: [assistant]\n", "datasets[0].roles_to_trian", 5, "did you mean `roles_to_train`?"),
    (MINIMAL + "trl:\n  temprature: 0.7\n", "trl.temprature", 6, "did you mean `temperature`?"),
    (MINIMAL + "ebft:\n  feature_layer: [0.5]\n", "ebft.feature_layer", 6, "did you mean `feature_layers`?"),
    (MINIMAL + "vllm:\n  gpu_memory: 0.5\n", "vllm.gpu_memory", 6, "did you mean `gpu_memory_utilization`?"),
    (MINIMAL + "num_generations: 4\n", "num_generations", 5, "belongs under `trl:`"),
    (MINIMAL + "    sequence_len: 512\n", "datasets[0].sequence_len", 5, "is a top-level key"),
    (MINIMAL + "stirct: false\n", "stirct", 5, "did you mean `strict`?"),
    (MINIMAL + "lr_scheduler: cosin\n", "lr_scheduler", 5, "did you mean `cosine`?"),
    (MINIMAL + "optimizer: AdamW_Torch\n", "optimizer", 5, "did you mean `adamw_torch`?"),
    (MINIMAL + "    ds_type: jsonl\n", "datasets[0].ds_type", 5, "did you mean `json`?"),
])
def test_did_you_mean(text, key, line, hint):
    err = errors_of(text)
    assert len(err.problems) == 1, str(err)
    p = err.problems[0]
    assert (p.key, p.line) == (key, line) and hint in p.message and p.fix


def test_yaml_errors_never_escape():
    bad_texts = ["base_model: [unclosed\n", "a: 'open\n", "a: *undefined\n", "--- a: 1\n--- b: 2\n",
                 "a: !!python/object:os.system ls\n", "{1: [}\n", "a:\n  - b\n  c: d\n", "when: 2024-13-45\n",
                 "\x00\x01", "? [a, b]\n: c\n", "base_model: x\nbase_model: y\n"]
    for text in bad_texts:
        with pytest.raises(ConfigError):
            load_config(text)


def test_weird_values_only_raise_config_error():
    "Replace each value of a realistic config with odd values: the loader accepts or raises ConfigError, nothing else."
    base = yaml.safe_load((CONFIGS / "axolotl_lora_1b.yaml").read_text())
    garbage = ["x", -1, 0, 1.5, [1, {}], {"a": None}, True, "", 10**30, float("nan")]
    for key in list(base) + ["trl", "ebft", "vllm", "rl"]:
        for g in garbage:
            d = dict(base, **{key: g})
            try: load_config(d)
            except ConfigError as e: assert e.problems and all(p.message for p in e.problems)
    for g in garbage:   # inside a dataset entry too
        for key in ("path", "type", "split", "message_property_mappings", "roles", "shards", "train_on_eos"):
            d = dict(base, datasets=[dict(base["datasets"][0], **{key: g})])
            try: load_config(d)
            except ConfigError: pass


def test_unsupported_source_type():
    err = errors_of(42)
    assert "YAML text, a path to a .yaml file or a dict" in str(err)


def test_missing_file():
    err = errors_of("no/such/config.yaml")
    assert "config file not found" in str(err) and err.problems[0].fix


# --- what loads ----------------------------------------------------------------------------------------------------

def test_axolotl_lora_example_as_written():
    cfg = load_config(CONFIGS / "axolotl_lora_1b.yaml")
    assert cfg.method == "sft" and cfg.adapter == "lora" and cfg.lora_r == 16 and cfg.lora_alpha == 32
    assert cfg.sample_packing and cfg.pad_to_sequence_len and cfg.flash_attention
    assert cfg.val_set_size == 0.05 and cfg.bf16 == "auto" and cfg.tf32 is False and cfg.fp16 is None
    assert cfg.optimizer == "adamw_8bit" and cfg.lr_scheduler == "cosine" and cfg.learning_rate == 2e-4
    assert cfg.special_tokens.pad_token == "<|end_of_text|>" and cfg.wandb_project is None
    ds = cfg.datasets[0]
    assert ds.type == "chat_template" and ds.field_messages == "messages"
    assert ds.roles == {"user": ["user"], "assistant": ["assistant"]} and ds.property_mappings == {"role": "role", "content": "content"}
    assert cfg.effective_batch_size == 4 and cfg.quantization is None
    assert any(n.startswith("`strict` is an axolotl setting ftlab does not need") for n in cfg.notes)
    assert cfg.source_name == str(CONFIGS / "axolotl_lora_1b.yaml")


def test_axolotl_qlora_example_as_written():
    cfg = load_config(CONFIGS / "axolotl_qlora_1b.yaml")
    assert cfg.adapter == "qlora" and cfg.load_in_4bit and cfg.quantization == "4bit"
    assert cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant is True   # from bnb_config_kwargs
    ds = cfg.datasets[0]
    assert ds.split == "train[:20%]" and ds.message_property_mappings == {"role": "from", "content": "value"}
    assert ds.message_field_role is None   # folded into message_property_mappings
    assert any("evals_per_epoch" in n and "nothing will be evaluated" in n for n in cfg.notes)
    assert "message_field_role" not in cfg.to_yaml() and "role: from" in cfg.to_yaml()


@pytest.mark.parametrize("path", EXAMPLES + [CONFIGS / "axolotl_lora_1b.yaml", CONFIGS / "axolotl_qlora_1b.yaml"],
                         ids=lambda p: p.stem)
def test_round_trip(path):
    cfg = load_config(path)
    text = cfg.to_yaml()
    again = load_config(text)
    assert again == cfg and again.to_yaml() == text
    assert load_config(cfg.to_dict()) == cfg
    assert "notes" not in cfg.to_dict() and "source_name" not in cfg.to_dict()


def test_to_yaml_keeps_only_set_keys_in_order():
    cfg = load_config("base_model: ftlab:tiny\nstrict: false\nlora_r:\ndatasets:\n  - path: d.jsonl\n    type: alpaca\n")
    assert cfg.to_yaml() == "base_model: ftlab:tiny\nstrict: false\ndatasets:\n- path: d.jsonl\n  type: alpaca\n"
    assert cfg.to_dict()["lora_r"] == 8    # the full dict has defaults


def test_examples():
    names = {p.name for p in EXAMPLES}
    assert {"tiny-lora.yaml", "tiny-qlora.yaml", "tiny-full.yaml"} <= names
    lora = load_config(ROOT / "ftlab" / "assets" / "configs" / "tiny-lora.yaml")
    assert lora.base_model == "ftlab:tiny" and lora.adapter == "lora" and lora.sequence_len == 256
    assert lora.micro_batch_size == 8 and lora.logging_steps == 1 and lora.output_dir == "./outputs/tiny-lora"
    assert lora.datasets[0].path == "ftlab:data/chat.jsonl" and lora.datasets[0].type == "chat_template"
    assert 1e-3 <= lora.learning_rate <= 5e-3 and (lora.max_steps or 0) <= 200
    qlora = load_config(ROOT / "ftlab" / "assets" / "configs" / "tiny-qlora.yaml")
    assert qlora.adapter == "qlora" and qlora.quantization == "4bit"
    full = load_config(ROOT / "ftlab" / "assets" / "configs" / "tiny-full.yaml")
    assert full.adapter is None and full.quantization is None
    for p in EXAMPLES: assert load_config(p).notes == [], (p, load_config(p).notes)


def test_sources(tmp_path):
    f = tmp_path / "c.yml"
    f.write_text(MINIMAL)
    a, b, c, d = load_config(f), load_config(str(f)), load_config(MINIMAL), load_config(yaml.safe_load(MINIMAL))
    assert a == b == c == d
    assert a.source_name == str(f) and c.source_name is None
    e = load_config("c.yml", base_dir=tmp_path)
    assert e == a and e.base_dir == tmp_path and e.resolve_path("data/x.jsonl") == tmp_path / "data/x.jsonl"
    assert load_config(MINIMAL, name="cell [3]").source_name == "cell [3]"
    err = errors_of(MINIMAL + "lora_r: x\n", name="cell [3]")
    assert str(err).startswith("cell [3], line 5")


def test_overrides():
    cfg = load_config(MINIMAL, ["lora_r=4", "trl.beta=0.1", "datasets.0.type=alpaca", "datasets[1].path=@rows",
                                "learning_rate=1e-3", "lora_target_modules=[q_proj, v_proj]", "adapter=lora"])
    assert cfg.lora_r == 4 and cfg.trl.beta == 0.1 and cfg.datasets[0].type == "alpaca"
    assert cfg.datasets[1].path == "@rows" and cfg.learning_rate == 1e-3
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    cfg = load_config(MINIMAL, {"trl": {"beta": 0.2}, "micro_batch_size": 4, "datasets.0.split": "train[:10%]"})
    assert cfg.trl.beta == 0.2 and cfg.micro_batch_size == 4 and cfg.datasets[0].split == "train[:10%]"
    assert "micro_batch_size: 4" in cfg.to_yaml()
    assert load_config(MINIMAL + "wandb_project: p\n", ["wandb_project="]).wandb_project is None


def test_override_problems_say_from_set():
    err = errors_of(MINIMAL, ["lora_r=sixteen", "lora_rr=3", "datasets.5.type=alpaca", "nonsense"])
    assert len(err.problems) == 4, str(err)
    by_source = {p.source: p for p in err.problems}
    assert by_source["from --set lora_r=sixteen"].message == "expected a whole number, got 'sixteen'"
    assert "did you mean `lora_r`?" in by_source["from --set lora_rr=3"].message
    assert "out of range" in by_source["from --set datasets.5.type=alpaca"].message
    assert all(p.line is None for p in err.problems) and "from --set" in str(err)


def test_override_fixes_a_bad_file_value(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(MINIMAL + "lora_r: sixteen\n")
    assert load_config(f, ["lora_r=16"]).lora_r == 16


# --- notes, support and derived values ------------------------------------------------------------------------------

def test_notes():
    cfg = load_config(MINIMAL + "strict: false\nis_llama_derived_model: true\nlora_r: 32\nmax_steps: 5\nnum_epochs: 2\n"
                      "trl:\n  temperature: 0.9\nxformers_attention: true\ndeepspeed:\nsequence_parallel_degree: 1\n"
                      "gradient_checkpointing: unsloth\n")
    text = "\n".join(cfg.notes)
    for needle in ["`strict` is an axolotl setting ftlab does not need", "`is_llama_derived_model`",
                   "`lora_r` is set but `adapter` is not", "max_steps: 5 takes precedence", "`trl:` keys (temperature)",
                   "served by PyTorch SDPA"]:
        assert needle in text, (needle, cfg.notes)
    assert cfg.offload_activations and "gradient_checkpointing" not in text   # axolotl's offloading variant: supported
    assert "deepspeed" not in text and "sequence_parallel" not in text   # empty / neutral: silently fine
    assert cfg.notes[0].endswith("(line 5)")
    assert load_config(MINIMAL).notes == []


def test_dataset_without_type_is_a_note():
    cfg = load_config("base_model: ftlab:tiny\ndatasets: [{path: ftlab:data/chat.jsonl}]")
    assert cfg.datasets[0].type is None and "has no `type`" in cfg.notes[0]


def test_support_check_is_separate(monkeypatch):
    from ftlab.methods import METHODS
    monkeypatch.delitem(METHODS, "ebft")            # a method the registry does not hold
    text = MINIMAL.replace("base_model: ftlab:tiny\n", "base_model: ftlab:tiny\nrl: ebft\n")
    err = errors_of(text)
    assert str(err) == ("line 2, key `rl`: `rl: ebft` is not supported yet in this version of ftlab (it runs: dpo, gdpo, "
                        "grpo, ipo, kto, orpo, process_reward_model, reward_model, sft, simpo)\n"
                        "  fix: remove `rl:` to train with supervised fine-tuning, or run this config with axolotl for now")
    cfg = load_config(text, check_support=False)
    assert cfg.method == "ebft"
    with pytest.raises(ConfigError) as ei: check_supported(cfg)
    assert ei.value.problems[0].line == 2
    check_supported(load_config(MINIMAL))   # nothing to report
    monkeypatch.undo()                      # a registered method's `limits` are part of the support check too
    def not_yet(cfg, found):
        if cfg.ebft is not None and cfg.ebft.use_whitening:
            found.error(("ebft", "use_whitening"), "`ebft.use_whitening` is not supported yet", "remove it")
    monkeypatch.setattr(METHODS["ebft"], "limits", (not_yet,))
    limited = text + "micro_batch_size: 4\ntrl: {num_generations: 4}\nebft:\n  use_whitening: true\n"
    assert [(p.key, p.line) for p in errors_of(limited).problems] == [("ebft.use_whitening", 9)]
    assert load_config(limited, check_support=False).ebft.use_whitening


def test_unsupported_names_and_plugins():
    err = errors_of(MINIMAL + "optimizer: ao_adamw_8bit\nlr_scheduler: one_cycle\nplugins:\n"
                    "  - axolotl.integrations.liger.LigerPlugin\n  - axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin\n"
                    "  - axolotl.integrations.spectrum.SpectrumPlugin\n")
    assert [p.key for p in err.problems] == ["optimizer", "lr_scheduler", "plugins[2]"]
    assert "SpectrumPlugin` (Spectrum's choice of layers to train) is not supported yet" in err.problems[2].message
    cfg = load_config(MINIMAL + "plugins: [axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin]\ncut_cross_entropy: true\n")
    assert sum("chunked LM head" in n for n in cfg.notes) == 2   # the plugin and the key: never a silent no-op
    cfg = load_config(MINIMAL + "plugins: [axolotl.integrations.liger.LigerPlugin]\nliger_rms_norm: true\n")
    assert any("LigerPlugin" in n for n in cfg.notes) and cfg.liger_rms_norm is True
    err = errors_of(MINIMAL.replace("type: chat_template", "type: sharegpt"))
    assert err.problems[0].key == "datasets[0].type" and "chat_template" in err.problems[0].fix


def test_method_constants():
    from ftlab.methods import METHODS
    assert RL_METHODS >= {"dpo", "ipo", "kto", "orpo", "simpo", "grpo", "ebft"}
    # which methods run, and which pack, are facts of the method registry
    assert set(METHODS) == {"sft", "dpo", "ipo", "kto", "orpo", "simpo", "reward_model", "process_reward_model", "grpo", "gdpo",
                            "ebft"}
    assert {m for m, e in METHODS.items() if not e.packing} == RL_METHODS | {"reward_model", "process_reward_model"}
    assert DATASET_TYPES >= {"chat_template", "alpaca", "input_output", "completion", "chat_template.default",
                             "bradley_terry.chat_template", "stepwise_supervised", "passthrough"}


def test_generation_methods_schema():
    text = ("base_model: Qwen/Qwen2.5-0.5B-Instruct\nrl: ebft\nebft:\n  mode: strided\n  stride: 8\n  use_whitening: true\n"
            "trl:\n  num_generations: 4\n  max_completion_length: 256\n  use_vllm: true\n  vllm_mode: server\n"
            "  scale_rewards: true\n  generation_kwargs: {stop_token_ids: [151645]}\n"
            "vllm:\n  gpu_memory_utilization: 0.5\n  max_model_len: 1024\n"
            "datasets:\n  - path: nvidia/OpenCodeInstruct\n    type: ebft_strided_structured.transform\n    split: train[:1%]\n"
            "micro_batch_size: 4\nflex_attention: true\ngradient_checkpointing: true\n"
            "gradient_checkpointing_kwargs: {use_reentrant: true}\n")
    cfg = load_config(text, check_support=False)
    assert cfg.method == "ebft" and cfg.ebft.mode == "strided" and cfg.ebft.feature_layers == [0.25, 0.5, 0.75]
    assert cfg.trl.vllm_mode == "server" and cfg.vllm.max_model_len == 1024 and cfg.vllm.port == 8000
    load_config(text.replace("micro_batch_size: 4", "micro_batch_size: 3"), check_support=False)  # strided: no trl groups
    structured = text.replace("  mode: strided\n", "").replace("ebft_strided_structured.transform", "ebft_opencode.transform")
    err = errors_of(structured.replace("micro_batch_size: 4", "micro_batch_size: 3"))
    assert {p.key for p in err.problems} == {"trl.num_generations"}    # the group check, on EBFT's registry entry
    assert any("only apply to `mode: strided`" in n for n in load_config(structured).notes)
    grpo = text.replace("rl: ebft", "rl: grpo").replace("  use_vllm: true", "  reward_funcs: [\"@r\"]\n  use_vllm: true")
    err = errors_of(grpo.replace("micro_batch_size: 4", "micro_batch_size: 3"), check_support=False)
    assert "trl.num_generations" in {p.key for p in err.problems}


def test_resolved_dtype():
    def dt(extra, cuda, bf16ok): return load_config(MINIMAL + extra).resolved_dtype(cuda_available=cuda, bf16_supported=bf16ok)
    assert dt("bf16: auto\n", False, False) == "float32"
    assert dt("bf16: auto\n", True, True) == "bfloat16"
    assert dt("bf16: auto\n", True, False) == "float16"       # older GPU: axolotl's fp16 fallback
    assert dt("bf16: auto\nfp16: false\n", True, False) == "float32"
    assert dt("", False, False) == "float32"                   # default is auto
    assert dt("fp16: true\nbf16: false\n", True, True) == "float16"
    assert dt("fp16: true\nbf16: false\n", False, False) == "float32"
    assert dt("bf16: true\n", False, False) == "bfloat16"
    assert dt("bf16: false\n", True, True) == "float32"


def test_derived_values():
    cfg = load_config(MINIMAL + "micro_batch_size: 4\ngradient_accumulation_steps: 8\nadapter: qlora\nload_in_4bit: true\n"
                      "sdp_attention: true\nval_set_size: 200\n")
    assert cfg.effective_batch_size == 32 and cfg.quantization == "4bit" and cfg.attention_implementation == "sdpa"
    assert cfg.method == "sft" and cfg.has_eval_data and cfg.val_set_size == 200
    assert load_config(MINIMAL + "load_in_8bit: true\nadapter: lora\n").quantization == "8bit"
    assert load_config(MINIMAL + "reward_model: true\n", check_support=False).method == "reward_model"
    prm = MINIMAL.replace("type: chat_template", "type: stepwise_supervised") + "process_reward_model: true\n"
    assert load_config(prm).method == "process_reward_model"


def test_require_datasets_false():
    assert load_config("base_model: ftlab:tiny\nadapter: lora\n", require_datasets=False).datasets is None


def test_one_mistake_one_problem():
    "A type error in a key that a cross-key check reads is reported once, not again by the check."
    err = errors_of(MINIMAL + "adapter: qlora\nload_in_4bit: yes please\n")
    assert [p.key for p in err.problems] == ["load_in_4bit"]
    err = errors_of(MINIMAL + "warmup_steps: ten\nwarmup_ratio: 0.1\n")
    assert [p.key for p in err.problems] == ["warmup_steps"]


def test_direct_construction_refuses_unknown_keys():
    with pytest.raises(Exception) as ei:
        Config(base_model="x", lora_rr=3)
    assert "lora_rr" in str(ei.value)
    assert DatasetConfig(path="x", type="@fn").type == "@fn"


def test_validating_imports_nothing_heavy():
    """Checking a config, method facts included, loads none of the training stack (what that costs in seconds is
    measured in bench/, not asserted here)."""
    code = ("import sys; from ftlab.config import load_config; "
            "load_config('base_model: ftlab:tiny\\nrl: dpo\\ndatasets: [{path: ftlab:data/preference.jsonl, type: chat_template}]'); "
            "heavy = [m for m in ('torch', 'transformers', 'datasets', 'trl', 'peft', 'IPython', 'plotly') if m in sys.modules]; "
            "assert 'ftlab.methods.preference' in sys.modules and not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT / "tests")
    assert out.returncode == 0, out.stderr


def test_things_that_work_are_not_forbidden():
    cfg = load_config(
        "base_model: ./models/my-llama\nadapter: qlora\nload_in_4bit: true\npeft_use_dora: true\n"   # DoRA on 4-bit: PEFT supports it
        "lora_target_modules: all-linear\nlearning_rate: 2e-4\nval_set_size: 100\nresume_from_checkpoint: true\n"
        "gradient_checkpointing: true\ngradient_checkpointing_kwargs: {use_reentrant: true}\ntorch_compile: auto\n"
        "datasets:\n  - path: \"@rows\"\n    type: mymodule.transform\n  - path: tatsu-lab/alpaca\n    type: \"@to_messages\"\n"
        "    split: train[10:20%]\n  - path: data/\n    ds_type: parquet\n    data_files: [a.parquet, b.parquet]\n    type: completion\n"
        "    field: body\n")
    assert cfg.peft_use_dora and cfg.lora_target_modules == "all-linear" and cfg.learning_rate == 2e-4
    assert cfg.val_set_size == 100 and cfg.resume_from_checkpoint is True and cfg.torch_compile == "auto"
    assert [d.type for d in cfg.datasets] == ["mymodule.transform", "@to_messages", "completion"]
    assert cfg.datasets[2].data_files == ["a.parquet", "b.parquet"] and cfg.notes == []
    assert load_config(MINIMAL + "adapter: lora\nload_in_8bit: true\n").quantization == "8bit"


# --- the cross-checks: one function per concern ----------------------------------------------------------------------

CONCERNS = [   # (concern, a config it reports on: a fixture file or YAML text, the key it reports, error or note)
    ("check_data", "bad_test_datasets_and_val.yaml", "val_set_size", "error"),
    ("check_stream", "bad_pretraining_no_max_steps.yaml", "pretraining_dataset", "error"),
    ("check_stream", MINIMAL + "pretrain_multipack_attn: false\n", "pretrain_multipack_attn", "note"),
    ("check_method", "bad_packing_with_rl.yaml", "sample_packing", "error"),
    ("check_method", "bad_rl_and_reward_model.yaml", "reward_model", "error"),
    ("check_method", "bad_reward_weights.yaml", "trl.reward_weights", "error"),   # GRPO's own check, on its registry entry
    ("check_generation", MINIMAL + "trl:\n  temperature: 0.9\n", "trl", "note"),
    ("check_ebft", MINIMAL + "ebft:\n  use_whitening: true\n", "ebft", "note"),
    ("check_adapter", "bad_qlora_without_4bit.yaml", "adapter", "error"),
    ("check_precision", "bad_two_attentions.yaml", "sdp_attention", "error"),
    ("check_schedule", "bad_warmup_both.yaml", "warmup_ratio", "error"),
    ("check_schedule", "bad_eval_strategy_no_eval.yaml", "eval_strategy", "error"),
    ("check_kernels", MINIMAL + "tiled_mlp_num_shards: 4\n", "tiled_mlp_num_shards", "note"),
    ("check_trackers", MINIMAL + "plugins: [axolotl.integrations.liger.LigerPlugin]\n", "plugins[0]", "note"),
    ("check_method", "bad_ebft_strided_compile.yaml", "torch_compile", "error"),   # strided EBFT's check, on its entry
    ("check_parallel", "bad_fsdp_version_1.yaml", "fsdp_version", "error"),
    ("check_parallel", MINIMAL + "fsdp_config:\n  offload_params: true\n", "fsdp_config", "note"),
    ("check_runnable", "bad_unsupported_sequence_parallel.yaml", "sequence_parallel_degree", "error"),
]


def test_one_check_function_per_concern():
    import ftlab.config.checks as checks
    names = [c.__name__ for c in checks.CHECKS]
    assert names == ["check_data", "check_stream", "check_method", "check_generation", "check_ebft", "check_adapter", "check_precision",
                     "check_schedule", "check_kernels", "check_trackers", "check_parallel"]
    assert not hasattr(checks, "_cross_checks") and {c for c, *_ in CONCERNS} == set(names) | {"check_runnable"}
    import ftlab.config as config
    for gone in ("SUPPORTED_METHODS", "PACKING_FORBIDDEN", "GENERATION_METHODS", "METHOD_DATA", "DATA_KIND_NAMES"):
        assert not hasattr(config, gone), gone   # method facts live on the registry's entries


@pytest.mark.parametrize("concern, source, key, kind", CONCERNS, ids=lambda x: x if isinstance(x, str) and x.startswith("check") else None)
def test_each_concern_fires(concern, source, key, kind):
    "Each concern, run alone on a config validated by the schema only, reports its problem; loading reports it too."
    import ftlab.config.checks as checks
    text = (CONFIGS / source).read_text() if source.endswith(".yaml") else source
    cfg = Config.model_validate(yaml.safe_load(text))
    found = checks.Found()
    getattr(checks, concern)(cfg, found)
    from ftlab.config import key_text
    reported = {key_text(p): msg for p, msg, *_ in (found.errors if kind == "error" else found.notes)}
    assert key in reported, (found.errors, found.notes)
    if kind == "error":
        assert key in {p.key for p in errors_of(text).problems}   # (loading adds the lines of the other keys)
    else:
        assert any(n.startswith(reported[key]) for n in load_config(text).notes)
