"""Which kernels a run uses: the config's `true` / `false`, or automatic from the architecture and the machine; the
plan and the run's notes say it."""
import pytest
import torch

from ftlab.config import load_config
from ftlab.methods.kernel_choice import choose_kernels

LORA = "base_model: ftlab:tiny\ndatasets: [{path: ftlab:data/chat.jsonl}]\nadapter: lora\n"
ALL = ("qkv", "o", "mlp")


@pytest.mark.parametrize("extra, arch, cuda, installed, lora, liger, said", [
    ("", "llama", True, True, ALL, True, []),                                    # the default on a GPU
    ("", "qwen2", True, True, ALL, True, []),
    ("", "llama", False, True, (), False, []),                                   # no GPU: off, nothing said
    ("", "gpt2", False, True, (), False, []),
    ("", "gpt2", True, True, (), False, ["fused LoRA projections are off", "Liger's layer kernels are off"]),
    ("", "llama", True, False, ALL, False, ["pip install liger-kernel"]),
    ("lora_dropout: 0.1\n", "llama", True, True, (), True, ["off: lora_dropout 0.1"]),
    ("load_in_8bit: true\n", "llama", True, True, (), True, ["off: 8-bit base weights"]),
    ("lora_qkv_kernel: false\nuse_liger_kernel: false\n", "llama", True, True, ("o", "mlp"), False, []),
    ("lora_qkv_kernel: false\nlora_o_kernel: false\nlora_mlp_kernel: false\n", "gpt2", True, True, (), False,
     ["Liger's layer kernels are off"]),                                         # explicit false: nothing said about it
    ("lora_mlp_kernel: true\nuse_liger_kernel: true\n", "gpt2", True, True, ("mlp",), True,
     ["`lora_mlp_kernel: true` on a `gpt2` model", "`use_liger_kernel` on a `gpt2` model"]),
    ("lora_mlp_kernel: true\n", "llama", False, True, ("mlp",), False, []),      # plain PyTorch: runs on a CPU when asked
    ("use_liger_kernel: true\n", "llama", False, True, ALL[:0], False, ["need a CUDA GPU"]),
    ("lora_dropout: 0.1\nlora_qkv_kernel: true\n", "llama", True, True, ("qkv",), True,
     ["`lora_qkv_kernel: true` with lora_dropout 0.1"]),
    ("liger_rms_norm: true\n", "llama", True, True, ALL, True, []),               # axolotl's flags are explicit too
])
def test_choice(extra, arch, cuda, installed, lora, liger, said):
    cfg = load_config(LORA + extra)
    c = choose_kernels(cfg, arch, cuda, liger_installed=installed)
    assert (c.lora, c.liger) == (lora, liger), c
    assert len(c.notes) == len(said) and all(s in n for s, n in zip(said, c.notes)), c.notes
    built = c.apply(cfg)
    for g, key in (("qkv", "lora_qkv_kernel"), ("o", "lora_o_kernel"), ("mlp", "lora_mlp_kernel")):
        assert bool(getattr(built, key)) == (g in lora) and (getattr(cfg, key) is None) == (key in c.settings)


def test_full_fine_tuning_has_no_lora_kernels():
    full = load_config(LORA.replace("adapter: lora\n", ""))
    c = choose_kernels(full, "llama", True, liger_installed=True)
    assert c.lora == () and c.liger and not c.notes
    c = choose_kernels(load_config(LORA.replace("adapter: lora\n", "lora_o_kernel: true\n")), "llama", True, liger_installed=True)
    assert c.lora == () and "does nothing in full fine-tuning" in c.notes[0]


STREAM = "pretraining_dataset: [{path: ftlab:data/completion.jsonl}]\nsample_packing: true\nsequence_len: 128\n"


@pytest.mark.parametrize("streamed", [False, True], ids=["datasets", "pretraining_dataset"])
def test_a_run_with_the_defaults_says_which_kernels_ran(tmp_path, streamed):
    """One LoRA step on the tiny Llama with no kernel key: on a CPU nothing is fused and nothing said; on a GPU both run.
    A streamed run's trainer is the one built with the kernels chosen, and its checkpoint has the stream's position."""
    from ftlab.kernels.lora import fused_lora_summary
    from ftlab.run import Run
    from ftlab.stream import STATE_FILE
    data = STREAM if streamed else "datasets: [{path: ftlab:data/chat.jsonl, type: chat_template}]\n"
    cfg = load_config(LORA.replace("datasets: [{path: ftlab:data/chat.jsonl}]\n", data) + f"output_dir: {tmp_path / 'out'}\n"
                      "lora_target_linear: true\nmax_steps: 1\nsave_steps: 1\nmicro_batch_size: 2\n")
    run = Run(cfg).train()
    assert run.state == "finished" and (tmp_path / "out" / "checkpoint-1" / STATE_FILE).exists() == streamed
    notes = [r["message"] for r in run.records if r["event"] == "note"]
    kernel_notes = [n for n in notes if "LoRA" in n or "Liger" in n]
    patched = fused_lora_summary(run.trainer.model)["patched"]
    if torch.cuda.is_available():
        assert len(patched) == 28 and any(n.startswith("fused LoRA kernels on 28 projections") for n in kernel_notes)
        assert any(n.startswith("Liger's layer kernels on") for n in kernel_notes) == run.trainer.args.use_liger_kernel
    else:
        assert patched == [] and kernel_notes == [] and not run.trainer.args.use_liger_kernel
    from ftlab.plan import make_plan
    row = dict(make_plan(cfg, run.prepare()).rows())["kernels"]
    assert row == ("none (no CUDA GPU)" if not torch.cuda.is_available() else "ftlab's fused LoRA projections (qkv, o, mlp)"
                   + (" · Liger's layer kernels" if run.trainer.args.use_liger_kernel else ""))
    assert cfg.lora_qkv_kernel is None      # the run's own config stays automatic
