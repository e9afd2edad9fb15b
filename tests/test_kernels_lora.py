"""Fused LoRA projection: the autograd Function against plain PyTorch, and patched PEFT models against unpatched ones."""
import copy, subprocess, sys

import pytest
import torch

from ftlab.kernels.lora import (LoRALinearFunction, lora_linear, lora_reference, apply_fused_lora, remove_fused_lora,
                                fused_lora_summary, lora_eligibility)

TINY = "base_model: ftlab:tiny\nlora_r: 8\nlora_target_linear: true\ndatasets: [{path: ftlab:data/chat.jsonl}]\n"
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


def test_import_needs_no_triton():
    code = "import sys, ftlab.kernels.lora; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


# --- on the tiny PEFT model --------------------------------------------------------------------------------

def _peft_model(extra="", b_seed=0):
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


def _fused_nodes(t) -> int:
    "How many fused LoRA nodes the autograd graph behind `t` holds."
    seen, todo, n = set(), [t.grad_fn], 0
    while todo:
        f = todo.pop()
        if f is None or f in seen: continue
        seen.add(f)
        n += type(f).__name__ == "LoRALinearFunctionBackward"
        todo.extend(g for g, _ in f.next_functions)
    return n


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}


@pytest.fixture(scope="module")
def pair():
    "(unpatched, patched, number patched) tiny LoRA models with the same weights."
    ref = _peft_model()
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
    gr, gf = _lora_grads(ref), _lora_grads(fused)
    assert gr.keys() == gf.keys() and len(gr) == 2 * N_LINEAR
    for k in gr:
        torch.testing.assert_close(gf[k], gr[k], atol=1e-5, rtol=1e-4, msg=k)
    assert any(g.abs().sum() > 0 for k, g in gf.items() if "lora_A" in k)


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
    ref = _peft_model(b_seed=3)
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
    m = _peft_model()
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
    m = _peft_model(extra)
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
        grads.append(_lora_grads(m))
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
    gr, gf = _lora_grads(ref), _lora_grads(fused)
    for k in gr:
        assert gf[k].dtype == torch.float32
        assert _close(gf[k], gr[k], 5e-2), k


# --- QLoRA: bitsandbytes nf4 on CPU -------------------------------------------------------------------------

def test_qlora_matches_peft_and_saves_no_dequantized_weight():
    import bitsandbytes as bnb
    ref = _peft_model("load_in_4bit: true\nadapter: qlora\n")
    fused = copy.deepcopy(ref)
    assert apply_fused_lora(fused) == N_LINEAR
    layers4 = [m for m in fused.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers4) == N_LINEAR
    dense = {(m.out_features, m.in_features) for m in layers4}
    batch = _batch(6)
    for m in (ref, fused): m.train(); m.zero_grad()
    out_r = ref(**batch)
    out_f, saved = _saved_shapes(lambda: fused(**batch))
    assert not [s for s, dt in saved if s in dense and dt.is_floating_point], "a dequantized weight was saved"
    assert _fused_nodes(out_f.loss) == N_LINEAR
    assert _close(out_f.logits, out_r.logits, 1e-3)
    out_r.loss.backward(); out_f.loss.backward()
    gr, gf = _lora_grads(ref), _lora_grads(fused)
    assert gr.keys() == gf.keys() and len(gr) == 2 * N_LINEAR
    for k in gr:
        assert _close(gf[k], gr[k], 1e-3), k
    # the unpatched QLoRA path, by contrast, is checked to be what we compare against: same loss
    assert abs(out_f.loss.item() - out_r.loss.item()) < 1e-4
