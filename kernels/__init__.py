"""Triton kernels for ftlab, shipped as `ftlab.kernels`.

Each kernel lives in its own plain `.py` file beside a PyTorch reference of the same maths.

`lora`: fused LoRA projection (base matmul + LoRA branch in one autograd node, QLoRA-aware), projections that
share an input (q/k/v, gate/up) computed as one group, and `apply_fused_lora(model)` to switch a PEFT model over to
it; pure PyTorch (cuBLAS matmuls), no Triton needed: on the H200 profile the matmuls are 76% of GPU time with these
on, and the rest is attention and host-side waiting, not work another kernel would speed up.

`nf4`: bitsandbytes' NF4 weights back to 16 bits in one Triton launch, the same values as bitsandbytes' own three;
the fused projections dequantize 4-bit base weights with it on a GPU.
"""
