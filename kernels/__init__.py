"""Triton kernels for ftlab, shipped as `ftlab.kernels`.

Each kernel lives in its own plain `.py` file beside a PyTorch reference of the same maths.

`lora`: fused LoRA projection (base matmul + LoRA branch in one autograd node, QLoRA-aware) and
`apply_fused_lora(model)` to switch a PEFT model over to it; pure PyTorch, no Triton needed.
"""
