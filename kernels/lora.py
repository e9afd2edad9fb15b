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

Projections that read the same input (q/k/v of an attention block, gate/up of an MLP) are computed together by
`LoRAGroupFunction`: one `x @ [A_1; ...; A_k]^T` for all their LoRA branches, and in the backward one `dX` buffer
that every base and LoRA term accumulates into (`addmm_`), so autograd adds no partial input gradients, and one
`dA` matmul for the group. The first member called computes the group; the others pick up their outputs when
called with the same input tensor (and compute alone otherwise).

`apply_fused_lora(model)` swaps the `forward` of each eligible PEFT LoRA layer of a model for one that calls the
fused function, and falls back to PEFT's own forward whenever the layer is disabled, merged or called with
anything else PEFT handles (mixed adapter batches, extra arguments).

In a SwiGLU MLP whose three projections are all patched, `LoRASwiGLUDownFunction` also takes the SwiGLU into the
down projection's node, so that the MLP's widest activation (`silu(gate) * up`) is not kept for the backward: it
is computed again there from the gate and up outputs, which the SwiGLU's backward keeps anyway.

PyTorch matmuls throughout; the SwiGLU uses Liger's Triton kernels on a GPU and PyTorch elsewhere, so this imports
and runs on any machine.
"""
from __future__ import annotations

import logging
import types

import torch

__all__ = ["LoRALinearFunction", "LoRAGroupFunction", "lora_linear", "lora_group", "lora_reference", "GROUPS",
           "SHARED_INPUT", "SharedInput", "SWIGLU_MLPS", "LoRASwiGLUDownFunction", "lora_eligibility",
           "apply_fused_lora", "remove_fused_lora", "fused_lora_summary"]

log = logging.getLogger(__name__)

# Module name (last component) -> projection group, for Llama / Qwen / Mistral style models.
GROUPS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
# Sibling projections that read the same input tensor and can be computed as one group.
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _dequantize(W, quant_state, dtype):
    """The dense weight in `dtype`: `W` itself (cast if needed), or the dequantized 4-bit weight (NF4 on a GPU: one
    launch of `kernels/nf4.py`, written straight in `dtype`; bitsandbytes' own dequantization elsewhere)."""
    if quant_state is None:
        return W if W.dtype == dtype else W.to(dtype)
    from .nf4 import dequantize_nf4
    return dequantize_nf4(W, quant_state, dtype)


def _scaled_mm(a, b, s):
    "`s * (a @ b)` in one matmul (the scale rides on the matmul's alpha)."
    if s == 1.0: return a @ b
    return torch.addmm(a.new_empty(()).expand(a.shape[0], b.shape[1]), a, b, beta=0, alpha=s)


class LoRALinearFunction(torch.autograd.Function):
    """`y = x @ W^T + bias + s * (x @ A^T) @ B^T` with a hand-written backward; computed in `x.dtype`.

    `x`: (..., in). `W`: (out, in) frozen weight, or a packed bitsandbytes 4-bit weight with its `quant_state`.
    `bias`: (out,) or None. `A`: (r, in), `B`: (out, r), any floating dtype. `s`: the LoRA scaling (float).
    Saves `x`, `x @ A^T`, `A` and `B` in the compute dtype (tiny), and `W` as given (never a dequantized copy)."""

    @staticmethod
    def forward(ctx, x, W, quant_state, bias, A, B, s):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        out, xa, Ac, Bc = _project(x2, W, quant_state, bias, A, B, s)
        _keep(ctx, W, quant_state, bias, A, B, s)
        ctx.x_shape = shape
        ctx.save_for_backward(x2, xa, W, Ac, Bc)                   # A, B in the compute dtype: no casts again later
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dY):
        x2, xa, W, Ac, Bc = ctx.saved_tensors
        need_x, _, _, need_bias, need_A, need_B, _ = ctx.needs_input_grad
        dX, dA, dB, dbias = _project_backward(ctx, dY, x2, xa, W, Ac, Bc, need_x, need_bias, need_A, need_B)
        return None if dX is None else dX.view(ctx.x_shape), None, None, dbias, dA, dB, None


def _project(x2, W, quant_state, bias, A, B, s):
    "`x2 @ W^T + bias + s * (x2 @ A^T) @ B^T` in `x2.dtype`, with `x2 @ A^T` and A, B in that dtype (for the backward)."
    dtype = x2.dtype
    Wd = _dequantize(W, quant_state, dtype)
    Ac, Bc = A.to(dtype), B.to(dtype)
    xa = x2 @ Ac.t()                                                # (N, r)
    out = torch.addmm(bias.to(dtype), x2, Wd.t()) if bias is not None else x2 @ Wd.t()
    del Wd
    out.addmm_(xa, Bc.t(), alpha=s)                                 # + s * (x A^T) B^T, no separate add
    return out, xa, Ac, Bc


def _keep(ctx, W, quant_state, bias, A, B, s):
    "What a projection's backward needs besides its saved tensors."
    ctx.s, ctx.quant_state = s, quant_state
    ctx.has_bias, ctx.bias_dtype = bias is not None, None if bias is None else bias.dtype
    ctx.ab_dtypes = (A.dtype, B.dtype)


def _project_backward(ctx, dY, x2, xa, W, Ac, Bc, need_x, need_bias, need_A, need_B):
    "The gradients (dX as (N, in), dA, dB, dbias) of `_project` for the output gradient `dY`."
    s, dtype = ctx.s, x2.dtype
    dY2 = dY.reshape(-1, dY.shape[-1])
    if dY2.dtype != dtype: dY2 = dY2.to(dtype)
    dX = dA = dB = dbias = None
    dYB = dY2 @ Bc if (need_x or need_A) else None                 # (N, r), shared by dX and dA
    if need_x:
        Wd = _dequantize(W, ctx.quant_state, dtype)
        dX = dY2 @ Wd
        del Wd
        dX.addmm_(dYB, Ac, alpha=s)
    if need_A: dA = _scaled_mm(dYB.t(), x2, s).to(ctx.ab_dtypes[0])     # (r, in)
    if need_B: dB = _scaled_mm(dY2.t(), xa, s).to(ctx.ab_dtypes[1])     # (out, r)
    if need_bias and ctx.has_bias: dbias = dY2.sum(0).to(ctx.bias_dtype)
    return dX, dA, dB, dbias


def _silu_mul(g, u):
    "`silu(g) * u`: Liger's kernel on a GPU, PyTorch elsewhere."
    if g.is_cuda:
        from liger_kernel.ops.swiglu import swiglu_forward
        return swiglu_forward(g, u)[2]
    return torch.nn.functional.silu(g) * u


def _silu_mul_backward(g, u, dh):
    "(dg, du) of `silu(g) * u` for `dh`: Liger's kernel on a GPU (it writes them into `g` and `u`), PyTorch elsewhere."
    if g.is_cuda:
        from liger_kernel.ops.swiglu import swiglu_backward
        return swiglu_backward(g, u, dh)
    sg = torch.sigmoid(g.float())
    du = (g.float() * sg * dh.float()).to(u.dtype)
    dg = (dh.float() * u.float() * sg * (1 + g.float() * (1 - sg))).to(g.dtype)
    return dg, du


class LoRASwiGLUDownFunction(torch.autograd.Function):
    """The down projection of a SwiGLU MLP with its input: `y = h @ W^T + bias + s * (h @ A^T) @ B^T`, `h = silu(g) * u`.

    Saves `g` and `u` (the gate and up outputs, which the SwiGLU's backward needs anyway) and not `h`: the backward
    computes `h` again from them (one elementwise pass) for dA, then dh, then dg and du. Against a separate SwiGLU and
    projection, that keeps one activation of the MLP's width less per layer for the backward."""

    @staticmethod
    def forward(ctx, g, u, W, quant_state, bias, A, B, s):
        shape = g.shape
        g2, u2 = g.reshape(-1, shape[-1]), u.reshape(-1, shape[-1])
        out, xa, Ac, Bc = _project(_silu_mul(g2, u2), W, quant_state, bias, A, B, s)
        _keep(ctx, W, quant_state, bias, A, B, s)
        ctx.x_shape = shape
        ctx.save_for_backward(g2, u2, xa, W, Ac, Bc)
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dY):
        g2, u2, xa, W, Ac, Bc = ctx.saved_tensors
        need_g, need_u, _, _, need_bias, need_A, need_B, _ = ctx.needs_input_grad
        h = _silu_mul(g2, u2)
        dh, dA, dB, dbias = _project_backward(ctx, dY, h, xa, W, Ac, Bc, need_g or need_u, need_bias, need_A, need_B)
        del h
        dg = du = None
        if dh is not None:
            dg, du = _silu_mul_backward(g2, u2, dh)
            dg, du = dg.view(ctx.x_shape), du.view(ctx.x_shape)
        return dg, du, None, None, dbias, dA, dB, None


def lora_linear(x, W, bias, A, B, s, quant_state=None):
    "The fused projection, autocast-aware: under autocast it computes in the autocast dtype, like the layers it replaces."
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        x = x.to(torch.get_autocast_dtype(dev))
        with torch.autocast(dev, enabled=False):
            return LoRALinearFunction.apply(x, W, quant_state, bias, A, B, float(s))
    return LoRALinearFunction.apply(x, W, quant_state, bias, A, B, float(s))


class LoRAGroupFunction(torch.autograd.Function):
    """k LoRA projections of one input: `y_i = x @ W_i^T + bias_i + s_i * (x @ A_i^T) @ B_i^T`, computed in `x.dtype`.

    Called as `apply(x, k, quant_states, scales, *Ws, *biases, *As, *Bs)` (each list k long; a quant state or bias
    may be None) and returns the k outputs. Forward: one matmul `x @ [A_1; ...; A_k]^T` for every LoRA branch, then
    per member its base matmul with the LoRA term added by `addmm_`. Backward:

        dYB_i = s_i * dY_i @ B_i                                (concatenated: dYB, (N, sum r_i))
        dX    = sum_i dY_i @ W_i + dYB @ [A_1; ...; A_k]        (one buffer, every term added in place)
        [dA_1; ...; dA_k] = dYB^T @ X                            (one matmul)
        dB_i  = s_i * dY_i^T @ (X @ A_i^T)                      (`X @ A^T` saved from the forward)

    Saves `x`, `x @ [A]^T`, `[A]` and the `B`s in the compute dtype, and the weights as given (4-bit weights are
    dequantized again in the backward)."""

    @staticmethod
    def forward(ctx, x, k, quant_states, scales, *params):
        Ws, biases, As, Bs = (params[i * k:(i + 1) * k] for i in range(4))
        dtype = x.dtype
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        Acat = torch.cat([A.to(dtype) for A in As]) if k > 1 else As[0].to(dtype)
        xa = x2 @ Acat.t()                                          # (N, sum r)
        outs, o = [], 0
        Bc = [B.to(dtype) for B in Bs]
        for W, qs, b, B, s in zip(Ws, quant_states, biases, Bc, scales):
            r = B.shape[1]
            Wd = _dequantize(W, qs, dtype)
            y = torch.addmm(b.to(dtype), x2, Wd.t()) if b is not None else x2 @ Wd.t()
            del Wd
            y.addmm_(xa[:, o:o + r], B.t(), alpha=s)
            outs.append(y.view(*shape[:-1], y.shape[-1]))
            o += r
        ctx.k, ctx.quant_states, ctx.scales, ctx.x_shape = k, quant_states, scales, shape
        ctx.bias_dtypes = [None if b is None else b.dtype for b in biases]
        ctx.a_dtypes, ctx.b_dtypes, ctx.rs = [A.dtype for A in As], [B.dtype for B in Bs], [B.shape[1] for B in Bs]
        ctx.save_for_backward(x2, xa, Acat, *Ws, *Bc)               # A, B in the compute dtype: no casts again later
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        k, scales = ctx.k, ctx.scales
        x2, xa, Acat, *rest = ctx.saved_tensors
        Ws, Bc = rest[:k], rest[k:]
        need = ctx.needs_input_grad
        need_x = need[0]
        need_b, need_A, need_B = need[4 + k:4 + 2 * k], need[4 + 2 * k:4 + 3 * k], need[4 + 3 * k:]
        dtype = x2.dtype
        N = x2.shape[0]
        rs = ctx.rs
        offs = [sum(rs[:i]) for i in range(k)]
        dY = [None if d is None else d.reshape(N, d.shape[-1]) for d in dys]
        dY = [d if d is None or d.dtype == dtype else d.to(dtype) for d in dY]
        dYB = None
        if need_x or any(need_A):
            dYB = torch.zeros(N, sum(rs), dtype=dtype, device=x2.device) if any(d is None for d in dY) else None
            parts = []
            for i in range(k):
                if dY[i] is None: continue
                part = _scaled_mm(dY[i], Bc[i], scales[i])
                if dYB is not None: dYB[:, offs[i]:offs[i] + rs[i]] = part
                else: parts.append(part)
            if dYB is None: dYB = torch.cat(parts, dim=1) if k > 1 else parts[0]
        dX = None
        if need_x:
            for i in range(k):
                if dY[i] is None: continue
                Wd = _dequantize(Ws[i], ctx.quant_states[i], dtype)
                if dX is None: dX = dY[i] @ Wd
                else: dX.addmm_(dY[i], Wd)
                del Wd
            if dX is None: dX = dYB @ Acat
            else: dX.addmm_(dYB, Acat)
            dX = dX.view(ctx.x_shape)
        dA = [None] * k
        if any(need_A):
            dAcat = dYB.t() @ x2                                        # (sum r, in)
            dA = [dAcat[offs[i]:offs[i] + rs[i]].to(ctx.a_dtypes[i], copy=True) if need_A[i] else None for i in range(k)]
        dB = [None] * k
        db = [None] * k
        for i in range(k):
            if dY[i] is None: continue
            if need_B[i]: dB[i] = _scaled_mm(dY[i].t(), xa[:, offs[i]:offs[i] + rs[i]], scales[i]).to(ctx.b_dtypes[i])
            if need_b[i] and ctx.bias_dtypes[i] is not None: db[i] = dY[i].sum(0).to(ctx.bias_dtypes[i])
        return (dX, None, None, None, *([None] * k), *db, *dA, *dB)


def lora_group(x, Ws, biases, As, Bs, scales, quant_states=None):
    "The grouped projections (a tuple of outputs), autocast-aware like `lora_linear`."
    k = len(Ws)
    qs = tuple(quant_states) if quant_states is not None else (None,) * k
    args = (k, qs, tuple(float(s) for s in scales), *Ws, *biases, *As, *Bs)
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        x = x.to(torch.get_autocast_dtype(dev))
        with torch.autocast(dev, enabled=False):
            return LoRAGroupFunction.apply(x, *args)
    return LoRAGroupFunction.apply(x, *args)


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


def _fusable_now(m, x, args=(), kwargs=None) -> bool:
    "Whether patched layer `m` can take the fused path for this call (else PEFT's own forward runs)."
    if args or kwargs or m.disable_adapters or m.merged: return False
    active = _active_here(m)
    return len(active) == 1 and active[0] == m._ftlab_adapter


def _quant_state(base):
    "The 4-bit quant state of a bitsandbytes layer (None when it cannot be used here)."
    try:
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
        fix_4bit_weight_quant_state_from_module(base)
    except ImportError:
        pass
    qs = getattr(base.weight, "quant_state", None)
    if qs is None or getattr(qs, "packing_format_for_cpu", False): return None
    return qs


def _compute_dtype(m, x):
    "The dtype the projection computes in: the autocast dtype, a 4-bit layer's compute dtype, else the input's."
    dev = x.device.type
    if torch.is_autocast_enabled(dev): return torch.get_autocast_dtype(dev)
    if m._ftlab_4bit: return m.get_base_layer().compute_dtype or x.dtype
    return x.dtype


class SharedInput:
    """Sibling layers that read the same input (q/k/v, gate/up: `SHARED_INPUT`): the first one called computes them
    all (`run`, which a subclass defines and ends with `keep`) and keeps the others' outputs until they are called
    with that same tensor (`take`)."""

    def __init__(self, members):
        self.members = list(members)
        self.clear()

    def clear(self):
        "Drop the kept outputs."
        self.x, self.pending, self.grad = None, {}, None

    def take(self, m, x):
        "This member's output from the group computation on `x`, if there is one."
        if self.x is x and self.grad == torch.is_grad_enabled() and id(m) in self.pending:
            y = self.pending.pop(id(m))
            if not self.pending: self.x = None
            return y
        return None

    def keep(self, m, x, ys):
        "Keep the outputs `ys` (one per member, in order) computed on `x` for the other members; returns `m`'s."
        mine, self.pending = None, {}
        for o, y in zip(self.members, ys):
            if o is m: mine = y
            else: self.pending[id(o)] = y
        self.x, self.grad = x, torch.is_grad_enabled()
        return mine


class _SharedInput(SharedInput):
    "Patched LoRA siblings: `run` computes them as one `LoRAGroupFunction` node."

    def run(self, m, x):
        "Compute every member on `x` and return `m`'s output; None when some member cannot take the fused path now."
        self.clear()
        if not all(_fusable_now(o, x) for o in self.members): return None
        qss, Ws, bs, As, Bs, ss = [], [], [], [], [], []
        for o in self.members:
            a, base = o._ftlab_adapter, o.get_base_layer()
            qs = _quant_state(base) if o._ftlab_4bit else None
            if o._ftlab_4bit and qs is None: return None
            qss.append(qs); Ws.append(base.weight); bs.append(base.bias)
            As.append(o.lora_A[a].weight); Bs.append(o.lora_B[a].weight); ss.append(float(o.scaling[a]))
        cdt = _compute_dtype(m, x)
        dev = x.device.type
        with torch.autocast(dev, enabled=False):
            ys = LoRAGroupFunction.apply(x.to(cdt), len(Ws), tuple(qss), tuple(ss), *Ws, *bs, *As, *Bs)
        if m._ftlab_4bit: ys = tuple(y.to(x.dtype) for y in ys)     # like bnb's Linear4bit: out in the input's dtype
        return self.keep(m, x, ys)


def _fused_forward(self, x, *args, **kwargs):
    "Forward of a patched LoRA layer: the fused projection, or PEFT's own forward for anything it does not cover."
    if not _fusable_now(self, x, args, kwargs):
        return self._ftlab_peft_forward(x, *args, **kwargs)
    group = self.__dict__.get("_ftlab_group")
    if group is not None:
        y = group.take(self, x)
        if y is None: y = group.run(self, x)
        if y is not None: return y
    a = self._ftlab_adapter
    base = self.get_base_layer()
    A, B = self.lora_A[a].weight, self.lora_B[a].weight
    s = self.scaling[a]
    if self._ftlab_4bit:
        qs = _quant_state(base)
        if qs is None: return self._ftlab_peft_forward(x)
        cdt = _compute_dtype(self, x)
        with torch.autocast(x.device.type, enabled=False):
            y = LoRALinearFunction.apply(x.to(cdt), base.weight, qs, base.bias, A, B, float(s))
        return y.to(x.dtype)  # like bnb's Linear4bit: out in the input's dtype
    return lora_linear(x, base.weight, base.bias, A, B, s)


# MLP classes whose forward is `down_proj(silu(gate_proj(x)) * up_proj(x))` (transformers', and Liger's own)
SWIGLU_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "LigerSwiGLUMLP")


def _swiglu_mlp_forward(self, x, *args, **kwargs):
    "Forward of a patched SwiGLU MLP: gate/up as one fused group, then the SwiGLU and the fused down projection as one node."
    gate, up, down = self.gate_proj, self.up_proj, self.down_proj
    still = all("_ftlab_peft_forward" in m.__dict__ for m in (gate, up, down))   # not after a merge_and_unload
    if args or kwargs or not still or not all(_fusable_now(m, x) for m in (gate, up)):
        return self._ftlab_mlp_forward(x, *args, **kwargs)
    g, u = gate(x), up(x)
    if not _fusable_now(down, g) or down._ftlab_4bit and _quant_state(down.get_base_layer()) is None:
        return down(torch.nn.functional.silu(g) * u)
    a, base = down._ftlab_adapter, down.get_base_layer()
    qs = _quant_state(base) if down._ftlab_4bit else None
    cdt = _compute_dtype(down, g)
    with torch.autocast(x.device.type, enabled=False):
        y = LoRASwiGLUDownFunction.apply(g.to(cdt), u.to(cdt), base.weight, qs, base.bias, down.lora_A[a].weight,
                                         down.lora_B[a].weight, float(down.scaling[a]))
    return y.to(g.dtype) if down._ftlab_4bit else y


def _swiglu_mlps(model, patched_names) -> list[str]:
    """Give each SwiGLU MLP whose gate, up and down projections are all patched (gate and up as one group) the
    forward that computes the SwiGLU inside the down projection's node; returns their names."""
    mods = dict(model.named_modules())
    out = []
    for parent in dict.fromkeys(name.rpartition(".")[0] for name in patched_names if name.endswith("down_proj")):
        mlp = mods.get(parent)
        if mlp is None or type(mlp).__name__ not in SWIGLU_MLPS: continue
        if "_ftlab_mlp_forward" in mlp.__dict__:
            if getattr(mlp.__dict__.get("forward"), "__func__", None) is _swiglu_mlp_forward: out.append(parent); continue
            # bound again since (transformers applies Liger's kernels inside `train()`): that forward is the fallback now
            mlp.__dict__.pop("_ftlab_mlp_forward"); mlp.__dict__.pop("_ftlab_own_forward", None)
        if getattr(getattr(mlp, "config", None), "hidden_act", "silu") not in ("silu", "swish"): continue
        parts = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(m is not None and "_ftlab_peft_forward" in m.__dict__ for m in parts): continue
        if parts[0].__dict__.get("_ftlab_group") is None or parts[0]._ftlab_group is not parts[1].__dict__.get("_ftlab_group"):
            continue
        mlp._ftlab_mlp_forward = mlp.forward
        mlp._ftlab_own_forward = "forward" in mlp.__dict__          # Liger binds its forward on the instance
        mlp.forward = types.MethodType(_swiglu_mlp_forward, mlp)
        out.append(parent)
    return out


def _group_siblings(model, patched_names) -> int:
    "Tie patched sibling layers that read the same input into groups; returns how many groups."
    mods = dict(model.named_modules())
    n = 0
    for parent in dict.fromkeys(name.rpartition(".")[0] for name in patched_names):
        for names in SHARED_INPUT:
            members = [mods.get(f"{parent}.{x}" if parent else x) for x in names]
            members = [m for m in members if m is not None and "_ftlab_peft_forward" in m.__dict__]
            if len(members) < 2: continue
            if len({(m._ftlab_4bit, m.get_base_layer().in_features, m._ftlab_adapter) for m in members}) != 1: continue
            g = _SharedInput(members)
            for m in members: m._ftlab_group = g
            n += 1
    return n


def apply_fused_lora(model, which=("qkv", "o", "mlp"), share_input: bool = True) -> int:
    """Give each eligible LoRA layer of a PEFT `model` in the groups `which` ("qkv", "o", "mlp") the fused forward.

    With `share_input`, patched siblings that read the same input (q/k/v, gate/up) are computed together
    (`LoRAGroupFunction`); without it every projection is its own fused node.

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
    mods = dict(model.named_modules())
    for name in patched: mods[name].__dict__.pop("_ftlab_group", None)    # regrouped below, from scratch
    n_groups = _group_siblings(model, patched) if share_input else 0
    mlps = _swiglu_mlps(model, patched) if share_input else []
    summary = dict(patched=patched, skipped=skipped, shared_input_groups=n_groups, swiglu_mlps=mlps)
    try: object.__setattr__(model, "_ftlab_fused_lora", summary)
    except Exception: pass
    log.info("fused LoRA: %d layers patched (%d groups sharing an input), %d left alone%s", len(patched), n_groups,
             len(skipped),
             "".join(f"\n  {n}: {r}" for n, r in skipped.items()))
    return len(patched)


def fused_lora_summary(model) -> dict:
    """`{'patched': [names], 'skipped': {name: reason}, 'shared_input_groups': n, 'swiglu_mlps': [names]}` from the last
    `apply_fused_lora`."""
    return getattr(model, "_ftlab_fused_lora", dict(patched=[], skipped={}, shared_input_groups=0, swiglu_mlps=[]))


def remove_fused_lora(model) -> int:
    "Give every patched layer PEFT's own forward back; returns how many were restored."
    n = 0
    for mod in model.modules():
        if "_ftlab_mlp_forward" in mod.__dict__:
            if mod.__dict__.pop("_ftlab_own_forward"): mod.forward = mod.__dict__.pop("_ftlab_mlp_forward")
            else: del mod.forward; mod.__dict__.pop("_ftlab_mlp_forward")
        if "_ftlab_peft_forward" in mod.__dict__:
            del mod.forward
            for k in ("_ftlab_peft_forward", "_ftlab_adapter", "_ftlab_4bit", "_ftlab_group"): mod.__dict__.pop(k, None)
            n += 1
    return n
