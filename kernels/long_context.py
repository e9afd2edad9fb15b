"""Memory for long sequences: checkpointed layer inputs kept in host memory, and the MLP computed in tiles.

With activation checkpointing, what stays on the GPU between the forward and the backward is each decoder layer's
input: `layers x tokens x hidden` values (32 x 400k x 4096 bf16 = 98 GiB for Llama-3.1-8B at 400k tokens), more
than everything else of a QLoRA step together. `offloaded_checkpoint` is a checkpointing function for
transformers' decoder layers that copies the layer input to a host buffer in the forward and back in the backward,
then recomputes the layer there, as reentrant checkpointing does (RNG and autocast state replayed).

Why not transformers' own `offload=True` (torch's `save_on_cpu` around each checkpoint): torch's pinned-memory
allocator rounds every block up to a power of two, so a 3.3 GB layer input takes 4 GiB of page-locked host memory
(128 GiB for 32 layers, more than the 125 GiB host of the H200 machine bench/results measured on), and it copies
the rotary tables again for every layer. `HostBuffers` here allocates exactly the bytes needed, page-locks them with `cudaHostRegister` (falling back
to pageable memory where that is refused), and reuses them from step to step; `release()` gives them back.

`apply_tiled_mlp` runs each decoder layer's MLP over slices of the sequence with Liger-Kernel's `apply_tiled_mlp`
(the MLP's `tokens x intermediate` activations are the largest tensors of a layer: 3.5x the hidden size for Llama),
recomputing each slice in the backward.

Pure PyTorch (plus Liger for the tiles): runs on any machine; on a CPU the offload is a copy and saves nothing.
"""
from __future__ import annotations

import contextlib
import math
import types

import torch

__all__ = ["HostBuffers", "OffloadedCheckpointFunction", "offloaded_checkpoint", "HOST_BUFFERS",
           "apply_offloaded_checkpointing", "apply_tiled_mlp", "remove_tiled_mlp"]


def _clear_cuda_error():
    "Reset the CUDA runtime's last error after a failed call we handled, so the next kernel launch does not report it."
    try:
        import ctypes
        ctypes.CDLL(None).cudaGetLastError()    # the runtime torch loaded; absent symbol: nothing to clear here
    except Exception:
        pass


class HostBuffers:
    """Exact-size host buffers for layer inputs, page-locked where the driver allows it, reused across steps.

    `release()` gives the free buffers back and starts a new generation: a buffer still held by a slot of an older
    generation (a failed step's autograd graph kept alive by its traceback) is given back when that slot goes."""

    def __init__(self):
        self.free: list[torch.Tensor] = []      # flat uint8 buffers not holding a layer input now
        self.registered: list[int] = []         # data pointers page-locked by us (unregistered when dropped)
        self.pin = True
        self.bytes_held = 0                     # all buffers, free or in use
        self.generation = 0

    def _new(self, nbytes: int, cuda: bool) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if cuda and self.pin:
            rc = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)
            if int(rc) == 0: self.registered.append(buf.data_ptr())
            else:                               # pageable copies from now on: slower, same result
                self.pin = False
                _clear_cuda_error()
        self.bytes_held += nbytes
        return buf

    def is_pinned(self, buf: torch.Tensor) -> bool: return buf.data_ptr() in self.registered

    def take(self, like: torch.Tensor) -> "_Slot":
        "A slot holding a host buffer big enough for `like`; the buffer returns to the pool when the slot is dropped."
        nbytes = like.numel() * like.element_size()
        fits = [b for b in self.free if b.numel() >= nbytes]
        if fits:
            buf = min(fits, key=torch.Tensor.numel)
            self.free = [b for b in self.free if b is not buf]
        else:
            # Lengths grew: buffers too small for this step are let go rather than kept beside the new ones.
            self._drop([b for b in self.free if b.numel() < nbytes])
            buf = self._new(nbytes, like.is_cuda)
        return _Slot(self, buf, like)

    def _drop(self, bufs: list):
        ids = {id(b) for b in bufs}
        self.free = [b for b in self.free if id(b) not in ids]
        if any(b.data_ptr() in self.registered for b in bufs):
            # A copy back to the GPU queued in the last backward may still be reading them: unlike reuse (queued
            # after that copy on the same stream), unpinning and freeing are not ordered with the GPU's work.
            torch.cuda.synchronize()
        for b in bufs:
            if b.data_ptr() in self.registered:
                torch.cuda.cudart().cudaHostUnregister(b.data_ptr())
                self.registered.remove(b.data_ptr())
            self.bytes_held -= b.numel()

    def give_back(self, buf: torch.Tensor, generation: int):
        "A slot is done with `buf`: keep it for reuse, or let it go if the pool was released since the slot was made."
        if generation == self.generation: self.free.append(buf)
        else: self._drop([buf])

    def release(self):
        "Give every free buffer back to the system now, and the ones still held by slots when those are dropped."
        self._drop(list(self.free))
        self.generation += 1


class _Slot:
    "One layer input in host memory: `restore()` brings it back; dropping the slot gives the buffer back to the pool."

    def __init__(self, pool: HostBuffers, buf: torch.Tensor, x: torch.Tensor):
        self.pool, self.buf, self.generation = pool, buf, pool.generation
        self.device = x.device
        nbytes = x.numel() * x.element_size()
        self.host = buf[:nbytes].view(x.dtype).view(x.shape)
        # Stream-ordered: the copy runs after the kernels that made `x`, and any later reuse of this buffer (the next
        # step's forward) is queued after the copy back in this step's backward.
        self.host.copy_(x.detach(), non_blocking=pool.is_pinned(buf))

    def restore(self) -> torch.Tensor:
        return self.host.to(self.device, non_blocking=self.pool.is_pinned(self.buf))

    def __del__(self):
        try:
            del self.host
            self.pool.give_back(self.buf, self.generation)
        except Exception:
            pass                                # interpreter shutdown


HOST_BUFFERS = HostBuffers()


class _ForwardState:
    """The RNG and autocast state a forward ran under, so that recomputing it in the backward draws the same dropout
    masks and computes in the same dtypes (the backward runs outside the forward's autocast context)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_rng = torch.get_rng_state()
        self.device_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.autocast = torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)

    @contextlib.contextmanager
    def replay(self):
        enabled, dtype = self.autocast
        with torch.random.fork_rng(devices=[self.device] if self.device_rng is not None else []):
            torch.set_rng_state(self.cpu_rng)
            if self.device_rng is not None: torch.cuda.set_rng_state(self.device_rng, self.device)
            with torch.enable_grad(), torch.autocast(self.device.type, dtype=dtype, enabled=enabled):
                yield


class OffloadedCheckpointFunction(torch.autograd.Function):
    """Reentrant checkpoint of `run_function(x, *rest)` whose saved input `x` waits in host memory.

    `anchor` is an empty tensor that requires grad, so the backward runs even when `x` does not require grad (a
    frozen embedding under LoRA); the gradients of the layer's parameters are accumulated by the inner backward."""

    @staticmethod
    def forward(ctx, run_function, anchor, x, *rest):
        ctx.run_function, ctx.rest = run_function, rest
        ctx.x_requires_grad = x.requires_grad
        ctx.state = _ForwardState(x.device)
        ctx.slot = HOST_BUFFERS.take(x)
        with torch.no_grad():
            return run_function(x, *rest)

    @staticmethod
    def backward(ctx, *grads):
        x = ctx.slot.restore().detach().requires_grad_(ctx.x_requires_grad)
        del ctx.slot
        with ctx.state.replay():
            out = ctx.run_function(x, *ctx.rest)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs: torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, x.grad if ctx.x_requires_grad else None) + (None,) * len(ctx.rest)


_ANCHORS: dict = {}


def offloaded_checkpoint(function, x, *rest, **checkpoint_kwargs):
    """A drop-in `_gradient_checkpointing_func` for transformers' layers: `function(x, *rest)` checkpointed with `x`
    kept in host memory. Falls back to torch's checkpoint when another input needs a gradient (only the layer input
    is offloaded)."""
    keywords = getattr(function, "keywords", None) or {}     # transformers passes the layer's kwargs in a partial
    if not torch.is_tensor(x) or any(torch.is_tensor(r) and r.requires_grad for r in (*rest, *keywords.values())):
        from torch.utils.checkpoint import checkpoint
        return checkpoint(function, x, *rest, **{"use_reentrant": False, **checkpoint_kwargs})
    anchor = _ANCHORS.get(x.device)
    if anchor is None: anchor = _ANCHORS[x.device] = torch.empty(0, device=x.device, requires_grad=True)
    return OffloadedCheckpointFunction.apply(function, anchor, x, *rest)


def apply_offloaded_checkpointing(model) -> int:
    "Make every module that transformers checkpoints use `offloaded_checkpoint`; the number of layers switched."
    from transformers.modeling_layers import GradientCheckpointingLayer
    n = 0
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func"):
            m._gradient_checkpointing_func = offloaded_checkpoint
            n += isinstance(m, GradientCheckpointingLayer)
    return n


def _dense_mlps(model):
    "The dense gated MLPs (gate/up/down projections) of the decoder layers."
    for name, m in model.named_modules():
        if name.endswith(".mlp") and all(hasattr(m, p) for p in ("gate_proj", "up_proj", "down_proj")): yield m


def _tiled_forward(self, x, *args, **kwargs):
    """An MLP's forward over slices of its tokens. Batch and sequence are flattened first, so the slices are the same
    rows in Liger's forward and backward passes whatever the batch size. Without gradients (evaluation, or the
    forward of an offloaded checkpoint) the slices run one after another; with them, Liger's tiled function keeps
    only the input and recomputes each slice in the backward, with the random and autocast state that slice had."""
    inner = self._ftlab_untiled[0]
    if args or kwargs or x.dim() < 2: return inner(x, *args, **kwargs)
    flat = x.reshape(-1, x.shape[-1])
    shards = min(self._ftlab_tile_shards or math.ceil(flat.shape[0] / flat.shape[1]), flat.shape[0])
    if shards <= 1: return inner(x)
    if not torch.is_grad_enabled():
        return torch.cat([inner(rows) for rows in flat.chunk(shards, dim=0)], dim=0).view(*x.shape[:-1], -1)
    from liger_kernel.ops.tiled_mlp import apply_tiled_mlp as liger_tiled
    states = []

    def slice_forward(_module, rows):
        # Liger runs the slices in order without gradients, then again in the same order in the backward:
        # record each slice's state on the first pass and replay it on the second.
        if not torch.is_grad_enabled():
            states.append(_ForwardState(rows.device))
            return inner(rows)
        with states.pop(0).replay():
            return inner(rows)

    return liger_tiled(slice_forward, self, flat, num_shards=shards).view(*x.shape[:-1], -1)


def apply_tiled_mlp(model, num_shards: int | None = None) -> int:
    """Run each decoder layer's dense MLP over slices of its tokens (Liger-Kernel's tiled MLP when gradients are
    recorded): `num_shards` slices, or by default as many as make each slice about `hidden_size` tokens. Wraps the
    MLP's current `forward` (so kernels already patched in stay). Returns the number of MLPs wrapped."""
    import liger_kernel.ops.tiled_mlp  # noqa: F401  (fail here, not in the middle of a step, when it is missing)
    n = 0
    for mlp in _dense_mlps(model):
        if getattr(mlp, "_ftlab_untiled", None) is not None: continue
        mlp._ftlab_untiled = (mlp.forward, "forward" in mlp.__dict__)   # an instance patch (Liger's) to put back, or none
        mlp._ftlab_tile_shards = num_shards
        mlp.forward = types.MethodType(_tiled_forward, mlp)
        n += 1
    return n


def remove_tiled_mlp(model) -> int:
    "Undo `apply_tiled_mlp`."
    n = 0
    for mlp in _dense_mlps(model):
        saved = getattr(mlp, "_ftlab_untiled", None)
        if saved is None: continue
        inner, own = saved
        if own: mlp.forward = inner
        else: del mlp.forward
        mlp._ftlab_untiled = None
        n += 1
    return n
