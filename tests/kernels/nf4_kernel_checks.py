"""The NF4 kernel against bitsandbytes, on the device given (cpu runs under TRITON_INTERPRET=1).

Run by tests/kernels/test_nf4.py in a process of its own: Triton's interpreter must be switched on before Triton is
first imported. On the GPU the kernel must equal bitsandbytes' CUDA dequantization bit for bit. bitsandbytes' CPU
kernels round their own way (they may fuse the multiply and add) and Triton's interpreter truncates where the GPU
rounds to bf16, so on the CPU the kernel's float32 and float16 values must equal the CUDA kernels' arithmetic written
out in PyTorch bit for bit, its bf16 values that arithmetic to one step, and bitsandbytes' CPU result to two.
Prints `CHECKED name` per check that passed and raises on the first that fails.
"""
import sys

import torch
import bitsandbytes.functional as bnbf

from ftlab.kernels import nf4

device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
gen = torch.Generator(device="cpu").manual_seed(0)
assert nf4.available(device), f"the kernel cannot run on {device}"


def cuda_arithmetic(q, qs, dtype):
    "bitsandbytes' CUDA dequantization in PyTorch: the block scales in float32 (product, then + offset), then code x scale."
    n = qs.shape.numel()
    if qs.nested:
        s2 = qs.state2
        scale = s2.code[qs.absmax.long()] * s2.absmax.repeat_interleave(s2.blocksize)[:qs.absmax.numel()]
        scale = scale + qs.offset
    else:
        scale = qs.absmax.float()
    byte = q.reshape(-1).view(torch.uint8).long()
    nib = torch.stack([byte >> 4, byte & 15], 1).reshape(-1)[:n]
    return (qs.code[nib] * scale.repeat_interleave(qs.blocksize)[:n]).to(dtype).reshape(qs.shape)


def ulps(a, b):
    "How far apart two tensors of one 16-bit dtype are, in units of their last place (as integers)."
    ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
    return (ia - ib).abs().max().item() if a.numel() else 0


cases = 0
for shape in [(256, 192), (100, 72), (7, 10), (3, 4096 * 3 + 64)]:     # whole blocks, partial last blocks, a tail
    for nested in (True, False):
        for storage in (torch.uint8, torch.bfloat16)[:1 if shape[0] * shape[1] % 4 else 2]:   # bf16 storage: whole pairs of bytes
            W = (torch.randn(*shape, generator=gen) * 0.05).to(device=device, dtype=torch.bfloat16)
            W[0, :3] = torch.tensor([0.0, 1e-8, -3.0])                      # a zero, a tiny value, an outlier
            q, qs = bnbf.quantize_4bit(W, blocksize=64, compress_statistics=nested, quant_type="nf4",
                                       quant_storage=storage)
            assert nf4.covers(q, qs)
            lib = bnbf.dequantize_4bit(q, qs)                                # in the quant state's dtype, bf16
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                got = nf4.dequantize_nf4(q, qs, dtype)
                assert got.shape == lib.shape and got.dtype == dtype, (got.shape, got.dtype)
                want = cuda_arithmetic(q, qs, dtype)
                if device == "cpu" and dtype == torch.bfloat16:   # Triton's interpreter truncates to bf16, not rounds
                    assert ulps(got, want) <= 1, (shape, nested, storage)
                    assert torch.equal(nf4.dequantize_nf4(q, qs, torch.float32).to(dtype), want), (shape, nested, storage)
                else: assert torch.equal(got, want), (shape, nested, storage, dtype)
                if dtype == lib.dtype:
                    if device == "cuda": assert torch.equal(got, lib), (shape, nested, storage, ulps(got, lib))
                    else: assert ulps(got, lib) <= 2, (shape, nested, storage, ulps(got, lib))
                cases += 1
# other block sizes bitsandbytes offers (its own CPU kernels are off at these, so only the CUDA arithmetic is the reference)
for bs in (32, 128, 256, 4096):
    W = (torch.randn(40, 4096 // 8, generator=gen) * 0.05).to(device=device, dtype=torch.bfloat16)
    q, qs = bnbf.quantize_4bit(W, blocksize=bs, compress_statistics=True, quant_type="nf4")
    assert nf4.covers(q, qs)
    assert torch.equal(nf4.dequantize_nf4(q, qs, torch.float32), cuda_arithmetic(q, qs, torch.float32)), bs
    if device == "cuda": assert torch.equal(nf4.dequantize_nf4(q, qs), bnbf.dequantize_4bit(q, qs)), bs
    cases += 1
if device == "cuda":    # the first weight was checked against bitsandbytes, and the kernel kept
    assert nf4.verified == {torch.cuda.current_device(): True}, nf4.verified
print("CHECKED nf4 equals bitsandbytes", cases, flush=True)

q, qs = bnbf.quantize_4bit(torch.randn(64, 64, device=device, dtype=torch.bfloat16), quant_type="fp4")
assert not nf4.covers(q, qs) and torch.equal(nf4.dequantize_nf4(q, qs), bnbf.dequantize_4bit(q, qs))
print("CHECKED fp4 left to bitsandbytes", flush=True)

# the fused LoRA projection's 4-bit path goes through the kernel, forward and backward
from ftlab.kernels import lora
calls = []
kernel = nf4.dequantize_nf4
nf4.dequantize_nf4 = lambda *a, **k: (calls.append(1), kernel(*a, **k))[1]
W = (torch.randn(96, 128, generator=gen) * 0.05).to(device=device, dtype=torch.bfloat16)
q, qs = bnbf.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
dense = cuda_arithmetic(q, qs, torch.float32)
x = torch.randn(5, 128, generator=gen).to(device).requires_grad_()
A = (torch.randn(8, 128, generator=gen) * 0.1).to(device).requires_grad_()
B = (torch.randn(96, 8, generator=gen) * 0.1).to(device).requires_grad_()
y = lora.lora_linear(x, q, None, A, B, 2.0, quant_state=qs)
ref = lora.lora_reference(x, dense, None, A, B, 2.0)
g = torch.randn_like(ref)
grads = torch.autograd.grad(y, (x, A, B), g)
ref_grads = torch.autograd.grad(ref, (x, A, B), g)
assert len(calls) == 2, calls                                     # once in the forward, once in the backward
assert (y - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max()), (y - ref).abs().max()
for a, b in zip(grads, ref_grads): assert (a - b).abs().max() <= 1e-4 * max(1.0, b.abs().max()), (a - b).abs().max()
print("CHECKED fused LoRA projection on a 4-bit weight", flush=True)
