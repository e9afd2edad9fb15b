"""The fused EBFT kernels against their PyTorch references, on the device given (cpu runs under TRITON_INTERPRET=1).

Run by tests/kernels/test_ebft_kernels.py in a process of its own: Triton's interpreter must be switched on before
Triton is first imported. Prints one line `CHECKED name` per check that passed and raises on the first that fails.
"""
import sys

import torch

from ftlab.kernels import ebft as K

device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
gen = torch.Generator(device="cpu").manual_seed(0)
rnd = lambda *s, dtype=torch.float32: torch.randn(*s, generator=gen).to(device=device, dtype=dtype)


def close(a, b, tol, what):
    a, b = a.double(), b.double()
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(b.abs().max().item() if b.numel() else 0.0, 1.0)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} x {scale:.3g}"


def checked(name): print("CHECKED", name, flush=True)


assert K.available(device), f"the fused kernels cannot run on {device}"

# feature rewards: group sizes 1 (no diversity), 2, 5 (padded to 8), an odd feature size, near-duplicate samples
for n, D in [(1, 33), (2, 64), (5, 257), (4, 6144)]:
    g, r = rnd(9, n, D), rnd(9, D)
    if n > 2: g[:, 2] = g[:, 1] * (1 + 1e-3)
    for a_coef, d_coef in [(1.0, 1.0), (0.5, 2.0)]:
        got, want = K.feature_rewards(g, r, a_coef, d_coef), K.feature_rewards_reference(g, r, a_coef, d_coef)
        for x, y, what in zip(got, want, ("reward", "alignment", "diversity", "cfm")):
            assert x.shape == y.shape, (what, x.shape, y.shape)
            close(x, y, 1e-5, f"{what} n={n} D={D}")
    if n == 1: assert (got[2] == 0).all()
checked("feature_rewards")
g16 = rnd(6, 4, 96, dtype=torch.bfloat16)
r16 = rnd(6, 96, dtype=torch.bfloat16)
for x, y in zip(K.feature_rewards(g16, r16), K.feature_rewards_reference(g16, r16)): close(x, y, 1e-5, "bf16 rewards")
checked("feature_rewards bf16")

# REINFORCE loss and its gradient, float32 and bf16 log-probs, a mask with holes, an empty mask, several blocks
for N, dtype in [(5, torch.float32), (3000, torch.float32), (2500, torch.bfloat16)]:
    lp = rnd(N, dtype=dtype).requires_grad_()
    adv = rnd(N)
    mask = torch.rand(N, generator=gen).to(device) > 0.4
    for m in (mask, torch.zeros_like(mask)):
        got = K.reinforce_loss(lp, adv, m)
        want = K.reinforce_loss_reference(lp, adv, m)
        close(got, want, 1e-5 if dtype == torch.float32 else 1e-2, f"loss N={N} {dtype}")
        (g1,) = torch.autograd.grad(got * 3.0, lp)
        (g2,) = torch.autograd.grad(want * 3.0, lp)
        assert g1.dtype == lp.dtype and g1.shape == lp.shape
        close(g1, g2, 1e-6 if dtype == torch.float32 else 1e-2, f"grad N={N} {dtype}")
lp2 = rnd(4, 3, 7).requires_grad_()
adv2, m2 = rnd(4, 3, 7), torch.rand(4, 3, 7, generator=gen).to(device) > 0.5
close(K.reinforce_loss(lp2, adv2, m2), K.reinforce_loss_reference(lp2, adv2, m2), 1e-5, "loss (4, 3, 7)")
checked("reinforce_loss")

# log-probabilities from the LM head, with the gradient to the hidden states and to a head that trains
dtype = torch.bfloat16 if device == "cuda" else torch.float32
for V, H, bias in [(50, 16, False), (1000, 64, True)]:
    h = rnd(3, 37, H, dtype=dtype).requires_grad_()
    W = (rnd(V, H, dtype=dtype) / H ** 0.5).requires_grad_()
    b = rnd(V, dtype=dtype).requires_grad_() if bias else None
    t = torch.randint(0, V, (3, 37), generator=gen).to(device)
    got, want = K.head_logprobs(h, W, t, b), K.head_logprobs_reference(h, W, t, b)
    assert got.shape == want.shape == t.shape and got.dtype == torch.float32
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    close(got, want, tol, f"logprobs V={V}")
    up = rnd(3, 37)
    leaves = [x for x in (h, W, b) if x is not None]
    for x, y, what in zip(torch.autograd.grad((got * up).sum(), leaves), torch.autograd.grad((want * up).sum(), leaves),
                          ("hidden", "weight", "bias")):
        close(x, y, tol, f"grad {what} V={V}")
checked("head_logprobs")
