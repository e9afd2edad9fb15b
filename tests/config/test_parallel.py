"""Several processes in config terms: `deepspeed`, `fsdp_version` / `fsdp_config` / `fsdp`, `ddp_*` validate in every
form axolotl writes them and become the right training arguments; the combinations that do not run are one message
each, naming the key and its line."""
import json
from pathlib import Path

import pytest

import ftlab.config.parallel_checks as parallel_checks
from ftlab.config import load_config
from ftlab.config.parallel import deepspeed_installed, deepspeed_presets, read_deepspeed, strategy
from ftlab.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MINIMAL = "base_model: ftlab:tiny\ndatasets:\n  - path: ftlab:data/chat.jsonl\n    type: chat_template\n"


@pytest.fixture
def with_deepspeed(monkeypatch):
    "The checks as where the deepspeed package is installed (it is not a dependency; scripts/test_deepspeed.sh installs it)."
    monkeypatch.setattr(parallel_checks, "deepspeed_installed", lambda: True)


def problems(text, **kw):
    with pytest.raises(ConfigError) as e: load_config(text, **kw)
    return e.value.problems


def args(cfg, fsdp_here=True):
    from ftlab.methods.common import parallel_args
    return parallel_args(cfg, fsdp_here)


# --- DeepSpeed: presets, axolotl's paths, files, mappings ------------------------------------------------------------

@pytest.mark.parametrize("value", ["zero3_bf16", "zero3_bf16.json", "ftlab:deepspeed/zero3_bf16.json",
                                   "deepspeed_configs/zero3_bf16.json", "../axolotl/deepspeed_configs/zero3_bf16.json"])
def test_deepspeed_presets_by_every_name(value, with_deepspeed, tmp_path):
    cfg = load_config(MINIMAL + f"deepspeed: {value}\n", base_dir=tmp_path)
    ds = args(cfg)["deepspeed"]
    shipped = json.loads((Path(parallel_checks.__file__).parents[1] / "assets/deepspeed/zero3_bf16.json").read_text())
    assert ds == shipped and ds["train_micro_batch_size_per_gpu"] == "auto"   # transformers fills the "auto" values
    said = [n for n in cfg.notes if "read as ftlab's preset `zero3_bf16`" in n]
    assert len(said) == ("deepspeed_configs/" in value)


def test_the_presets_are_axolotls_and_say_what_they_shard():
    assert set(deepspeed_presets()) == {"zero1", "zero1_torch_compile", "zero2", "zero2_torch_compile", "zero2_no_offload",
                                        "zero3", "zero3_bf16", "zero3_bf16_cpuoffload_all", "zero3_bf16_cpuoffload_params"}
    words = {p: read_deepspeed(p).words for p in ("zero1", "zero2", "zero2_no_offload", "zero3", "zero3_bf16_cpuoffload_params")}
    assert words == {"zero1": "DeepSpeed ZeRO-1", "zero2": "DeepSpeed ZeRO-2 (optimizer state offloaded to CPU)",
                     "zero2_no_offload": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3",
                     "zero3_bf16_cpuoffload_params": "DeepSpeed ZeRO-3 (weights offloaded to CPU)"}


def test_deepspeed_file_of_ones_own_wins_over_the_preset(with_deepspeed, tmp_path):
    mine = tmp_path / "deepspeed_configs" / "zero2.json"
    mine.parent.mkdir()
    mine.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": "auto"}))
    cfg = load_config(MINIMAL + "deepspeed: deepspeed_configs/zero2.json\n", base_dir=tmp_path)
    assert args(cfg)["deepspeed"]["zero_optimization"] == {"stage": 1} and not any("preset" in n for n in cfg.notes)


def test_deepspeed_as_a_mapping_zero3_gathers_the_final_weights(with_deepspeed):
    cfg = load_config(MINIMAL + "deepspeed:\n  zero_optimization:\n    stage: 3\n  gradient_clipping: auto\n")
    assert args(cfg)["deepspeed"] == {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
                                      "gradient_clipping": "auto"}
    assert cfg.deepspeed == {"zero_optimization": {"stage": 3}, "gradient_clipping": "auto"}   # the config is as written


def test_the_axolotl_deepspeed_example_validates(with_deepspeed):
    cfg = load_config(CONFIGS / "axolotl_qlora_zero2_jamba.yaml")
    assert args(cfg)["deepspeed"]["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert strategy(cfg, 2, cuda=True, launched=True).name == "DeepSpeed ZeRO-2 (optimizer state offloaded to CPU)"


# --- FSDP2: fsdp_config in both spellings, the older fsdp: list ------------------------------------------------------

def plugin_args(cfg) -> dict:
    "What transformers makes of the config's FSDP arguments: the keyword arguments of Accelerate's FSDP plugin."
    from transformers import TrainingArguments
    return TrainingArguments(output_dir="/tmp/unused", use_cpu=True, report_to=[], **args(cfg)).fsdp_plugin_args


def test_axolotl_fsdp1_era_example_runs_as_fsdp2():
    cfg = load_config(CONFIGS / "axolotl_qlora_fsdp_70b.yaml")
    p = plugin_args(cfg)
    assert p["fsdp_version"] == 2 and p["cpu_offload"] is True and p["reshard_after_forward"] is True
    assert p["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer" and p["state_dict_type"] == "FULL_STATE_DICT"
    assert p["cpu_ram_efficient_loading"] is True and p["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    notes = "\n".join(cfg.notes)
    assert "fsdp_limit_all_gathers, fsdp_sync_module_states, fsdp_offload_params" in notes   # one note for the prefix
    assert "axolotl would run FSDP1 here; ftlab runs FSDP2" in notes and "`fsdp:` (axolotl's older list)" in notes
    assert "`fsdp_config.use_orig_params` is an axolotl setting ftlab does not need (an FSDP1 setting" in notes


def test_axolotl_fsdp2_example_uses_fsdps_checkpointing_not_the_trainers():
    cfg = load_config(CONFIGS / "axolotl_qlora_fsdp2_27b.yaml")
    p = plugin_args(cfg)
    assert p["activation_checkpointing"] is True and p["transformer_cls_names_to_wrap"] == "Qwen3_5DecoderLayer"
    assert cfg.gradient_checkpointing and any("FSDP's own is used and the trainer's is off" in n for n in cfg.notes)
    from ftlab.methods.common import trainer_checkpointing
    assert not trainer_checkpointing(cfg, fsdp_here=True)    # transformers refuses both at once
    assert trainer_checkpointing(cfg, fsdp_here=False)       # on a CPU (DDP) the trainer's does the job


def test_fsdp_offload_and_shard_grad_op_as_the_legacy_list():
    cfg = load_config(MINIMAL + "fsdp: shard_grad_op offload auto_wrap\nfsdp_version: 2\n")
    p = plugin_args(cfg)
    assert p["reshard_after_forward"] is False and p["cpu_offload"] is True


def test_fsdp_asked_on_a_machine_that_cannot_shard_passes_nothing_and_says_why():
    cfg = load_config(MINIMAL + "fsdp_version: 2\nfsdp_config:\n  offload_params: true\nddp_timeout: 900\n")
    assert args(cfg, fsdp_here=False) == {"ddp_timeout": 900, "ddp_find_unused_parameters": False}   # DDP's own default
    s = strategy(cfg, 2, cuda=False, launched=True)
    assert s.name == "DDP" and "on a machine without one Accelerate trains with DDP (gloo): nothing is sharded" in s.note


def test_ddp_keys_map_by_name():
    cfg = load_config(MINIMAL + "ddp_timeout: 600\nddp_bucket_cap_mb: 50\nddp_broadcast_buffers: false\n"
                                "ddp_find_unused_parameters: true\n")
    assert args(cfg) == {"ddp_timeout": 600, "ddp_bucket_cap_mb": 50, "ddp_broadcast_buffers": False,
                         "ddp_find_unused_parameters": True}


def test_ddp_does_not_search_for_unused_parameters_unless_asked():
    "As in axolotl: off where DDP runs (transformers would turn it on for every PEFT model); nothing passed for FSDP or DeepSpeed."
    assert args(load_config(MINIMAL)) == {"ddp_find_unused_parameters": False}
    assert args(load_config(MINIMAL + "ddp_find_unused_parameters: false\n")) == {"ddp_find_unused_parameters": False}
    fsdp = load_config(MINIMAL + "fsdp_version: 2\nfsdp_config:\n  offload_params: true\n")
    assert "ddp_find_unused_parameters" not in args(fsdp, fsdp_here=True)
    from ftlab.config import Config
    assert "ddp_find_unused_parameters" not in args(Config(base_model="ftlab:tiny", deepspeed="zero3"), fsdp_here=False)


# --- what does not run: one message each ---------------------------------------------------------------------------

BAD = [
    ("deepspeed: zero2\nfsdp_version: 2\nfsdp_config:\n  offload_params: true\n", "deepspeed", 5,
     "deepspeed and fsdp_config (line 7) both choose how the model is sharded"),
    ("fsdp_version: 1\nfsdp_config:\n  offload_params: true\n", "fsdp_version", 5,
     "`fsdp_version: 1` asks for FSDP1, and ftlab runs FSDP2"),
    ("fsdp_version: 2\nfsdp_config:\n  fsdp_version: 1\n", "fsdp_config.fsdp_version", 7,
     "fsdp_config.fsdp_version: 1 disagrees with fsdp_version (line 5): 2"),
    ("fsdp: [full_shard, hybrid_shard]\nfsdp_version: 2\n", "fsdp[1]", 5, "fsdp: hybrid_shard is an FSDP1 sharding strategy"),
    ("fsdp_version: 2\nfsdp_config:\n  auto_wrap_policy: SIZE_BASED_WRAP\n", "fsdp_config.auto_wrap_policy", 7,
     "`auto_wrap_policy: SIZE_BASED_WRAP` needs `min_num_params`"),
    ("adapter: qlora\nload_in_4bit: true\ndeepspeed: zero3\n", "load_in_4bit", 6,
     "DeepSpeed ZeRO-3 (preset `zero3`, deepspeed (line 7)) cannot partition a model loaded with `load_in_4bit: true`"),
    ("adapter: lora\nload_in_8bit: true\nfsdp_version: 2\nfsdp_config: {}\n", "load_in_8bit", 6,
     "FSDP2 (fsdp_config (line 8)) cannot shard 8-bit (LLM.int8) weights"),
    ("deepspeed: zero9\n", "deepspeed", 5, "DeepSpeed config `zero9` does not exist"),
    ("deepspeed: broken.json\n", "deepspeed", 5, "DeepSpeed config `broken.json` is not valid JSON: Expecting ',' delimiter at line 1"),
    ("deepspeed:\n  zero_optimization: {stage: 2}\n  gradient_accumulation_steps: 8\n", "deepspeed", 5,
     "the mapping under `deepspeed:` sets `gradient_accumulation_steps: 8` but gradient_accumulation_steps is 1"),
]


@pytest.mark.parametrize("extra, key, line, message", BAD, ids=[b[1] + ":" + b[3][:30] for b in BAD])
def test_what_does_not_run_is_one_message(extra, key, line, message, with_deepspeed, tmp_path):
    (tmp_path / "broken.json").write_text('{"zero_optimization": {"stage": 2} "bf16": {}}')
    p = problems(MINIMAL + extra, base_dir=tmp_path)
    assert len(p) == 1, "\n".join(map(str, p))
    assert (p[0].key, p[0].line) == (key, line) and p[0].message.startswith(message), str(p[0])
    assert p[0].fix


def test_preference_methods_with_a_4bit_model_under_fsdp2():
    p = problems("base_model: ftlab:tiny\nrl: dpo\nadapter: qlora\nload_in_4bit: true\nfsdp_version: 2\nfsdp_config: {}\n"
                 "datasets:\n  - path: ftlab:data/preference.jsonl\n    type: chat_template\n")
    assert [x.key for x in p] == ["load_in_4bit"] and "does not run `rl: dpo`" in p[0].message and "zero2" in p[0].fix


def test_qlora_under_fsdp2_and_reference_models_under_zero3_run(with_deepspeed):
    cfg = load_config(MINIMAL + "adapter: qlora\nload_in_4bit: true\nfsdp_version: 2\nfsdp_config: {}\n")
    assert args(cfg)["fsdp_config"] == {"version": 2}
    dpo = load_config("base_model: ftlab:tiny\nrl: dpo\ndeepspeed: zero3\n"
                      "datasets:\n  - path: ftlab:data/preference.jsonl\n    type: chat_template\n")
    assert args(dpo)["deepspeed"]["zero_optimization"]["stage"] == 3


def test_deepspeed_not_installed_is_one_message(monkeypatch):
    monkeypatch.setattr(parallel_checks, "deepspeed_installed", lambda: False)
    p = problems(MINIMAL + "deepspeed: zero2\n")
    assert len(p) == 1 and p[0].key == "deepspeed" and p[0].line == 5
    assert p[0].message == "`deepspeed` asks for DeepSpeed ZeRO, and the deepspeed package is not installed"
    assert "`pip install deepspeed`" in p[0].fix and "DS_BUILD_OPS=0" in p[0].fix
    assert deepspeed_installed() is (__import__("importlib").util.find_spec("deepspeed") is not None)


def test_fsdp_keys_at_the_top_level_belong_under_fsdp_config():
    p = problems(MINIMAL + "fsdp_offload_params: true\n")
    assert p[0].message == "unknown key `fsdp_offload_params` — `fsdp_offload_params` belongs under `fsdp_config:`"
