"""The NF4 dequantization kernel (`ftlab.kernels.nf4`) against bitsandbytes, and the fused LoRA projection's 4-bit
path through it (nf4_kernel_checks.py). On CPU under Triton's interpreter, which must be on before Triton is
imported, so the checks run in a process of their own; the `gpu` test runs them compiled, where the kernel must
equal bitsandbytes' CUDA kernels bit for bit."""
import subprocess, sys
from pathlib import Path

import pytest

from run_helpers import checkout_env

HERE = Path(__file__).parent
CHECKS = ["nf4 equals bitsandbytes 46", "fp4 left to bitsandbytes", "fused LoRA projection on a 4-bit weight"]


def _checks(device, tmp_path):
    env = checkout_env()
    if device == "cpu": env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")   # a CPU run, on a GPU machine too
    p = subprocess.run([sys.executable, str(HERE / "nf4_kernel_checks.py"), device], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return [l.split(" ", 1)[1] for l in p.stdout.splitlines() if l.startswith("CHECKED")]


def test_the_kernel_equals_bitsandbytes_under_the_interpreter(tmp_path):
    assert _checks("cpu", tmp_path) == CHECKS


def test_without_the_interpreter_a_cpu_weight_is_left_to_bitsandbytes():
    import torch, bitsandbytes.functional as bnbf
    from ftlab.kernels import nf4
    q, qs = bnbf.quantize_4bit(torch.randn(64, 64, dtype=torch.bfloat16), quant_type="nf4")
    assert not nf4.available("cpu") and not nf4.covers(q, qs)
    assert torch.equal(nf4.dequantize_nf4(q, qs), bnbf.dequantize_4bit(q, qs))


@pytest.mark.gpu
def test_the_kernel_equals_bitsandbytes_on_the_gpu(tmp_path):
    assert _checks("cuda", tmp_path) == CHECKS
