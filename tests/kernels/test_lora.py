"""Fused LoRA projection: the autograd Function against plain PyTorch, and patched PEFT models against unpatched ones."""
import copy, subprocess, sys

import pytest
import torch

from ftlab.kernels.lora import (LoRALinearFunction, LoRAGroupFunction, lora_linear, lora_group, lora_reference,
                                apply_fused_lora, remove_fused_lora, fused_lora_summary, lora_eligibility)

TINY = "base_model: ftlab:tiny\nbf16: false\nlora_r: 8\nlora_target_linear: true\ndatasets: [{path: ftlab:data/chat.jsonl}]\n"
N_LINEAR = 4 * 7  # tiny model: 4 layers x q/k/v/o/gate/up/down


def _tensors(dim, bias, dtype, ab_dtype=None, seed=0, n_in=48, n_out=40, r=8):
    g = torch.Generator().manual_seed(seed)
    shape = (6, n_in) if dim == 2 else (2, 5, n_in)
    rnd = lambda *s, dt=dtype: torch.randn(*s, generator=g, dtype=torch.float64).to(dt)
    x = rnd(*shape).requires_grad_()
    W = rnd(n_out, n_in) / n_in ** 0.5
    b = rnd(n_out).requires_grad_() if bias else None
    A = (rnd(r, n_in, dt=ab_dtype or dtype) / n_in ** 0.5).requires_grad_()
    B = rnd(n_out, r, dt=ab_dtype or dtype).requires_grad_()
    return x, W, b, A, B


def _grads(out, leaves, seed=1):
    g = torch.Generator().manual_seed(seed)
    dY = torch.randn(out.shape, generator=g).to(out.dtype)
    leaves = [t for t in leaves if t is not None]
    return torch.autograd.grad(out, leaves, dY)


def _close(a, b, rel):
    "Within `rel` of the reference's magnitude (bf16: rounding grows with the values)."
    a, b = a.double(), b.double()
    return (a - b).abs().max().item() <= rel * max(b.abs().max().item(), 1.0)


# --- the Function ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_function_matches_reference_float32(dim, bias):
    x, W, b, A, B = _tensors(dim, bias, torch.float32)
    y = LoRALinearFunction.apply(x, W, None, b, A, B, 2.0)
    ref = lora_reference(x, W, b, A, B, 2.0)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for g, gr in zip(_grads(y, [x, b, A, B]), _grads(ref, [x, b, A, B])):
        torch.testing.assert_close(g, gr, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_function_bfloat16_with_float32_adapter(dim, bias):
    "bf16 activations and base weight, float32 LoRA master weights: computed in bf16, A/B grads back in float32."
    x, W, b, A, B = _tensors(dim, bias, torch.bfloat16, ab_dtype=torch.float32)
    y = LoRALinearFunction.apply(x, W, None, b, A, B, 0.5)
    assert y.dtype == torch.bfloat16
    grads = _grads(y, [x, b, A, B])
    gx, gA, gB = grads[0], grads[-2], grads[-1]
    assert gx.dtype == torch.bfloat16 and gA.dtype == torch.float32 and gB.dtype == torch.float32
    # reference in float32 on the same (bf16-rounded) values
    x32, W32 = x.detach().float().requires_grad_(), W.float()
    b32 = None if b is None else b.detach().float().requires_grad_()
    A32, B32 = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    ref = lora_reference(x32, W32, b32, A32, B32, 0.5)
    assert _close(y, ref, 2e-2)
    for g, gr in zip(grads, _grads(ref, [x32, b32, A32, B32])):
        assert g.shape == gr.shape
        assert _close(g, gr, 2e-2)


def test_gradcheck_float64():
    for dim, bias in [(2, False), (3, True)]:
        x, W, b, A, B = _tensors(dim, bias, torch.float64, n_in=7, n_out=5, r=3)
        f = (lambda x, A, B, b: LoRALinearFunction.apply(x, W, None, b, A, B, 0.7)) if bias else \
            (lambda x, A, B: LoRALinearFunction.apply(x, W, None, None, A, B, 0.7))
        assert torch.autograd.gradcheck(f, (x, A, B, b) if bias else (x, A, B))


def test_function_only_some_inputs_need_grad_and_no_grad():
    x, W, b, A, B = _tensors(3, True, torch.float32)
    x = x.detach()  # e.g. the first projection after a frozen embedding
    b = b.detach()
    y = LoRALinearFunction.apply(x, W, None, b, A, B, 1.5)
    gA, gB = _grads(y, [A, B])
    rA, rB = _grads(lora_reference(x, W, b, A, B, 1.5), [A, B])
    torch.testing.assert_close(gA, rA, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gB, rB, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        y = LoRALinearFunction.apply(x, W, None, b, A, B, 1.5)
    assert y.grad_fn is None
    torch.testing.assert_close(y, lora_reference(x, W, b, A, B, 1.5).detach(), atol=1e-5, rtol=1e-5)


def test_lora_linear_under_autocast_computes_in_bf16():
    x, W, b, A, B = _tensors(3, False, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, W, b, A, B, 1.0)
    assert y.dtype == torch.bfloat16
    assert _close(y.float(), lora_reference(x, W, b, A, B, 1.0), 2e-2)
    gx, gA, gB = _grads(y, [x, A, B])
    assert gx.dtype == torch.float32 and gA.dtype == torch.float32 and gB.dtype == torch.float32


def _saved_shapes(fn):
    "Shapes and dtypes of every tensor autograd saves while running `fn()`."
    saved = []
    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_function_4bit_dequantizes_and_saves_no_dense_weight(dtype):
    import bitsandbytes.functional as bnbf
    x, W, b, A, B = _tensors(3, False, dtype, ab_dtype=torch.float32, n_in=64, n_out=32)
    packed, qs = bnbf.quantize_4bit(W, quant_type="nf4")
    Wd = bnbf.dequantize_4bit(packed, qs)
    y, saved = _saved_shapes(lambda: LoRALinearFunction.apply(x, packed, qs, None, A, B, 2.0))
    assert not any(s == tuple(W.shape) or (len(s) == 2 and s[0] * s[1] >= W.numel() and dt.is_floating_point)
                   for s, dt in saved), saved
    ref = lora_reference(x, Wd, None, A, B, 2.0)
    rel = 1e-5 if dtype == torch.float32 else 2e-2
    assert _close(y, ref, rel)
    for g, gr in zip(_grads(y, [x, A, B]), _grads(ref, [x, A, B])):
        assert _close(g, gr, rel)


# --- the group Function (projections sharing one input) ------------------------------------------------------

def _group_tensors(dtype, ab_dtype=None, biases=(False, True, False), outs=(40, 16, 24), rs=(8, 4, 8), dim=3,
                   n_in=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, dt=dtype: torch.randn(*s, generator=g, dtype=torch.float64).to(dt)
    x = rnd(*((6, n_in) if dim == 2 else (2, 5, n_in))).requires_grad_()
    Ws = [rnd(o, n_in) / n_in ** 0.5 for o in outs]
    bs = [rnd(o).requires_grad_() if b else None for o, b in zip(outs, biases)]
    As = [(rnd(r, n_in, dt=ab_dtype or dtype) / n_in ** 0.5).requires_grad_() for r in rs]
    Bs = [rnd(o, r, dt=ab_dtype or dtype).requires_grad_() for o, r in zip(outs, rs)]
    return x, Ws, bs, As, Bs


def _group_refs(x, Ws, bs, As, Bs, scales):
    return [lora_reference(x, W, b, A, B, s) for W, b, A, B, s in zip(Ws, bs, As, Bs, scales)]


def _group_grads(ys, leaves, seed=1):
    g = torch.Generator().manual_seed(seed)
    dys = [torch.randn(y.shape, generator=g).to(y.dtype) for y in ys]
    leaves = [t for t in leaves if t is not None]
    return torch.autograd.grad(ys, leaves, dys)


@pytest.mark.parametrize("dim", [2, 3])
def test_group_matches_reference_float32(dim):
    x, Ws, bs, As, Bs = _group_tensors(torch.float32, dim=dim)
    scales = (2.0, 0.5, 1.0)
    ys = LoRAGroupFunction.apply(x, 3, (None,) * 3, scales, *Ws, *bs, *As, *Bs)
    refs = _group_refs(x, Ws, bs, As, Bs, scales)
    for y, r in zip(ys, refs):
        assert y.shape == r.shape
        torch.testing.assert_close(y, r, atol=1e-5, rtol=1e-5)
    leaves = [x, *bs, *As, *Bs]
    for g, gr in zip(_group_grads(ys, leaves), _group_grads(refs, leaves)):
        torch.testing.assert_close(g, gr, atol=1e-5, rtol=1e-5)


def test_group_gradcheck_float64():
    x, Ws, bs, As, Bs = _group_tensors(torch.float64, outs=(5, 3), rs=(3, 2), biases=(True, False), n_in=7)
    def f(x, b0, A0, A1, B0, B1):
        return LoRAGroupFunction.apply(x, 2, (None, None), (0.7, 1.3), *Ws, b0, None, A0, A1, B0, B1)
    assert torch.autograd.gradcheck(f, (x, bs[0], *As, *Bs))


def test_group_unused_output_and_frozen_input():
    "A member whose output feeds nothing gets no gradient (its A/B grads are None), the others are exact."
    x, Ws, bs, As, Bs = _group_tensors(torch.float32, biases=(False, False, False))
    scales = (1.0, 1.0, 2.0)
    ys = LoRAGroupFunction.apply(x, 3, (None,) * 3, scales, *Ws, *bs, *As, *Bs)
    refs = _group_refs(x, Ws, bs, As, Bs, scales)
    loss, ref_loss = ys[0].sum() + (ys[2] ** 2).sum(), refs[0].sum() + (refs[2] ** 2).sum()
    got = torch.autograd.grad(loss, [x, *As, *Bs], allow_unused=True)
    want = torch.autograd.grad(ref_loss, [x, *As, *Bs], allow_unused=True)
    for g, w in zip(got, want):
        if w is None or not w.abs().sum():
            assert g is None or not g.abs().sum()
        else:
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    xd = x.detach()
    ys = LoRAGroupFunction.apply(xd, 3, (None,) * 3, scales, *Ws, *bs, *As, *Bs)
    refs = _group_refs(xd, Ws, bs, As, Bs, scales)
    for g, w in zip(_group_grads(ys, [*As, *Bs]), _group_grads(refs, [*As, *Bs])):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_group_bfloat16_with_float32_adapter_and_autocast():
    x, Ws, bs, As, Bs = _group_tensors(torch.bfloat16, ab_dtype=torch.float32)
    scales = (2.0, 0.5, 1.0)
    ys = LoRAGroupFunction.apply(x, 3, (None,) * 3, scales, *Ws, *bs, *As, *Bs)
    leaves = [x, *bs, *As, *Bs]
    grads = _group_grads(ys, leaves)
    assert all(y.dtype == torch.bfloat16 for y in ys)
    assert all(g.dtype == torch.float32 for g in grads[-6:])
    x32 = x.detach().float().requires_grad_()
    b32 = [None if b is None else b.detach().float().requires_grad_() for b in bs]
    A32 = [A.detach().clone().requires_grad_() for A in As]
    B32 = [B.detach().clone().requires_grad_() for B in Bs]
    refs = _group_refs(x32, [W.float() for W in Ws], b32, A32, B32, scales)
    for y, r in zip(ys, refs): assert _close(y, r, 2e-2)
    for g, gr in zip(grads, _group_grads(refs, [x32, *b32, *A32, *B32])):
        assert g.shape == gr.shape and _close(g, gr, 2e-2)
    # lora_group under autocast computes in bf16 from float32 inputs
    x, Ws, bs, As, Bs = _group_tensors(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ys = lora_group(x, Ws, bs, As, Bs, scales)
    assert all(y.dtype == torch.bfloat16 for y in ys)
    for y, r in zip(ys, _group_refs(x, Ws, bs, As, Bs, scales)): assert _close(y.float(), r, 2e-2)


def test_group_4bit_saves_no_dense_weight():
    import bitsandbytes.functional as bnbf
    x, Ws, bs, As, Bs = _group_tensors(torch.float32, biases=(False, False), outs=(32, 64), rs=(8, 8), n_in=64)
    packed = [bnbf.quantize_4bit(W, quant_type="nf4") for W in Ws]
    Wd = [bnbf.dequantize_4bit(p, qs) for p, qs in packed]
    ys, saved = _saved_shapes(lambda: LoRAGroupFunction.apply(x, 2, tuple(qs for _, qs in packed), (2.0, 2.0),
                                                              *[p for p, _ in packed], None, None, *As, *Bs))
    assert not [sh for sh, dt in saved if sh in {tuple(W.shape) for W in Ws}], saved
    refs = _group_refs(x, Wd, bs, As, Bs, (2.0, 2.0))
    for y, r in zip(ys, refs): assert _close(y, r, 1e-5)
    for g, gr in zip(_group_grads(ys, [x, *As, *Bs]), _group_grads(refs, [x, *As, *Bs])): assert _close(g, gr, 1e-5)


def test_import_needs_no_triton():
    code = "import sys, ftlab.kernels.lora; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


# --- on the tiny PEFT model --------------------------------------------------------------------------------

def peft_model(extra="", b_seed=0):
    import peft
    from ftlab.config import load_config
    from ftlab.model import load_model, lora_config
    cfg = load_config(TINY + (extra if "adapter:" in extra else "adapter: lora\n" + extra))
    torch.manual_seed(0)
    model = peft.get_peft_model(load_model(cfg), lora_config(cfg))
    g = torch.Generator().manual_seed(b_seed)
    with torch.no_grad():  # PEFT starts B at zero, which would hide half of the maths
        for n, p in model.named_parameters():
            if "lora_B" in n: p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _batch(seed=0, shape=(2, 16)):
    ids = torch.randint(4, 1024, shape, generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, labels=ids.clone())


def _fused_nodes(t, groups=False):
    """How many projections the fused LoRA nodes of the autograd graph behind `t` compute (a group node counts
    its members); with `groups`, also the number of group nodes."""
    seen, todo, n, g_n = set(), [t.grad_fn], 0, 0
    while todo:
        f = todo.pop()
        if f is None or f in seen: continue
        seen.add(f)
        name = type(f).__name__
        n += name in ("LoRALinearFunctionBackward", "LoRASwiGLUDownFunctionBackward")
        if name == "LoRAGroupFunctionBackward":
            n += f.k                                    # the node is the Function's ctx: its member count
            g_n += 1
        todo.extend(g for g, _ in f.next_functions)
    return (n, g_n) if groups else n


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}


@pytest.fixture(scope="module")
def pair():
    "(unpatched, patched, number patched) tiny LoRA models with the same weights."
    ref = peft_model()
    fused = copy.deepcopy(ref)
    n = apply_fused_lora(fused)
    return ref, fused, n


def test_patches_every_linear_and_matches_peft(pair):
    ref, fused, n = pair
    assert n == N_LINEAR
    s = fused_lora_summary(fused)
    assert len(s["patched"]) == N_LINEAR and s["skipped"] == {}
    assert all("_ftlab_peft_forward" not in m.__dict__ for m in ref.modules())
    batch = _batch()
    for m in (ref, fused): m.train(); m.zero_grad()
    out_r, out_f = ref(**batch), fused(**batch)
    assert _fused_nodes(out_f.loss) == N_LINEAR and _fused_nodes(out_r.loss) == 0
    torch.testing.assert_close(out_f.logits, out_r.logits, atol=1e-5, rtol=1e-5)
    out_r.loss.backward(); out_f.loss.backward()
    gr, gf = lora_grads(ref), lora_grads(fused)
    assert gr.keys() == gf.keys() and len(gr) == 2 * N_LINEAR
    for k in gr:
        torch.testing.assert_close(gf[k], gr[k], atol=1e-5, rtol=1e-4, msg=k)
    assert any(g.abs().sum() > 0 for k, g in gf.items() if "lora_A" in k)


def test_shared_input_groups_and_switch(pair):
    "q/k/v and gate/up of each layer run as one node each; share_input=False gives one node per projection."
    ref, fused, _ = pair
    assert fused_lora_summary(fused)["shared_input_groups"] == 8        # 4 layers x (qkv, gate/up)
    batch = _batch(11)
    out = fused(**batch)
    assert _fused_nodes(out.loss, groups=True) == (N_LINEAR, 8)
    solo = copy.deepcopy(ref)
    assert apply_fused_lora(solo, share_input=False) == N_LINEAR
    assert fused_lora_summary(solo)["shared_input_groups"] == 0
    out_s = solo(**batch)
    assert _fused_nodes(out_s.loss, groups=True) == (N_LINEAR, 0)
    torch.testing.assert_close(out_s.logits, out.logits, atol=1e-5, rtol=1e-5)


def test_group_member_called_alone_or_on_other_input(pair):
    "A member called with a tensor its group did not compute on gets its own output, not a stale one."
    _, fused, _ = pair
    attn = fused.base_model.model.model.layers[0].self_attn
    ref_attn = pair[0].base_model.model.model.layers[0].self_attn
    h = attn.q_proj.in_features
    x1, x2 = torch.randn(1, 3, h), torch.randn(1, 3, h)
    with torch.no_grad():
        q1 = attn.q_proj(x1)                  # computes q, k, v on x1; k and v wait for their call
        k2 = attn.k_proj(x2)                  # another input: computed alone
        torch.testing.assert_close(k2, ref_attn.k_proj(x2), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(q1, ref_attn.q_proj(x1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(attn.v_proj(x1), ref_attn.v_proj(x1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(attn.k_proj(x1), ref_attn.k_proj(x1), atol=1e-5, rtol=1e-5)
        attn.k_proj(x1)                       # a second call on the same input computes again
        assert not attn.q_proj._ftlab_group.pending or attn.q_proj._ftlab_group.x is x1


def test_eval_no_grad_and_disable_adapter(pair):
    ref, fused, _ = pair
    batch = _batch(1)
    for m in (ref, fused): m.eval()
    with torch.no_grad():
        lr, lf = ref(**batch).logits, fused(**batch).logits
        torch.testing.assert_close(lf, lr, atol=1e-5, rtol=1e-5)
        with fused.disable_adapter():
            base_f = fused(**batch).logits
        with ref.disable_adapter():
            base_r = ref(**batch).logits
    torch.testing.assert_close(base_f, base_r, atol=1e-5, rtol=1e-5)
    assert (base_f - lf).abs().max() > 1e-3  # the adapter does something, and disabling it took it away
    with torch.no_grad():
        torch.testing.assert_close(fused(**batch).logits, lf, atol=0, rtol=0)  # and it is back after the context


def test_optimizer_steps_give_same_losses():
    ref = peft_model(b_seed=3)
    fused = copy.deepcopy(ref)
    assert apply_fused_lora(fused) == N_LINEAR
    losses = {}
    for name, m in (("ref", ref), ("fused", fused)):
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
        losses[name] = []
        for step in range(4):
            loss = m(**_batch(step)).loss
            loss.backward(); opt.step(); opt.zero_grad()
            losses[name].append(loss.item())
    assert losses["ref"][-1] != losses["ref"][0]
    for a, b in zip(losses["fused"], losses["ref"]):
        assert abs(a - b) <= 1e-5, losses


def test_save_adapter_and_merge_and_unload(pair, tmp_path):
    from safetensors.torch import load_file
    ref, fused, _ = pair
    fused.save_pretrained(tmp_path / "fused"); ref.save_pretrained(tmp_path / "ref")
    sf, sr = load_file(tmp_path / "fused" / "adapter_model.safetensors"), load_file(tmp_path / "ref" / "adapter_model.safetensors")
    assert sf.keys() == sr.keys() and len(sf) == 2 * N_LINEAR
    for k in sf: assert torch.equal(sf[k], sr[k]), k
    batch = _batch(2)
    with torch.no_grad():
        fused.eval()
        want = fused(**batch).logits
        merged = copy.deepcopy(fused).merge_and_unload()
        got = merged(**batch).logits
    assert not any("_ftlab_peft_forward" in m.__dict__ for m in merged.modules())
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_merged_layers_fall_back_and_remove_restores(pair):
    ref, fused, _ = pair
    m = copy.deepcopy(fused)
    batch = _batch(4)
    m.eval()
    with torch.no_grad():
        want = m(**batch).logits
        m.merge_adapter()  # merged in place: patched forwards must not add the LoRA term again
        torch.testing.assert_close(m(**batch).logits, want, atol=1e-4, rtol=1e-4)
        m.unmerge_adapter()
        torch.testing.assert_close(m(**batch).logits, want, atol=1e-5, rtol=1e-5)
    assert remove_fused_lora(m) == N_LINEAR
    assert not any("_ftlab_peft_forward" in mod.__dict__ for mod in m.modules())
    with torch.no_grad():
        torch.testing.assert_close(m(**batch).logits, want, atol=1e-5, rtol=1e-5)


def test_which_groups_and_idempotent():
    m = peft_model()
    assert apply_fused_lora(m, which=("o",)) == 4
    s = fused_lora_summary(m)
    assert all(n.endswith("o_proj") for n in s["patched"])
    assert sum("not asked for" in r for r in s["skipped"].values()) == N_LINEAR - 4
    assert apply_fused_lora(m, which="mlp") == 12
    assert apply_fused_lora(m) == N_LINEAR  # the o and mlp layers already patched count, nothing patched twice
    with pytest.raises(ValueError, match="unknown projection groups"):
        apply_fused_lora(m, which=("attn",))


@pytest.mark.parametrize("extra, reason", [("lora_dropout: 0.1\n", "lora_dropout > 0"),
                                           ("peft_use_dora: true\n", "DoRA")])
def test_ineligible_layers_left_alone(extra, reason):
    m = peft_model(extra)
    assert apply_fused_lora(m) == 0
    s = fused_lora_summary(m)
    assert len(s["skipped"]) == N_LINEAR and set(s["skipped"].values()) == {reason}
    assert not any("_ftlab_peft_forward" in mod.__dict__ for mod in m.modules())


def test_two_active_adapters_not_eligible(pair):
    import peft
    m = copy.deepcopy(pair[0])
    m.add_adapter("second", peft.LoraConfig(r=4, target_modules=["q_proj"]))
    m.base_model.set_adapter(["default", "second"])
    q = m.base_model.model.model.layers[0].self_attn.q_proj
    assert lora_eligibility(q).startswith("2 active adapters")
    assert lora_eligibility(m.base_model.model.model.layers[0].self_attn.o_proj) is None
    # a model patched before the second adapter became active falls back to PEFT on q_proj, fuses the rest
    f = copy.deepcopy(pair[0])
    assert apply_fused_lora(f) == N_LINEAR
    f.add_adapter("second", peft.LoraConfig(r=4, target_modules=["q_proj"]))
    f.load_state_dict(m.state_dict())
    f.base_model.set_adapter(["default", "second"])
    batch = _batch(7)
    out_m, out_f = m(**batch), f(**batch)
    assert _fused_nodes(out_f.loss) == N_LINEAR - 4
    torch.testing.assert_close(out_f.logits, out_m.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(pair, reentrant):
    ref, fused = (copy.deepcopy(m) for m in pair[:2])
    batch = _batch(8)
    grads = []
    for m in (ref, fused):
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        m.enable_input_require_grads()
        m(**batch).loss.backward()
        grads.append(lora_grads(m))
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-5, rtol=1e-4, msg=k)


def test_autocast_bf16_matches_peft(pair):
    ref, fused, _ = pair
    batch = _batch(5)
    for m in (ref, fused): m.train(); m.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_r, out_f = ref(**batch), fused(**batch)
    assert _close(out_f.logits.float(), out_r.logits.float(), 3e-2)
    out_r.loss.backward(); out_f.loss.backward()
    gr, gf = lora_grads(ref), lora_grads(fused)
    for k in gr:
        assert gf[k].dtype == torch.float32
        assert _close(gf[k], gr[k], 5e-2), k


# --- QLoRA: bitsandbytes nf4 on CPU -------------------------------------------------------------------------

def test_qlora_matches_peft_and_saves_no_dequantized_weight():
    import bitsandbytes as bnb
    ref = peft_model("load_in_4bit: true\nadapter: qlora\n")
    fused = copy.deepcopy(ref)
    assert apply_fused_lora(fused) == N_LINEAR
    layers4 = [m for m in fused.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers4) == N_LINEAR
    dense = {(m.out_features, m.in_features) for m in layers4}
    dev = ref.get_input_embeddings().weight.device    # transformers puts a 4-bit model on the GPU when there is one
    batch = {k: v.to(dev) for k, v in _batch(6).items()}
    for m in (ref, fused): m.train(); m.zero_grad()
    out_r = ref(**batch)
    out_f, saved = _saved_shapes(lambda: fused(**batch))
    assert not [s for s, dt in saved if s in dense and dt.is_floating_point], "a dequantized weight was saved"
    assert _fused_nodes(out_f.loss) == N_LINEAR
    assert _close(out_f.logits, out_r.logits, 1e-3)
    out_r.loss.backward(); out_f.loss.backward()
    gr, gf = lora_grads(ref), lora_grads(fused)
    assert gr.keys() == gf.keys() and len(gr) == 2 * N_LINEAR
    for k in gr:
        assert _close(gf[k], gr[k], 1e-3), k
    # the unpatched QLoRA path, by contrast, is checked to be what we compare against: same loss
    assert abs(out_f.loss.item() - out_r.loss.item()) < 1e-4


# --- on the GPU (skipped without CUDA): bf16 forward and backward at realistic sizes ---------------------------

gpu = pytest.mark.gpu


def _gpu_tensors(n_tok=4096, n_in=4096, n_out=1024, r=16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.float32)
    x = rnd(2, n_tok // 2, n_in).bfloat16().requires_grad_()
    W = (rnd(n_out, n_in) / n_in ** 0.5).bfloat16()
    A = (rnd(r, n_in) / n_in ** 0.5).requires_grad_()          # float32 master weights, as PEFT keeps them
    B = (rnd(n_out, r) * 0.05).requires_grad_()
    return x, W, A, B


def _vs_float32(y, x, Wd, A, B, s, rel):
    "Output and gradients of the bf16 computation against float32 maths on the same (bf16-rounded) inputs."
    g = torch.Generator(device="cuda").manual_seed(1)
    dY = torch.randn(y.shape, generator=g, device="cuda").bfloat16()
    got = torch.autograd.grad(y, [x, A, B], dY)
    x32 = x.detach().float().requires_grad_()
    A32, B32 = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    ref = lora_reference(x32, Wd.float(), None, A32, B32, s)
    want = torch.autograd.grad(ref, [x32, A32, B32], dY.float())
    assert y.dtype == torch.bfloat16 and _close(y, ref, rel)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == got[2].dtype == torch.float32
    for name, a, b in zip(("dx", "dA", "dB"), got, want):
        assert _close(a, b, rel), name


@gpu
def test_gpu_function_bf16_forward_backward():
    x, W, A, B = _gpu_tensors()
    y = LoRALinearFunction.apply(x, W, None, None, A, B, 2.0)
    _vs_float32(y, x, W, A, B, 2.0, 2e-2)


@gpu
def test_gpu_function_nf4_forward_backward():
    import bitsandbytes.functional as bnbf
    x, W, A, B = _gpu_tensors(n_out=2048)
    packed, qs = bnbf.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
    Wd = bnbf.dequantize_4bit(packed, qs)
    y, saved = _saved_shapes(lambda: LoRALinearFunction.apply(x, packed, qs, None, A, B, 2.0))
    assert not [sh for sh, dt in saved if sh == tuple(W.shape)], "a dequantized weight was saved"
    _vs_float32(y, x, Wd, A, B, 2.0, 2e-2)


@gpu
def test_gpu_peft_model_bf16_matches_peft():
    ref = peft_model()
    ref = ref.to("cuda", torch.bfloat16)
    for n, p in ref.named_parameters():
        if "lora_" in n: p.data = p.data.float()               # PEFT's float32 adapters beside a bf16 base
    fused = copy.deepcopy(ref)
    assert apply_fused_lora(fused) == N_LINEAR
    batch = {k: v.cuda() for k, v in _batch(3, (2, 64)).items()}
    for m in (ref, fused): m.train(); m.zero_grad()
    out_r, out_f = ref(**batch), fused(**batch)
    assert _fused_nodes(out_f.loss) == N_LINEAR
    assert _close(out_f.logits.float(), out_r.logits.float(), 3e-2)
    assert abs(out_f.loss.item() - out_r.loss.item()) < 2e-2
    out_r.loss.backward(); out_f.loss.backward()
    gr, gf = lora_grads(ref), lora_grads(fused)
    for k in gr:
        assert gf[k].dtype == torch.float32
        assert _close(gf[k], gr[k], 5e-2), k


@gpu
def test_gpu_group_bf16_and_nf4_forward_backward():
    "q/k/v-shaped group (4096 -> 4096, 1024, 1024), bf16 and nf4 bases, against float32 maths."
    import bitsandbytes.functional as bnbf
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.float32)
    n_in, outs, r = 4096, (4096, 1024, 1024), 16
    x = rnd(2, 2048, n_in).bfloat16().requires_grad_()
    Ws = [(rnd(o, n_in) / n_in ** 0.5).bfloat16() for o in outs]
    As = [(rnd(r, n_in) / n_in ** 0.5).requires_grad_() for _ in outs]
    Bs = [(rnd(o, r) * 0.05).requires_grad_() for o in outs]
    scales = (2.0, 2.0, 2.0)
    for quant in (False, True):
        if quant:
            packed = [bnbf.quantize_4bit(W, quant_type="nf4", compress_statistics=True) for W in Ws]
            args, qss = [p for p, _ in packed], tuple(q for _, q in packed)
            Wd = [bnbf.dequantize_4bit(p, q) for p, q in packed]
        else:
            args, qss, Wd = Ws, (None,) * 3, Ws
        ys = LoRAGroupFunction.apply(x, 3, qss, scales, *args, None, None, None, *As, *Bs)
        dys = [torch.randn(y.shape, generator=g, device="cuda").bfloat16() for y in ys]
        got = torch.autograd.grad(ys, [x, *As, *Bs], dys)
        x32 = x.detach().float().requires_grad_()
        A32 = [A.detach().clone().requires_grad_() for A in As]
        B32 = [B.detach().clone().requires_grad_() for B in Bs]
        refs = [lora_reference(x32, W.float(), None, A, B, s) for W, A, B, s in zip(Wd, A32, B32, scales)]
        want = torch.autograd.grad(refs, [x32, *A32, *B32], [d.float() for d in dys])
        for y, ref in zip(ys, refs): assert y.dtype == torch.bfloat16 and _close(y, ref, 2e-2)
        for i, (a, b) in enumerate(zip(got, want)): assert _close(a, b, 2e-2), (quant, i)


# --- the other architectures the kernels are on by default for --------------------------------------------

@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_default_architectures_match_peft(model_type):
    """Mistral, Qwen2 (q/k/v with a bias) and Qwen3 (q/k norms): random-init two-layer models with LoRA on every
    linear layer; every projection is fused, in groups, and logits and LoRA gradients match PEFT's."""
    import peft
    from transformers import AutoConfig, AutoModelForCausalLM
    from ftlab.methods.kernel_choice import KERNEL_ARCHS
    assert model_type in KERNEL_ARCHS
    cfg = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    ref = peft.get_peft_model(AutoModelForCausalLM.from_config(cfg), peft.LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n: p.copy_(torch.randn(p.shape) * 0.05)
    fused = copy.deepcopy(ref)
    assert apply_fused_lora(fused) == 2 * 7 and fused_lora_summary(fused)["shared_input_groups"] == 4
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    out_r, out_f = ref(input_ids=ids, labels=ids), fused(input_ids=ids, labels=ids)
    assert _fused_nodes(out_f.loss) == 2 * 7
    torch.testing.assert_close(out_f.logits, out_r.logits, atol=1e-5, rtol=1e-5)
    out_r.loss.backward(); out_f.loss.backward()
    gr, gf = lora_grads(ref), lora_grads(fused)
    assert gr.keys() == gf.keys() and len(gr) == 4 * 7
    for k in gr: torch.testing.assert_close(gf[k], gr[k], atol=1e-5, rtol=1e-4, msg=k)


def test_fused_projections_compile_without_graph_breaks(pair):
    """GRPO's compiled generation (`cache_implementation: static` + `disable_compile: false`) compiles the model's
    forward with the fused projections in it: dynamo traces them whole (the grouped q/k/v and gate/up too) and the
    compiled forward gives PEFT's logits on new inputs (no stale group output)."""
    from torch._dynamo.utils import counters
    ref, fused, _ = pair
    torch._dynamo.reset(); counters.clear()
    compiled = torch.compile(fused, backend="aot_eager")
    with torch.no_grad():
        for seed in (1, 2):
            batch = _batch(seed)
            torch.testing.assert_close(compiled(input_ids=batch["input_ids"]).logits, ref(input_ids=batch["input_ids"]).logits,
                                       atol=1e-5, rtol=1e-5)
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()


def _saved_bytes(model, batch) -> int:
    "Bytes of distinct storage autograd keeps for the backward of one forward of `model` on `batch`."
    seen = {}
    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).loss
    return sum(seen.values())


def test_the_swiglu_runs_inside_the_down_projection_and_keeps_one_activation_less(pair):
    """Each SwiGLU MLP whose three projections are fused computes `silu(gate) * up` inside the down projection's node:
    the same outputs and gradients as PEFT's (the test above), and fewer (tokens x intermediate) activations kept for
    the backward than with the SwiGLU and the projection apart. Apart, with PyTorch's SwiGLU (as on a CPU), autograd
    keeps gate, silu(gate), up and the product; inside the node only gate and up: two fewer per layer. (With Liger's
    SwiGLU on a GPU, which keeps only gate and up itself, it is one fewer: the product.)"""
    ref, fused, _ = pair
    cfg = fused.config
    assert fused_lora_summary(fused)["swiglu_mlps"] == [f"base_model.model.model.layers.{i}.mlp" for i in range(cfg.num_hidden_layers)]
    apart = copy.deepcopy(ref)
    apply_fused_lora(apart)
    from ftlab.kernels.lora import remove_fused_lora
    for name in fused_lora_summary(apart)["swiglu_mlps"]:       # the MLPs back to their own forward, projections still fused
        mlp = apart.get_submodule(name)
        del mlp.forward; mlp.__dict__.pop("_ftlab_mlp_forward"); mlp.__dict__.pop("_ftlab_own_forward")
    batch = _batch()
    tokens = batch["input_ids"].numel()
    itemsize = next(fused.parameters()).element_size()
    saved = _saved_bytes(apart, batch) - _saved_bytes(fused, batch)
    assert saved == 2 * cfg.num_hidden_layers * tokens * cfg.intermediate_size * itemsize, saved
    restored = copy.deepcopy(fused)
    assert remove_fused_lora(restored) == N_LINEAR and all("forward" not in m.__dict__ for m in restored.modules())


def test_the_fused_mlp_comes_back_after_liger_binds_its_own(pair):
    """transformers applies Liger's kernels inside `train()`, binding Liger's MLP forward over ftlab's; the callback ftlab
    adds when both are on gives the MLPs the fused forward again at the start of training, Liger's as its fallback."""
    from types import SimpleNamespace
    from liger_kernel.transformers.monkey_patch import _patch_swiglu_module
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    from ftlab.model import fused_lora_callback
    _, fused, _ = pair
    m = copy.deepcopy(fused)
    names = fused_lora_summary(m)["swiglu_mlps"]
    for name in names: _patch_swiglu_module(m.get_submodule(name), LigerSwiGLUMLP)   # what train() does
    liger = m.get_submodule(names[0]).forward
    assert liger.__func__ is LigerSwiGLUMLP.forward
    cfg = SimpleNamespace(adapter="lora", use_liger_kernel=True, lora_qkv_kernel=True, lora_o_kernel=True, lora_mlp_kernel=True)
    assert fused_lora_callback(SimpleNamespace(**{**vars(cfg), "use_liger_kernel": False})) is None
    fused_lora_callback(cfg).on_train_begin(None, None, None, model=m)
    mlp = m.get_submodule(names[0])
    assert mlp.forward.__func__.__name__ == "_swiglu_mlp_forward" and mlp._ftlab_mlp_forward.__func__ is LigerSwiGLUMLP.forward
    assert fused_lora_summary(m)["swiglu_mlps"] == names
    batch = _batch(3)
    m.train(); fused.train()
    torch.testing.assert_close(m(**batch).logits, fused(**batch).logits)
