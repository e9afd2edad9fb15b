"""NF4 weights back to 16 bits in one Triton launch, with the same values as bitsandbytes.

The fused LoRA projections (`kernels/lora.py`) dequantize each 4-bit base weight twice a step, once in the forward
and once in the backward. bitsandbytes does it in three launches for a double-quantized weight: the 8-bit absmax
back to float32 (`kDequantizeBlockwise<float>`), the offset added, then the 4-bit values
(`kDequantizeBlockwise<bf16>`). On an H200 that took 6.8% of a QLoRA Llama-3.1-8B step (bench/results, profile
`h200-cmd32`), about twice what the bytes moved need. Here one program handles 4,096 values (64 blocks of 64): it decodes
each block's scale once (`code2[absmax_q] * absmax2[block // blocksize2] + offset`, rounded like bitsandbytes: the
product, then the sum) and writes `code[nibble] * scale` in the output dtype, the high nibble of each byte first.

`dequantize_nf4(W, quant_state, dtype)` takes a bitsandbytes 4-bit weight (any storage dtype: FSDP-style storage in
bf16 is bytes all the same) and its `QuantState`; it falls back to bitsandbytes for what it does not cover (FP4, a
block size other than a power of two up to 4096, a weight off the GPU without the interpreter). In the quant
state's own dtype it gives bitsandbytes' values; in another dtype it rounds once where bitsandbytes' path rounds
twice (to the quant state's dtype, then on). On each GPU, the first weight it dequantizes is also dequantized by
bitsandbytes and compared: should the two differ, or the kernel fail to build, bitsandbytes dequantizes from then on
and a warning says so. `available(device)` says where the kernel runs.

Tests (tests/kernels/test_nf4.py): on the GPU, the kernel must equal bitsandbytes' CUDA dequantization bit for bit.
On the CPU, under `TRITON_INTERPRET=1`, its float32 and float16 values must equal the CUDA kernels' arithmetic
written out in PyTorch bit for bit, and its bf16 values that arithmetic within one step (the interpreter truncates
to bf16 where the GPU rounds); bitsandbytes' own CPU kernels round differently again.
"""
from __future__ import annotations

import functools
import logging

import torch

from .triton_device import available

__all__ = ["available", "covers", "dequantize_nf4"]

log = logging.getLogger(__name__)
VALUES_PER_PROGRAM = 4096     # 64 blocks of bitsandbytes' default 64 values: 2 KiB of packed bytes a program
verified: dict = {}            # CUDA device index -> whether the kernel gave bitsandbytes' values there


def covers(W, quant_state) -> bool:
    "Whether `dequantize_nf4` computes this weight itself: NF4 with an even block size, where the kernel can run."
    qs = quant_state
    power_of_two = lambda n: n > 0 and n & (n - 1) == 0
    return (qs is not None and getattr(qs, "quant_type", None) == "nf4" and power_of_two(qs.blocksize)
            and 2 <= qs.blocksize <= VALUES_PER_PROGRAM and (not qs.nested or power_of_two(qs.state2.blocksize))
            and available(W.device) and verified.get(W.device.index, True))


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_dequant(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr, out_ptr,
                    n_bytes, n_blocks, n_values,
                    HALF: tl.constexpr, BLOCK2_SHIFT: tl.constexpr, NESTED: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        live = rows < n_blocks
        if NESTED:   # the block's scale from its 8-bit code, as bitsandbytes computes it: product, then + offset
            q = tl.load(absmax_ptr + rows, mask=live, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q, mask=live, other=0.0) * tl.load(absmax2_ptr + (rows >> BLOCK2_SHIFT), mask=live, other=0.0)
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + rows, mask=live, other=0.0).to(tl.float32)
        at = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
        byte = tl.load(packed_ptr + at, mask=at < n_bytes, other=0).to(tl.int32)
        high = tl.load(code_ptr + (byte >> 4)) * scale[:, None]
        low = tl.load(code_ptr + (byte & 15)) * scale[:, None]
        # element 2i from the high nibble of byte i; rounded to nearest even, as PyTorch and CUDA round
        values = tl.interleave(high, low).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        out = rows[:, None] * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]
        tl.store(out_ptr + out, values, mask=out < n_values)

    return nf4_dequant


def _bitsandbytes(W, qs, dtype):
    import bitsandbytes.functional as bnbf
    out = bnbf.dequantize_4bit(W, qs)
    return out if out.dtype == dtype else out.to(dtype)


def dequantize_nf4(W, quant_state, dtype=None):
    """The dense weight (`quant_state.shape`, in `dtype`, by default the quant state's) of the 4-bit weight `W`:
    this module's kernel where `covers` says so, bitsandbytes' `dequantize_4bit` elsewhere."""
    qs = quant_state
    dtype = dtype or qs.dtype
    if not covers(W, qs): return _bitsandbytes(W, qs, dtype)
    if W.device.type == "cuda" and W.device.index not in verified:   # the first weight on this GPU: against bitsandbytes
        try:
            same = torch.equal(_launch(W, qs, qs.dtype), _bitsandbytes(W, qs, qs.dtype))
            why = "its values differ from bitsandbytes'"
        except Exception as e:  # a kernel that cannot be built here must not stop the run
            same, why = False, f"it failed: {type(e).__name__}: {str(e)[:200]}"
        verified[W.device.index] = same
        if not same:
            log.warning("NF4 weights are dequantized by bitsandbytes on %s: ftlab's kernel was not used, %s", W.device, why)
            return _bitsandbytes(W, qs, dtype)
    return _launch(W, qs, dtype)


def _launch(W, qs, dtype):
    "The kernel's dense weight in `dtype`."
    packed = W.reshape(-1).view(torch.uint8) if W.dtype != torch.uint8 else W.reshape(-1)
    out = torch.empty(qs.shape, dtype=dtype, device=W.device)
    n_blocks = -(-out.numel() // qs.blocksize)
    if qs.nested:
        offset = torch.as_tensor(qs.offset, dtype=torch.float32, device=W.device).reshape(1)
        absmax, code2, absmax2 = qs.absmax, qs.state2.code, qs.state2.absmax
        shift = qs.state2.blocksize.bit_length() - 1
    else:
        absmax, shift = qs.absmax, 0
        code2 = absmax2 = offset = absmax            # not read
    import contextlib, triton
    rows = VALUES_PER_PROGRAM // qs.blocksize
    with torch.cuda.device(W.device) if W.device.type == "cuda" else contextlib.nullcontext():
        _kernel()[(triton.cdiv(n_blocks, rows),)](
            packed, absmax, code2, absmax2, offset, qs.code, out, packed.numel(), n_blocks, out.numel(),
            HALF=qs.blocksize // 2, BLOCK2_SHIFT=shift, NESTED=bool(qs.nested), ROWS=rows,
            num_warps=4, enable_fp_fusion=False)   # no fused multiply-add: the two roundings bitsandbytes makes
    return out
