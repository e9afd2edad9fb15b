"""Fused LoRA projection: the base matmul and the LoRA branch in one autograd node, in the activation dtype.

PEFT computes a LoRA projection as `base(x) + lora_B(lora_A(dropout(x.to(A.dtype)))) * s`: with float32 adapter
weights and a bf16 base that is a cast of `x` per projection, float32 LoRA matmuls, a scale, an add and a cast
back, and autograd keeps the float32 copy of `x` alive for the backward. `LoRALinearFunction` does instead

    y  = x @ W^T (+ bias) + s * (x @ A^T) @ B^T          (LoRA term accumulated into y with addmm_)
    dX = dY @ W + s * (dY @ B) @ A                       (accumulated with addmm_, `dY @ B` reused below)
    dA = s * (dY @ B)^T @ X
    dB = s * (X @ A^T)^T @ dY                            (`X @ A^T` saved from the forward)

in the activation dtype, with `A`/`B` cast once per call (they are tiny) and their gradients returned in their own
dtype (float32 master weights stay float32). `W` is frozen (no dW). A bitsandbytes 4-bit weight is dequantized
in the forward and again in the backward, never saved, so QLoRA keeps its memory profile.

`apply_fused_lora(model)` swaps the `forward` of each eligible PEFT LoRA layer of a model for one that calls the
fused function, and falls back to PEFT's own forward whenever the layer is disabled, merged or called with
anything else PEFT handles (mixed adapter batches, extra arguments).

Pure PyTorch (no Triton), so it imports and runs on any machine.
"""
from __future__ import annotations

import logging
import types

import torch

__all__ = ["LoRALinearFunction", "lora_linear", "lora_reference", "GROUPS", "lora_eligibility",
           "apply_fused_lora", "remove_fused_lora", "fused_lora_summary"]

log = logging.getLogger(__name__)

# Module name (last component) -> projection group, for Llama / Qwen / Mistral style models.
GROUPS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def _dequantize(W, quant_state, dtype):
    "The dense weight in `dtype`: `W` itself (cast if needed), or the dequantized 4-bit weight."
    if quant_state is None:
        return W if W.dtype == dtype else W.to(dtype)
    import bitsandbytes.functional as bnbf
    Wd = bnbf.dequantize_4bit(W, quant_state)
    return Wd if Wd.dtype == dtype else Wd.to(dtype)


class LoRALinearFunction(torch.autograd.Function):
    """`y = x @ W^T + bias + s * (x @ A^T) @ B^T` with a hand-written backward; computed in `x.dtype`.

    `x`: (..., in). `W`: (out, in) frozen weight, or a packed bitsandbytes 4-bit weight with its `quant_state`.
    `bias`: (out,) or None. `A`: (r, in), `B`: (out, r), any floating dtype. `s`: the LoRA scaling (float).
    Saves `x`, `x @ A^T` (in the compute dtype), `A`, `B` and `W` as given (never a dequantized copy)."""

    @staticmethod
    def forward(ctx, x, W, quant_state, bias, A, B, s):
        dtype = x.dtype
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        Wd = _dequantize(W, quant_state, dtype)
        Ac, Bc = A.to(dtype), B.to(dtype)
        xa = x2 @ Ac.t()                                            # (N, r)
        if bias is not None:
            out = torch.addmm(bias.to(dtype), x2, Wd.t())
        else:
            out = x2 @ Wd.t()
        del Wd
        out.addmm_(xa, Bc.t(), alpha=s)                             # + s * (x A^T) B^T, no separate add
        ctx.s = s
        ctx.quant_state = quant_state
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.x_shape = shape
        ctx.save_for_backward(x2, xa, W, A, B)
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dY):
        x2, xa, W, A, B = ctx.saved_tensors
        s = ctx.s
        dtype = x2.dtype
        need_x, _, _, need_bias, need_A, need_B, _ = ctx.needs_input_grad
        dY2 = dY.reshape(-1, dY.shape[-1])
        if dY2.dtype != dtype: dY2 = dY2.to(dtype)
        Ac, Bc = A.to(dtype), B.to(dtype)
        dX = dA = dB = dbias = None
        dYB = dY2 @ Bc if (need_x or need_A) else None             # (N, r), shared by dX and dA
        if need_x:
            Wd = _dequantize(W, ctx.quant_state, dtype)
            dX = dY2 @ Wd
            del Wd
            dX.addmm_(dYB, Ac, alpha=s)
            dX = dX.view(ctx.x_shape)
        if need_A:
            dA = (dYB.t() @ x2).mul_(s).to(A.dtype)                 # (r, in)
        if need_B:
            dB = (dY2.t() @ xa).mul_(s).to(B.dtype)                 # (out, r)
        if need_bias and ctx.has_bias:
            dbias = dY2.sum(0).to(ctx.bias_dtype)
        return dX, None, None, dbias, dA, dB, None


def lora_linear(x, W, bias, A, B, s, quant_state=None):
    "The fused projection, autocast-aware: under autocast it computes in the autocast dtype, like the layers it replaces."
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        x = x.to(torch.get_autocast_dtype(dev))
        with torch.autocast(dev, enabled=False):
            return LoRALinearFunction.apply(x, W, quant_state, bias, A, B, float(s))
    return LoRALinearFunction.apply(x, W, quant_state, bias, A, B, float(s))


def lora_reference(x, W, bias, A, B, s):
    "What PEFT computes for a LoRA linear (no dropout): `x @ W^T + bias + s * (x @ A^T) @ B^T`, in plain PyTorch."
    y = torch.nn.functional.linear(x, W, bias)
    xa = x.to(A.dtype)
    return y + (torch.nn.functional.linear(torch.nn.functional.linear(xa, A), B) * s).to(y.dtype)


# --- patching a PEFT model ---------------------------------------------------------------------------------

def _linear4bit_cls():
    try:
        import bitsandbytes as bnb
        return bnb.nn.Linear4bit
    except Exception:
        return None


def _active_here(module) -> list:
    "The active adapters that have LoRA weights on this layer (PEFT skips the others)."
    return [a for a in module.active_adapters if a in module.lora_A]


def lora_eligibility(module) -> str | None:
    "Why this PEFT LoRA layer cannot take the fused forward, or None when it can."
    from peft.tuners.lora import LoraLayer
    if not isinstance(module, LoraLayer): return "not a LoRA layer"
    base = module.get_base_layer()
    L4 = _linear4bit_cls()
    if L4 is not None and isinstance(base, L4):
        pass
    elif type(base) is not torch.nn.Linear:
        return f"base layer is {type(base).__name__}, not nn.Linear or bnb Linear4bit"
    active = _active_here(module)
    if len(active) != 1: return f"{len(active)} active adapters on this layer (needs exactly one)"
    a = active[0]
    drop = module.lora_dropout[a]
    if not (isinstance(drop, torch.nn.Identity) or (isinstance(drop, torch.nn.Dropout) and drop.p == 0)):
        return "lora_dropout > 0"
    if getattr(module, "use_dora", {}).get(a, False): return "DoRA"
    if a in getattr(module, "lora_variant", {}): return f"LoRA variant {type(module.lora_variant[a]).__name__}"
    if module.merged: return "merged"
    if getattr(module, "fan_in_fan_out", False): return "fan_in_fan_out"
    if getattr(module, "lora_bias", {}).get(a, False) or module.lora_B[a].bias is not None: return "lora_bias"
    if module.lora_A[a].bias is not None: return "lora_A has a bias"
    return None


def _fused_forward(self, x, *args, **kwargs):
    "Forward of a patched LoRA layer: the fused projection, or PEFT's own forward for anything it does not cover."
    if args or kwargs or self.disable_adapters or self.merged:
        return self._ftlab_peft_forward(x, *args, **kwargs)
    active = _active_here(self)
    if len(active) != 1 or active[0] != self._ftlab_adapter:
        return self._ftlab_peft_forward(x, *args, **kwargs)
    a = active[0]
    base = self.get_base_layer()
    A, B = self.lora_A[a].weight, self.lora_B[a].weight
    s = self.scaling[a]
    if self._ftlab_4bit:
        try:
            from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
            fix_4bit_weight_quant_state_from_module(base)
        except ImportError:
            pass
        qs = getattr(base.weight, "quant_state", None)
        if qs is None or getattr(qs, "packing_format_for_cpu", False):
            return self._ftlab_peft_forward(x)
        in_dtype = x.dtype
        cdt = base.compute_dtype or in_dtype
        dev = x.device.type
        if torch.is_autocast_enabled(dev): cdt = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            y = LoRALinearFunction.apply(x.to(cdt), base.weight, qs, base.bias, A, B, float(s))
        return y.to(in_dtype)  # like bnb's Linear4bit: out in the input's dtype
    return lora_linear(x, base.weight, base.bias, A, B, s)


def apply_fused_lora(model, which=("qkv", "o", "mlp")) -> int:
    """Give each eligible LoRA layer of a PEFT `model` in the groups `which` ("qkv", "o", "mlp") the fused forward.

    Returns how many layers were patched (already-patched ones count). The full account, patched names and the
    reason each other LoRA layer was left alone, is logged and kept as `fused_lora_summary(model)`."""
    from peft.tuners.lora import LoraLayer
    which = {which} if isinstance(which, str) else set(which)
    unknown = which - set(GROUPS.values())
    if unknown: raise ValueError(f"unknown projection groups {sorted(unknown)}; use some of 'qkv', 'o', 'mlp'")
    L4 = _linear4bit_cls()
    patched, skipped = [], {}
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer): continue
        group = GROUPS.get(name.rsplit(".", 1)[-1])
        if group is None: skipped[name] = "not a q/k/v/o/gate/up/down projection"; continue
        if group not in which: skipped[name] = f"group {group!r} not asked for"; continue
        if "_ftlab_peft_forward" in mod.__dict__: patched.append(name); continue
        why = lora_eligibility(mod)
        if why: skipped[name] = why; continue
        mod._ftlab_peft_forward = mod.forward
        mod._ftlab_adapter = _active_here(mod)[0]
        mod._ftlab_4bit = L4 is not None and isinstance(mod.get_base_layer(), L4)
        mod.forward = types.MethodType(_fused_forward, mod)
        patched.append(name)
    summary = dict(patched=patched, skipped=skipped)
    try: object.__setattr__(model, "_ftlab_fused_lora", summary)
    except Exception: pass
    log.info("fused LoRA: %d layers patched, %d left alone%s", len(patched), len(skipped),
             "".join(f"\n  {n}: {r}" for n, r in skipped.items()))
    return len(patched)


def fused_lora_summary(model) -> dict:
    "`{'patched': [names], 'skipped': {name: reason}}` from the last `apply_fused_lora(model)`."
    return getattr(model, "_ftlab_fused_lora", dict(patched=[], skipped={}))


def remove_fused_lora(model) -> int:
    "Give every patched layer PEFT's own forward back; returns how many were restored."
    n = 0
    for mod in model.modules():
        if "_ftlab_peft_forward" in mod.__dict__:
            del mod.forward
            for k in ("_ftlab_peft_forward", "_ftlab_adapter", "_ftlab_4bit"): mod.__dict__.pop(k, None)
            n += 1
    return n
