"""Every key axolotl's schema defines is known to ftlab, handled one way; did-you-mean only for misspellings."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ftlab.config import Config, DatasetConfig, EBFTConfig, FSDPConfig, SpecialTokens, TRLConfig, VLLMConfig, load_config
from ftlab.config.known import AXOLOTL_KEYS, axolotl_keys
from ftlab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
import os
# an axolotl checkout (or bare clone) to regenerate the key table from, e.g. AXOLOTL_CHECKOUT=~/src/axolotl
MIRROR = Path(os.environ.get("AXOLOTL_CHECKOUT") or "/nonexistent").expanduser()
SECTIONS = {"top": Config, "dataset": DatasetConfig, "trl": TRLConfig, "vllm": VLLMConfig, "ebft": EBFTConfig,
            "special_tokens": SpecialTokens, "fsdp_config": FSDPConfig}
MINIMAL = "base_model: ftlab:tiny\ndatasets:\n  - path: ftlab:data/chat.jsonl\n    type: chat_template\n"


def answers(cls, key) -> list[str]:
    "Every way `cls` handles `key` (exactly one is right)."
    out = []
    if key in cls.model_fields: out.append("field")
    if key in cls.ALIASES: out.append("alias")
    if key in cls.IGNORED or any(key.startswith(p) for p in cls.IGNORED_PREFIXES): out.append("ignored")
    if key in cls.UNSUPPORTED or any(key.startswith(p) for p in cls.UNSUPPORTED_PREFIXES): out.append("unsupported")
    return out


@pytest.mark.parametrize("section", list(SECTIONS))
def test_every_axolotl_key_is_handled_exactly_one_way(section):
    cls, keys = SECTIONS[section], axolotl_keys(section)
    assert keys, section
    wrong = {k: answers(cls, k) for k in keys if len(answers(cls, k)) != 1}
    assert not wrong, wrong                                  # none unknown, none handled two ways
    for k in keys:
        kind = cls.key_kind(k)
        assert kind in ("field", "alias", "ignored", "unsupported"), k
        if kind == "ignored": assert cls.ignored_reason(k), k
        if kind == "unsupported": assert cls.unsupported_fix(k), k
        if kind == "alias": assert cls.ALIASES[k] in cls.model_fields or cls.key_kind(cls.ALIASES[k]), k


def test_table_has_both_levels_and_the_plugins():
    assert len(axolotl_keys()) > 400 and len(axolotl_keys("dataset")) > 40
    assert axolotl_keys()["cut_cross_entropy"] == "plugin cut_cross_entropy" and axolotl_keys()["lora_r"] == "peft.LoraConfig"
    assert "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin" in AXOLOTL_KEYS["plugins"]


@pytest.mark.skipif(not MIRROR.exists(), reason="set AXOLOTL_CHECKOUT to an axolotl checkout to regenerate the table from")
def test_table_matches_the_script(tmp_path):
    out = tmp_path / "keys.json"
    subprocess.run([sys.executable, str(ROOT / "scripts/axolotl_keys.py"), str(MIRROR), "--out", str(out)], check=True,
                   capture_output=True)
    assert json.loads(out.read_text()) == AXOLOTL_KEYS


def problems(text):
    with pytest.raises(ConfigError) as e: load_config(text)
    return e.value.problems


@pytest.mark.parametrize("key", ["peft_config", "torch_dtype", "ebft_beta", "wandb_key", "fp32"])
def test_no_suggestion_that_changes_the_meaning(key):
    p = problems(MINIMAL + f"{key}: 1\n")
    assert len(p) == 1 and "did you mean" not in p[0].message, p[0].message


@pytest.mark.parametrize("key,near", [("context_parapllel_size", "context_parallel_size"), ("lora_targt_modules", "lora_target_modules"),
                                      ("Learning_Rate", "learning_rate"), ("micro_batchsize", "micro_batch_size")])
def test_misspellings_get_the_key(key, near):
    assert f"did you mean `{near}`?" in problems(MINIMAL + f"{key}: 1\n")[0].message


def test_real_keys_are_known_not_unknown():
    cfg = load_config(MINIMAL + "experimental_skip_move_to_device: true\ntokenizer_use_mistral_common: true\n"
                      "ddp_find_unused_parameters: false\ndpo_beta: 0.2\nevals_per_epoch: 0\n")
    assert cfg.rl_beta == 0.2 and cfg.evals_per_epoch == 0
    assert any("experimental_skip_move_to_device" in n and "ignored" in n for n in cfg.notes)
    assert any("other name of `rl_beta`" in n for n in cfg.notes)


def test_left_out_features_are_refused_alone_with_the_reason():
    p = problems(MINIMAL + "sequence_parallel_degree: 2\ncontext_parallel_size: 2\nddp_timeout: 100\n")
    assert [x.key for x in p] == ["sequence_parallel_degree", "context_parallel_size"]
    assert all(x.message.endswith("not supported yet in this version of ftlab: multi-GPU keys") for x in p)
    p = problems(MINIMAL + "processor_type: AutoProcessor\nimage_size: 224\n")
    assert {x.message.split(": ", 1)[1] for x in p} == {"multimodal models"}
    p = problems(MINIMAL + "quantize_moe_experts: true\n")
    assert p[0].message.endswith("MoE expert kernels and quantization")
    p = problems(MINIMAL + "plugins: [axolotl.integrations.kd.KDPlugin]\nkd_alpha: 0.5\n")
    assert [x.key for x in p] == ["plugins[0]"] and "knowledge distillation" in p[0].message


@pytest.mark.parametrize("value,auto", [("LlamaForCausalLM", "AutoModelForCausalLM"), ("MistralForCausalLM", "AutoModelForCausalLM"),
                                        ("GPTNeoXForCausalLM", "AutoModelForCausalLM"), ("AutoModelForCausalLM", "AutoModelForCausalLM")])
def test_model_type_class_names(value, auto):
    cfg = load_config(MINIMAL + f"model_type: {value}\n")
    assert cfg.auto_class == auto and cfg.model_type == value


def test_model_type_not_text_only_is_refused():
    assert "multimodal models" in problems(MINIMAL + "model_type: Llama4ForConditionalGeneration\n")[0].message
    assert "mamba-ssm" in problems(MINIMAL + "model_type: MambaLMHeadModel\n")[0].message
    assert "neither a transformers auto class" in problems(MINIMAL + "model_type: Llama\n")[0].message


def test_batch_size_sets_accumulation():
    cfg = load_config(MINIMAL + "batch_size: 16\nmicro_batch_size: 4\n")
    assert cfg.gradient_accumulation_steps == 4 and cfg.effective_batch_size == 16
    assert load_config(cfg.to_yaml()) == cfg
    assert problems(MINIMAL + "batch_size: 16\nmicro_batch_size: 4\ngradient_accumulation_steps: 2\n")[0].key == "batch_size"


def test_cosine_keys_become_a_schedule():
    from ftlab.methods.common import lr_lambda, schedule_args
    cfg = load_config(MINIMAL + "cosine_min_lr_ratio: 0.1\n")
    assert schedule_args(cfg)["lr_scheduler_type"] == "cosine_with_min_lr" and lr_lambda(cfg) is None
    cfg = load_config(MINIMAL + "cosine_min_lr_ratio: 0.1\ncosine_constant_lr_ratio: 0.8\n")
    assert schedule_args(cfg)["lr_scheduler_type"] == "cosine" and lr_lambda(cfg) is not None
    assert lr_lambda(load_config(MINIMAL + "lr_quadratic_warmup: true\n"))(5, 10, 100) == 0.25
    assert problems(MINIMAL + "unfrozen_parameters: ['[']\n")[0].key == "unfrozen_parameters[0]"
