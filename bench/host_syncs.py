"""Where a training step makes the host wait for the GPU: each `.item()`, `bool(tensor)`, `int(tensor)`, copy to the
host and data-dependent shape (`nonzero`, boolean indexing, `unique`, ...) inside the measured steps, with the line of
code that asked for it.

    python bench/sft_bench.py --model llama-3.1-8b --mode lora --impl ftlab --count-syncs DIR   # on the GPU
    python bench/sft_bench.py --model tiny --mode lora --impl ftlab --device cpu --count-syncs DIR
    python bench/host_syncs.py CONFIG.yaml [--after 2] [--steps 2]                             # any ftlab config

Why it matters: after such a call the GPU has run dry, and whatever the host does before its next launch (logging,
callbacks, the next batch) is GPU idle time. The profile of an 8B LoRA step showed the idle time gathered at these
calls, so the first thing to know is which calls a step makes and whose they are.

The calls are seen at PyTorch's dispatcher (a `TorchDispatchMode`), so every library's are seen alike. On a GPU a call
counts when it reads a CUDA tensor: that is exactly a wait. On a CPU every tensor is a host tensor, so the same calls
count as the ones a GPU run of the same code would make, less those under PyTorch's data loader (the batches are still
host tensors there) and its optimizers (their step counters stay on the host unless the optimizer is fused); code that runs only on a GPU (Liger's and ftlab's kernels) is not in a CPU count, and a read of a tensor the code built
on the host itself (`torch.tensor(floats).mean().item()`) is, so a CPU count is an upper bound and a GPU count exact. The benchmark's
own per-step meter is counted apart. `torch.cuda.synchronize()` itself is not an operator and is not counted.
"""
from __future__ import annotations
import functools
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# operators whose result the host needs (a Python number or bool) or whose output size depends on the data
SCALAR_OPS = {"_local_scalar_dense", "is_nonzero", "equal"}
SHAPE_OPS = {"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim",
             "nonzero_static"}
COPY_OPS = {"_to_copy", "copy_"}
SKIP_PARTS = ("/contextlib.py", "/functools.py", "/host_syncs.py", "/typing.py")
LIBRARIES = ("trl", "transformers", "peft", "accelerate", "unsloth", "unsloth_zoo", "liger_kernel", "bitsandbytes", "ftlab",
             "kernels", "datasets")


@functools.lru_cache(maxsize=None)
def torch_dirs() -> tuple[str, ...]:
    """PyTorch's own package folder as code names it (and with links resolved), with a trailing separator: a folder
    that only has `torch` in its path, like a virtual environment under `/opt/torch/`, is not PyTorch."""
    import os, torch
    here = os.path.dirname(os.path.abspath(torch.__file__))
    return tuple(dict.fromkeys(d + os.sep for d in (here, os.path.realpath(here))))


def torch_part(filename: str) -> str | None:
    "The path of `filename` inside PyTorch's package, or None when it is not PyTorch's."
    return next((filename[len(d):] for d in torch_dirs() if filename.startswith(d)), None)


def in_torch(filename: str) -> bool:
    "Frames that are PyTorch's or plumbing (context managers, decorators, this counter): the call site is above them."
    return torch_part(filename) is not None or any(p in filename for p in SKIP_PARTS)


def import_name(path: Path) -> str:
    "`path` as imported: after site-packages, a `pip install --target` folder on `sys.path`, or the repository."
    if "site-packages" in path.parts: return "/".join(path.parts[path.parts.index("site-packages") + 1:])
    if path.is_relative_to(ROOT): return path.relative_to(ROOT).as_posix()
    roots = [r for r in (Path(p or ".").resolve() for p in sys.path) if path.is_relative_to(r) and len(r.parts) > 1]
    if roots: return path.relative_to(max(roots, key=lambda r: len(r.parts))).as_posix()
    return "/".join(path.parts[-2:])


def where(frame) -> tuple[str, str]:
    "(source, `file:line function`) of the innermost frame outside PyTorch: source names the package it belongs to."
    while frame is not None and in_torch(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None: return "torch", "(inside PyTorch)"
    path = Path(frame.f_code.co_filename).resolve()
    short = import_name(path)
    top = short.split("/")[0]
    source = "bench meter" if short.startswith("bench/") else (top if top in LIBRARIES else "other")
    return source, f"{short}:{frame.f_lineno} {frame.f_code.co_name}"


# On a CPU, calls under these read host tensors in a GPU run too: the data loader's batches, and the step counters
# of PyTorch's optimizers, which live on the host unless the optimizer is fused or capturable (and then are not read).
HOST_ONLY_PARTS = ("utils/data/", "optim/")


def host_only(frame) -> bool:
    while frame is not None:
        inside = torch_part(frame.f_code.co_filename)
        if inside is not None and inside.startswith(HOST_ONLY_PARTS): return True
        frame = frame.f_back
    return False


def kind_of(func, args, kwargs, on_gpu: bool) -> str | None:
    "'scalar', 'shape' or 'copy' when this operator call makes the host wait (on a GPU: for a CUDA tensor), else None."
    import torch
    name = func.overloadpacket.__name__
    tensors = [a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)]
    if name in COPY_OPS:
        if not on_gpu: return None   # on a CPU a copy says nothing about where a GPU run's tensors live
        to_cpu = (name == "_to_copy" and str((kwargs or {}).get("device", "")) == "cpu") or \
                 (name == "copy_" and len(tensors) >= 2 and tensors[0].device.type == "cpu" and tensors[1].is_cuda)
        return "copy" if to_cpu and any(t.is_cuda for t in tensors) else None
    if name == "index" and any(t.dtype == torch.bool for a in args[1:2] for t in (a or []) if isinstance(t, torch.Tensor)):
        name = "nonzero"   # a boolean mask as an index: its output size is the mask's count
    if name == "repeat_interleave" and (kwargs or {}).get("output_size") is None:
        name = "nonzero"   # tensor repeats (int repeats never reach the dispatcher as this operator): a count to read
    kind = "scalar" if name in SCALAR_OPS else "shape" if name in SHAPE_OPS else None
    if kind is None: return None
    if on_gpu and not any(t.is_cuda for t in tensors): return None
    return kind


def sync_counter():
    "A TorchDispatchMode that counts host waits by call site while `.counting` is true."
    from torch.utils._python_dispatch import TorchDispatchMode
    import torch

    class SyncCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counting, self.on_gpu = False, torch.cuda.is_available()
            self.calls: Counter = Counter()      # (source, site, kind) -> calls
            self.host_only = 0                   # on a CPU: calls on what a GPU run keeps on the host too

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if self.counting:
                kind = kind_of(func, args, kwargs, self.on_gpu)
                if kind is not None:
                    frame = sys._getframe(1)
                    if not self.on_gpu and host_only(frame): self.host_only += 1
                    else: self.calls[(*where(frame), kind)] += 1
            return func(*args, **(kwargs or {}))
    return SyncCounter()


def sync_callback(start_step: int, n_steps: int, out_dir: str, tag: str):
    """A TrainerCallback that counts the host waits of optimizer steps start_step..start_step+n_steps-1 (from the first
    step's begin to the next step's begin, so the logging after each step is in) and writes DIR/syncs-TAG.md."""
    from transformers import TrainerCallback

    class CountSyncs(TrainerCallback):
        def __init__(self): self.mode, self.summary = None, None
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == start_step and self.mode is None:
                self.mode = sync_counter(); self.mode.__enter__(); self.mode.counting = True
            elif self.mode is not None and self.summary is None and state.global_step == start_step + n_steps:
                self.finish()
        def on_train_end(self, args, state, control, **kw):
            if self.mode is not None and self.summary is None: self.finish()
        def finish(self):
            self.mode.counting = False
            self.mode.__exit__(None, None, None)
            self.summary = summarize(self.mode, n_steps)
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / f"syncs-{tag}.md").write_text("\n".join(table_lines(self.summary, tag)) + "\n")
    return CountSyncs()


def summarize(mode, n_steps: int) -> dict:
    "Per-step counts: in all, by source library, and the call sites (most frequent first)."
    per_step = lambda n: round(n / n_steps, 2)
    by_source: Counter = Counter()
    for (source, _, _), n in mode.calls.items(): by_source[source] += n
    step = sum(n for (s, _, _), n in mode.calls.items() if s != "bench meter")
    return {"on_gpu": mode.on_gpu, "steps": n_steps, "per_step": per_step(step),
            "by_source": {s: per_step(n) for s, n in by_source.most_common()},
            "host_only_per_step": per_step(mode.host_only),
            "sites": [{"source": s, "site": site, "kind": k, "per_step": per_step(n)}
                      for (s, site, k), n in mode.calls.most_common()]}


def table_lines(summary: dict, tag: str) -> list[str]:
    where_ = "CUDA tensors read by the host" if summary["on_gpu"] else "the calls a GPU run would wait on (CPU run)"
    lines = [f"{tag}: host waits per optimizer step, {where_}, over {summary['steps']} steps", "",
             f"{summary['per_step']} a step" + (" besides the benchmark's meter" if "bench meter" in summary["by_source"] else "")
             + "; by source: " + ", ".join(f"{s} {n}" for s, n in summary["by_source"].items()), ""]
    if not summary["on_gpu"]:
        lines += [f"(not counted: {summary['host_only_per_step']} a step under the data loader and the optimizer's step "
                  "counters, host tensors in a GPU run too)", ""]
    lines += ["| per step | kind | source | call site |", "|---|---|---|---|"]
    lines += [f"| {s['per_step']} | {s['kind']} | {s['source']} | `{s['site']}` |" for s in summary["sites"]]
    return lines


def main(argv=None) -> int:
    """`python bench/host_syncs.py CONFIG.yaml [--after N] [--steps N]`: an ftlab run of the config (its `max_steps` set to
    N + steps), the host waits of `--steps` steps after the first `--after`, and the table of them."""
    import argparse, tempfile
    ap = argparse.ArgumentParser(description="host waits per optimizer step of an ftlab run, by call site")
    ap.add_argument("config"); ap.add_argument("--after", type=int, default=2); ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=None, help="folder for syncs-NAME.md (default: a temporary folder)")
    a = ap.parse_args(argv)
    from ftlab.run import Run
    out = a.out or tempfile.mkdtemp(prefix="ftlab-syncs-")
    counted = sync_callback(a.after, a.steps, out, Path(a.config).stem)
    Run(a.config).train(max_steps=a.after + a.steps + 1, callbacks=[counted], overwrite=True)
    print("\n".join(table_lines(counted.summary, Path(a.config).stem)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
