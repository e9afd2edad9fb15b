"""Long sequences: checkpointed layer inputs offloaded to host memory, and the tiled MLP, against plain checkpointing."""
import copy

import pytest
import torch

from ftlab.config import load_config
from ftlab.errors import ConfigError
from ftlab.kernels import long_context as lc
from ftlab.kernels.long_context import (HOST_BUFFERS, apply_offloaded_checkpointing, apply_tiled_mlp,
                                        offloaded_checkpoint, remove_tiled_mlp)
from test_lora import peft_model, lora_grads
from run_helpers import LORA, logs

N_LAYERS = 4  # the tiny model


def enable_checkpointing(peft_model):
    "torch's non-reentrant checkpointing on every layer (the method's name changed in transformers 5.18)."
    base = peft_model.base_model.model
    (getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable)({"use_reentrant": False})


def _checkpointed(extra=""):
    m = peft_model(extra)
    enable_checkpointing(m)
    m.enable_input_require_grads()
    return m.train()


def _step(model, seq=40, seed=123):
    "Loss and LoRA gradients of one forward/backward on a fixed batch, the RNG seeded the same way each time."
    model.zero_grad()
    ids = torch.randint(4, 1024, (2, seq), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(seed)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.item(), lora_grads(model)


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(autouse=True)
def _release_host_buffers():
    yield
    HOST_BUFFERS.release()


def test_offloaded_checkpoint_matches_checkpointing_with_dropout():
    "Dropout draws the same masks in the recomputation (RNG replayed), so loss and gradients are exactly PEFT's."
    ref = _checkpointed("lora_dropout: 0.1\n")
    off = copy.deepcopy(ref)
    assert apply_offloaded_checkpointing(off) == N_LAYERS
    (l0, g0), (l1, g1) = _step(ref), _step(off)
    assert l0 == l1 and _max_diff(g0, g1) == 0.0
    # and a different seed gives different gradients, so the comparison above could fail
    assert _max_diff(g0, _step(off, seed=7)[1]) > 1e-4


def test_host_buffers_are_reused_grown_and_released():
    off = _checkpointed()
    apply_offloaded_checkpointing(off)
    _step(off, seq=40)
    per_layer = 2 * 40 * 128 * 4                       # batch x tokens x hidden x float32
    assert HOST_BUFFERS.bytes_held == N_LAYERS * per_layer and len(HOST_BUFFERS.free) == N_LAYERS
    _step(off, seq=40)
    _step(off, seq=24)                                 # shorter: the same buffers serve
    assert HOST_BUFFERS.bytes_held == N_LAYERS * per_layer
    _step(off, seq=64)                                 # longer: the small buffers are replaced, not kept beside
    assert HOST_BUFFERS.bytes_held == N_LAYERS * 2 * 64 * 128 * 4 and len(HOST_BUFFERS.free) == N_LAYERS
    HOST_BUFFERS.release()
    assert HOST_BUFFERS.bytes_held == 0 and HOST_BUFFERS.free == []


def test_offload_falls_back_when_another_input_needs_a_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(3, 4, requires_grad=True)
    offloaded_checkpoint(lambda a, b: (a * b).sin(), x, w).sum().backward()
    ref_x, ref_w = torch.autograd.grad((x * w).sin().sum(), [x, w])
    assert torch.allclose(x.grad, ref_x) and torch.allclose(w.grad, ref_w)


def test_offload_runs_backward_for_inputs_without_grad():
    "A frozen embedding's output does not require grad; the layer's own weights still get theirs."
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    offloaded_checkpoint(lin, x).sum().backward()
    gw = lin.weight.grad.clone()
    lin.zero_grad()
    lin(x).sum().backward()
    assert torch.allclose(gw, lin.weight.grad)


def test_tiled_mlp_matches_untiled_and_can_be_removed():
    ref = peft_model("lora_dropout: 0\n").train()
    tiled = copy.deepcopy(ref)
    assert apply_tiled_mlp(tiled, num_shards=3) == N_LAYERS
    assert apply_tiled_mlp(tiled, num_shards=3) == 0          # already tiled: not wrapped twice
    (l0, g0), (l1, g1) = _step(ref), _step(tiled)
    assert abs(l0 - l1) < 1e-6 and _max_diff(g0, g1) < 1e-5
    assert remove_tiled_mlp(tiled) == N_LAYERS
    assert all("forward" not in m.__dict__ for m in lc._dense_mlps(tiled))


def test_tiled_mlp_replays_dropout_in_its_recomputation():
    """With dropout, the gradients of the tiled MLP are those of the slices it computed in the forward: the same as
    running the slices one after another with autograd from the same seed."""
    model = peft_model("lora_dropout: 0.2\n").train()
    mlp = next(lc._dense_mlps(model))
    W = mlp.up_proj.lora_A.default.weight
    x = torch.randn(1, 12, 128, requires_grad=True)

    def grads(f):
        x.grad = W.grad = None
        torch.manual_seed(5)
        y = f()
        y.square().sum().backward()
        return y.detach(), x.grad.clone(), W.grad.clone()

    ref = grads(lambda: torch.cat([mlp(c) for c in x.chunk(3, dim=-2)], dim=-2))
    apply_tiled_mlp(model, num_shards=3)
    got = grads(lambda: mlp(x))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ref, got))
    torch.manual_seed(6)
    assert not torch.allclose(mlp(x).detach(), got[0])        # dropout is really on


def test_offload_and_tiled_mlp_with_dropout_and_a_batch_give_the_tiled_models_gradients():
    """Offloaded checkpointing with the tiled MLP, dropout on, two sequences per batch: the forward under no_grad
    slices the MLP as the recomputation does, so the gradients are exactly those of the tiled model without
    checkpointing (same slices, same masks)."""
    tiled = peft_model("lora_dropout: 0.2\n").train()
    tiled.enable_input_require_grads()
    apply_tiled_mlp(tiled, num_shards=3)
    both = copy.deepcopy(tiled)
    enable_checkpointing(both)
    apply_offloaded_checkpointing(both)
    (l0, g0), (l1, g1) = _step(tiled), _step(both)
    assert l0 == l1 and _max_diff(g0, g1) == 0.0
    assert HOST_BUFFERS.bytes_held > 0                        # the offloading really ran


def test_tiled_mlp_slices_short_batches_and_copies():
    "More slices asked for than a short batch has rows per sequence, and a deep copy that must call its own MLPs."
    ref = peft_model("lora_dropout: 0\n").train()
    tiled = copy.deepcopy(ref)
    apply_tiled_mlp(tiled, num_shards=4)
    copied = copy.deepcopy(tiled)
    (l0, g0), (l1, g1), (l2, g2) = _step(ref, seq=5), _step(tiled, seq=5), _step(copied, seq=5)
    assert abs(l0 - l1) < 1e-6 and _max_diff(g0, g1) < 1e-5 and l1 == l2 and _max_diff(g1, g2) == 0.0
    with torch.no_grad():                                      # evaluation slices too, and gives the same output
        ids = torch.randint(4, 1024, (3, 7), generator=torch.Generator().manual_seed(1))
        assert torch.allclose(ref.eval()(input_ids=ids).logits, tiled.eval()(input_ids=ids).logits, atol=1e-5)


def test_host_buffers_held_by_a_failed_step_are_given_back_after_release():
    "A step that failed keeps its graph (and its host buffers) alive in the traceback past `release()`."
    pool = lc.HostBuffers()
    slot = pool.take(torch.ones(10))
    pool.release()                                             # the run ended while the slot was alive
    assert pool.bytes_held == 40 and pool.free == []
    del slot
    assert pool.bytes_held == 0 and pool.free == []            # let go, not put back on the free list


def test_config_keys_for_long_sequences():
    base = "base_model: ftlab:tiny\ndatasets: [{path: ftlab:data/chat.jsonl}]\n"
    cfg = load_config(base + "gradient_checkpointing: offload\n")
    assert cfg.offload_activations and cfg.checkpointing and not any("variant" in n for n in cfg.notes)
    cfg = load_config(base + "activation_offloading: true\n")
    assert cfg.offload_activations and cfg.checkpointing
    assert any("activation_offloading" in n and "turned on" in n for n in cfg.notes)
    from ftlab.methods import training_args
    args = training_args(cfg, 10, False)   # the key's name depends on the transformers version
    assert args.get("activation_checkpointing", args.get("gradient_checkpointing")) is True
    cfg = load_config(base + "tiled_mlp_num_shards: 4\n")
    assert any("tiled_mlp_num_shards" in n for n in cfg.notes)
    with pytest.raises(ConfigError) as e:
        load_config(base + "tiled_mlp: true\ntiled_mlp_num_shards: 0\n")
    assert "tiled_mlp_num_shards" in str(e.value) and "line 4" in str(e.value)


def test_training_with_offloading_and_tiled_mlp_matches_plain_checkpointing(make_cfg):
    """The same run with and without the long-sequence keys: same losses step by step, the notes say what was
    switched on, and no host memory is left held afterwards."""
    from ftlab.run import Run
    base = make_cfg(LORA + "lora_dropout: 0\ngradient_checkpointing: true\nmax_steps: 4\nsave_steps: 100\n")
    plain = Run(base)
    plain.train()
    long = Run(base.model_copy(update={"output_dir": str(base.output_dir) + "-long", "activation_offloading": True,
                                       "tiled_mlp": True, "tiled_mlp_num_shards": 2}))
    long.train()
    notes = [r["message"] for r in long.records if r["event"] == "note"]
    assert notes == ["checkpointed inputs of 4 layers kept in CPU memory; MLP of 4 layers computed in slices of the sequence"]
    a, b = [r["loss"] for r in logs(plain)], [r["loss"] for r in logs(long)]
    # float32 on a CPU; on a GPU the run is bf16, where slicing the MLP changes the rounding a little
    rel = 2e-3 if torch.cuda.is_available() else 1e-5
    assert len(a) == len(b) == 4 and all(abs(x - y) <= rel * abs(x) for x, y in zip(a, b)), (a, b)
    assert HOST_BUFFERS.bytes_held == 0


@pytest.mark.gpu
def test_gpu_offload_and_tiled_mlp_in_bf16_autocast():
    """On the GPU, under bf16 autocast: with dropout, offloading to page-locked host buffers gives exactly the loss
    and gradients of torch's checkpointing (CUDA RNG and autocast replayed); without dropout, the tiled MLP on top
    stays within bf16 rounding of them."""
    ids = torch.randint(4, 1024, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()

    def step(m):
        m.zero_grad()
        torch.manual_seed(3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), lora_grads(m)

    for dropout in (0.1, 0.0):
        ref = _checkpointed(f"lora_dropout: {dropout}\n").cuda()
        off = copy.deepcopy(ref)
        apply_offloaded_checkpointing(off)
        if not dropout: apply_tiled_mlp(off, num_shards=2)
        (l0, g0), (l1, g1) = step(ref), step(off)
        assert HOST_BUFFERS.registered, "the host buffers should be page-locked on a CUDA machine"
        if dropout: assert l0 == l1 and _max_diff(g0, g1) == 0.0
        else: assert abs(l0 - l1) < 1e-2 and all(torch.allclose(g0[k], g1[k], rtol=2e-2, atol=2e-3) for k in g0)


def test_explicit_false_turns_axolotls_offload_variant_off():
    cfg = load_config("base_model: ftlab:tiny\ndatasets: [{path: ftlab:data/chat.jsonl}]\n"
                      "gradient_checkpointing: offload\nactivation_offloading: false\n")
    assert cfg.checkpointing and not cfg.offload_activations
