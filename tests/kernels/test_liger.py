"""Liger-Kernel from the config: `use_liger_kernel` and axolotl's `liger_*` flags reach the trainer."""
import json, subprocess, sys

import pytest
import torch

from ftlab.config import load_config
from ftlab.methods import liger_kernel_config, training_args

BASE = "base_model: ftlab:tiny\ndatasets: [{path: ftlab:data/chat.jsonl}]\n"


def test_flags_map_to_liger_kernel_config():
    assert liger_kernel_config(load_config(BASE)) is None
    assert "use_liger_kernel" not in training_args(load_config(BASE), 10, False)
    # Liger's own defaults, without its fused linear cross-entropy (TRL's chunked LM head computes the loss)
    assert liger_kernel_config(load_config(BASE + "use_liger_kernel: true\n")) == {"fused_linear_cross_entropy": False}
    cfg = load_config(BASE + "plugins: [axolotl.integrations.liger.LigerPlugin]\nliger_rms_norm: true\n"
                      "liger_glu_activation: false\nliger_rope: true\nliger_fused_linear_cross_entropy: true\n")
    # as in axolotl: the flags not written stay off
    assert liger_kernel_config(cfg) == {"rms_norm": True, "swiglu": False, "geglu": False, "rope": True,
                                        "layer_norm": False, "cross_entropy": False,
                                        "fused_linear_cross_entropy": False}
    # every name is one of Liger's: transformers drops unknown ones silently, so a misspelt name would do nothing
    import inspect
    import liger_kernel.transformers.monkey_patch as mp
    liger_names = set().union(*(inspect.signature(f).parameters for n, f in vars(mp).items()
                                if n.startswith("apply_liger_kernel_to_") and callable(f)))
    assert set(liger_kernel_config(cfg)) <= liger_names, set(liger_kernel_config(cfg)) - liger_names
    assert any("liger_fused_linear_cross_entropy" in n and "line 7" in n for n in cfg.notes)
    import ftlab.model
    from ftlab.methods.kernel_choice import choose_kernels
    if not ftlab.model.device_info()["cuda"]:   # Liger's Triton kernels cannot run on a CPU: off, and said
        assert "use_liger_kernel" not in training_args(cfg, 10, False)
        assert "need a CUDA GPU" in choose_kernels(cfg, "llama", cuda=False).notes[0]
    real = ftlab.model.device_info
    ftlab.model.device_info = lambda: dict(real(), cuda=True)
    try: args = training_args(cfg, 10, False)
    finally: ftlab.model.device_info = real
    assert args["use_liger_kernel"] is True and args["liger_kernel_config"]["rms_norm"] is True
    # every method builds its TRL config from `training_args`, so DPO gets the same
    assert liger_kernel_config(load_config(BASE + "rl: dpo\ndpo_use_liger_kernel: true\n")) is not None


GPU_RUN = """
import json, sys
from ftlab.config import load_config
from ftlab.run import Run
run = Run(load_config(sys.argv[1]))
run.train()
layer = run.trainer.model.get_base_model().model.layers[0]
where = lambda f: getattr(getattr(f, "__func__", f), "__module__", "")
print("RESULT", json.dumps([run.state, where(layer.input_layernorm.forward), where(layer.mlp.forward)]))
"""


@pytest.mark.gpu   # Liger's Triton kernels need a GPU
def test_gpu_training_applies_the_flags(tmp_path):
    """On the GPU: `liger_rms_norm: true` with `liger_glu_activation: false` puts Liger's RMSNorm in, not its SwiGLU.
    In a process of its own: Liger patches transformers' Llama module for the whole process."""
    cfg = (f"base_model: ftlab:tiny\noutput_dir: {tmp_path / 'out'}\n"
           "datasets: [{path: ftlab:data/chat.jsonl, type: chat_template}]\nadapter: lora\nlora_target_linear: true\n"
           "max_steps: 2\nsave_steps: 100\nliger_rms_norm: true\nliger_glu_activation: false\n")
    p = subprocess.run([sys.executable, "-c", GPU_RUN, cfg], capture_output=True, text=True)
    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, p.stderr[-3000:]
    state, norm, mlp = json.loads(line[len("RESULT "):])
    assert state == "finished" and norm.startswith("liger_kernel") and mlp.startswith("transformers"), (norm, mlp)


def test_liger_keys_without_the_package_are_one_clear_error(monkeypatch):
    import importlib.util
    from ftlab.errors import ConfigError
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a))
    for key in ("use_liger_kernel", "liger_rms_norm", "tiled_mlp"):
        with pytest.raises(ConfigError) as e:
            load_config(BASE + f"{key}: true\n")
        assert key in str(e.value) and "pip install liger-kernel" in str(e.value) and "line 3" in str(e.value)
