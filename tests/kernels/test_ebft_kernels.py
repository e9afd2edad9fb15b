"""Strided EBFT's fused kernels (`ftlab.kernels.ebft`) against their PyTorch references: each kernel alone
(ebft_kernel_checks.py), and a whole strided step with the kernels equal to the plain step on the same batch.
On CPU under Triton's interpreter, which must be on before Triton is imported, so each check runs in a process of
its own; the `gpu` tests run the same checks compiled on the GPU."""
import os, subprocess, sys
from pathlib import Path

import pytest

from run_helpers import ROOT, checkout_env

HERE = Path(__file__).parent
STRIDED = (ROOT / "tests" / "configs" / "ebft_strided_text.yaml").read_text()

STEP = r"""
import sys, torch
from ftlab.config import load_config
from ftlab.run import Run
device, text = sys.argv[1], open(sys.argv[2]).read()
run = Run(load_config(text)).train(max_steps=1)
trainer = run.trainer
model = trainer.accelerator.unwrap_model(trainer.model).eval()   # no dropout, no checkpointing
assert next(model.parameters()).device.type == device
batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
batch = {k: v.to(device) for k, v in batch.items()}
e = trainer.ebft
from ftlab.methods.ebft_strided import plan_anchors
anchors, _, valid = plan_anchors(batch["lengths"], batch["prompt_lengths"].tolist(), batch["input_ids"].shape[1], e, device)
R, n, B, G = len(batch["input_ids"]), e.n_samples_per_prompt, len(anchors), e.generate_max_len
blocks = torch.randint(4, model.config.vocab_size, (R * n, B, G), generator=torch.Generator().manual_seed(3)).to(device)
trainer.rollouts = lambda *a: blocks
params = [p for p in model.parameters() if p.requires_grad]
import ftlab.kernels.ebft as K
calls = []
for name in ("head_logprobs", "feature_rewards", "reinforce_loss"):
    def counted(*a, _f=getattr(K, name), _n=name, **k):
        calls.append(_n); return _f(*a, **k)
    setattr(K, name, counted)
out = {}
for fused in (False, True):
    trainer.fused = fused
    loss = trainer.compute_loss(model, batch)
    grads = [torch.zeros_like(p) if g is None else g for p, g in
             zip(params, torch.autograd.grad(loss, params, allow_unused=True))]
    out[fused] = (loss.detach(), grads)
    print("LOSS", fused, float(loss), flush=True)
(l0, g0), (l1, g1) = out[False], out[True]
assert sorted(set(calls)) == ["feature_rewards", "head_logprobs", "reinforce_loss"], calls   # the fused step used them
tol = 2e-2 if next(model.parameters()).dtype == torch.bfloat16 else 1e-4
assert abs(float(l0) - float(l1)) <= tol * max(1.0, abs(float(l0))), (float(l0), float(l1))
worst = max(float((a - b).abs().max() / max(b.abs().max(), 1e-6)) for a, b in zip(g1, g0))
assert worst <= (5e-2 if tol > 1e-3 else 1e-3), worst
assert any(float(g.abs().max()) > 0 for g in g0)
print("EQUAL", len(params), worst, flush=True)
"""


def _run(args, device, tmp_path):
    env = checkout_env()
    if device == "cpu": env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")   # a CPU run, on a GPU machine too
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


CHECKS = ["feature_rewards", "feature_rewards bf16", "reinforce_loss", "head_logprobs"]


def _triton_version():
    try:
        import triton
    except ImportError:
        return (0, 0)
    return tuple(int(x) for x in triton.__version__.split(".")[:2])


# Liger's kernels (the fused log-probabilities) do not run under the interpreter of Triton before 3.9 (the GPU
# machine's torch ships 3.6): there the compiled kernels are checked on the GPU instead, by the `gpu` tests below.
interpreter = pytest.mark.skipif(_triton_version() < (3, 9), reason="Triton's interpreter before 3.9 cannot run Liger's kernels")


@interpreter
def test_kernels_equal_their_references_under_the_interpreter(tmp_path):
    out = _run([str(HERE / "ebft_kernel_checks.py"), "cpu"], "cpu", tmp_path)
    assert [l.split(" ", 1)[1] for l in out.splitlines() if l.startswith("CHECKED")] == CHECKS


def _step_config(tmp_path, gpu: bool) -> Path:
    text = STRIDED.replace("learning_rate: 1.0e-6", "learning_rate: 1.0e-2").replace("ce_coef: 0.0\n", "ce_coef: 0.03\n")
    text = text.replace("lora_dropout: 0.05", "lora_dropout: 0.0").replace("  advantage_estimator: rloo\n",
                        "  advantage_estimator: rloo\n  kernels: false\n")
    text = text.replace("./outputs/ebft-strided-validation", str(tmp_path / "out"))
    if not gpu: text = text.replace("bf16: auto", "bf16: false")
    path = tmp_path / "strided.yaml"
    path.write_text(text)
    return path


@interpreter
def test_a_fused_strided_step_equals_the_plain_one(tmp_path):
    "The same batch and sampled blocks through the plain and the fused step: the same loss and adapter gradients."
    out = _run(["-c", STEP, "cpu", str(_step_config(tmp_path, False))], "cpu", tmp_path)
    assert "EQUAL" in out


@pytest.mark.gpu
def test_kernels_equal_their_references_on_the_gpu(tmp_path):
    out = _run([str(HERE / "ebft_kernel_checks.py"), "cuda"], "cuda", tmp_path)
    assert [l.split(" ", 1)[1] for l in out.splitlines() if l.startswith("CHECKED")] == CHECKS


@pytest.mark.gpu
def test_a_fused_strided_step_equals_the_plain_one_on_the_gpu(tmp_path):
    out = _run(["-c", STEP, "cuda", str(_step_config(tmp_path, True))], "cuda", tmp_path)
    assert "EQUAL" in out
