"""Fused pieces of a strided EBFT step, each beside the plain PyTorch maths it replaces.

Where a strided step on Llama-3.2-1B (sequence 2048, 4 rollouts, blocks of 8 every 8 tokens) spends its time and
memory (bench/ebft_bench.py, bench/results/ebft.md):

- the policy's log-probabilities of the ~8k generated tokens went through `(tokens, vocab)` logits in bf16, a
  float32 copy and a float32 log-softmax: about 10 GB at a vocabulary of 128k, with the backward as large again.
  `head_logprobs` computes them from the hidden states and the LM head weight with Liger-Kernel's fused linear
  cross-entropy (`reduction="none"`), which works through the tokens in chunks and never holds the whole logits;
- the feature rewards (paper eq. 7) and the CFM diagnostic are a dozen small kernels over `(groups, n, D)`;
  `feature_rewards` is one Triton program per group that reads each embedding once and accumulates the cosine
  terms, the `n x n` Gram matrix and the CFM terms together;
- the masked REINFORCE mean `Σ -logp·A·m / Σ m` and its gradient are one Triton kernel each way
  (`reinforce_loss`), instead of the casts, products, sums and their backward.

Each fused function takes the same inputs and returns what its reference returns; tests compare them on CPU under
`TRITON_INTERPRET=1` and on the GPU (tests/kernels/test_ebft_kernels.py). Triton is imported when a kernel is
first called, so this module imports anywhere; `available(device)` says whether the fused path can run there.
"""
from __future__ import annotations

import functools

import torch

from .triton_device import available

__all__ = ["available", "head_logprobs_reference", "head_logprobs", "feature_rewards_reference", "feature_rewards",
           "reinforce_loss_reference", "reinforce_loss"]


# ------------------------------------------------------------------------------------------------ log-probabilities
def head_logprobs_reference(hidden, weight, targets, bias=None):
    "`log softmax(hidden @ weightᵀ + bias)[target]` in float32: `(..., H)`, `(V, H)`, `(...)` to `(...)`."
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def head_logprobs(hidden, weight, targets, bias=None):
    """The same as `head_logprobs_reference` without the `(..., V)` logits: Liger's fused linear cross-entropy per
    token (`reduction="none"`), negated. Gradients reach `hidden` (and `weight`, `bias` where they train)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    lead = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    nll = liger_fused_linear_cross_entropy(h, weight, targets.reshape(-1), bias=bias, reduction="none")
    return -nll.float().view(lead)


# ------------------------------------------------------------------------------------------------ feature rewards
def feature_rewards_reference(gen, ref, alignment_coef: float = 1.0, diversity_coef: float = 1.0):
    """(reward, alignment, diversity) `(G, n)` and cfm `(G,)` of groups of `n` embeddings `gen` `(G, n, D)` against
    `ref` `(G, D)`, in float32: `alignment_j = 2 cos(g_j, r)`, `diversity_j = 2/(n-1) Σ_{j'≠j} g_jᵀ g_j'` (0 when
    `n = 1`), `reward = a·alignment - d·diversity`, `cfm = ‖mean_j g_j - r‖²`."""
    g, r = gen.float(), ref.float()
    n = g.shape[1]
    cos = (g * r[:, None]).sum(-1) / (g.norm(dim=-1) * r.norm(dim=-1)[:, None]).clamp(min=1e-8)
    alignment = 2 * cos
    if n > 1:
        sims = g @ g.transpose(1, 2)
        diversity = 2 / (n - 1) * (sims.sum(-1) - sims.diagonal(dim1=1, dim2=2))
    else:
        diversity = torch.zeros_like(alignment)
    cfm = (g.mean(1) - r).pow(2).sum(-1)
    return alignment_coef * alignment - diversity_coef * diversity, alignment, diversity, cfm


@functools.cache
def _rewards_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(gen_ptr, ref_ptr, reward_ptr, align_ptr, div_ptr, cfm_ptr, n, a_coef, d_coef, D: tl.constexpr,
               N_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
        grp = tl.program_id(0)
        rows = tl.arange(0, N_PAD)
        row_ok = rows < n
        dot_ref = tl.zeros([N_PAD], dtype=tl.float32)          # g_j · r
        gram = tl.zeros([N_PAD, N_PAD], dtype=tl.float32)      # g_j · g_k
        ref_sq = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            g = tl.load(gen_ptr + grp * n * D + rows[:, None] * D + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            r = tl.load(ref_ptr + grp * D + cols, mask=col_ok, other=0.0).to(tl.float32)
            dot_ref += tl.sum(g * r[None, :], axis=1)
            gram += tl.sum(g[:, None, :] * g[None, :, :], axis=2)
            ref_sq += r * r
        r2 = tl.sum(ref_sq, axis=0)
        eye = rows[:, None] == rows[None, :]
        g2 = tl.sum(tl.where(eye, gram, 0.0), axis=1)          # ‖g_j‖²
        cos = dot_ref / tl.maximum(tl.sqrt(g2) * tl.sqrt(r2), 1e-8)
        align = 2.0 * cos
        others = tl.sum(gram, axis=1) - g2
        div = tl.where(n > 1, 2.0 * others / tl.maximum(n - 1, 1), 0.0)
        tl.store(reward_ptr + grp * n + rows, a_coef * align - d_coef * div, mask=row_ok)
        tl.store(align_ptr + grp * n + rows, align, mask=row_ok)
        tl.store(div_ptr + grp * n + rows, div, mask=row_ok)
        mean_sq = tl.sum(tl.sum(gram, axis=1), axis=0) / (n * n)   # ‖mean g‖²
        cfm = mean_sq - 2.0 * tl.sum(tl.where(row_ok, dot_ref, 0.0), axis=0) / n + r2
        tl.store(cfm_ptr + grp, cfm)

    return kernel


def feature_rewards(gen, ref, alignment_coef: float = 1.0, diversity_coef: float = 1.0):
    "`feature_rewards_reference` in one Triton program per group (no gradient: rewards are computed under no_grad)."
    import triton
    G, n, D = gen.shape
    gen, ref = gen.detach().contiguous(), ref.detach().contiguous()
    out = [torch.empty(G, n, device=gen.device, dtype=torch.float32) for _ in range(3)]
    cfm = torch.empty(G, device=gen.device, dtype=torch.float32)
    if G == 0: return (*out, cfm)
    n_pad = max(2, triton.next_power_of_2(n))
    block = max(16, min(triton.next_power_of_2(D), 8192 // (n_pad * n_pad)))  # the n x n x BLOCK_D product fits
    _rewards_kernel()[(G,)](gen, ref, *out, cfm, n, float(alignment_coef), float(diversity_coef), D=D,
                            N_PAD=n_pad, BLOCK_D=block)
    return (*out, cfm)


# ------------------------------------------------------------------------------------------------ REINFORCE loss
def reinforce_loss_reference(logps, advantages, mask):
    "The masked policy-gradient mean `Σ -logp·A·m / Σ m` (0 when nothing is masked in); `A` carries no gradient."
    m = mask.float()
    return (-logps * advantages.detach() * m).sum() / m.sum().clamp(min=1)


BLOCK_N = 1024


@functools.cache
def _loss_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def forward(logp_ptr, adv_ptr, mask_ptr, sum_ptr, cnt_ptr, N, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        m = tl.load(mask_ptr + offs, mask=ok, other=0).to(tl.float32)
        lp = tl.load(logp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        a = tl.load(adv_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(sum_ptr + pid, tl.sum(-lp * a * m, axis=0))
        tl.store(cnt_ptr + pid, tl.sum(m, axis=0))

    @triton.jit
    def backward(adv_ptr, mask_ptr, scale_ptr, out_ptr, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        m = tl.load(mask_ptr + offs, mask=ok, other=0).to(tl.float32)
        a = tl.load(adv_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        s = tl.load(scale_ptr)                                  # upstream gradient / Σ m
        tl.store(out_ptr + offs, (-a * m * s).to(out_ptr.dtype.element_ty), mask=ok)

    return forward, backward


class _ReinforceLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logps, advantages, mask):
        import triton
        fwd, _ = _loss_kernels()
        lp, a, m = logps.contiguous().view(-1), advantages.detach().contiguous().view(-1), mask.contiguous().view(-1)
        if m.dtype == torch.bool: m = m.view(torch.uint8)
        N = lp.numel()
        blocks = max(1, triton.cdiv(N, BLOCK_N))
        sums = torch.zeros(blocks, device=lp.device, dtype=torch.float32)
        cnts = torch.zeros(blocks, device=lp.device, dtype=torch.float32)
        if N: fwd[(blocks,)](lp, a, m, sums, cnts, N, BLOCK=BLOCK_N)
        count = cnts.sum().clamp(min=1)
        ctx.save_for_backward(a, m, count)
        ctx.shape, ctx.dtype = logps.shape, logps.dtype
        return sums.sum() / count

    @staticmethod
    def backward(ctx, grad):
        import triton
        _, bwd = _loss_kernels()
        a, m, count = ctx.saved_tensors
        N = a.numel()
        out = torch.empty(N, device=a.device, dtype=ctx.dtype)
        scale = (grad.float() / count).reshape(1)
        if N: bwd[(triton.cdiv(N, BLOCK_N),)](a, m, scale, out, N, BLOCK=BLOCK_N)
        return out.view(ctx.shape), None, None


def reinforce_loss(logps, advantages, mask):
    "`reinforce_loss_reference` as one reduction kernel forward and one elementwise kernel backward."
    return _ReinforceLoss.apply(logps, advantages, mask)
