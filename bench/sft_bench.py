"""One SFT training-throughput measurement per process: baseline TRL, TRL + Liger, or ftlab's own path.

    python bench/sft_bench.py --model llama-3.2-1b --mode lora --impl baseline --seq 4096 --data packed
    python bench/sft_bench.py --model tiny --mode lora --impl ftlab --seq 1024 --data mix --device cpu
    python bench/sft_bench.py --prepare-model llama-3.1-8b          # build + save the random-init model folder
    python bench/sft_bench.py --find-max-seq --model llama-3.1-8b --mode qlora --impl baseline

The model is built with random weights from `bench/models/NAME.json` and saved once (safetensors, with a
word-level tokenizer covering the whole vocabulary) under `--cache`; every implementation loads it from there, so
loading costs are comparable. Data is synthetic and pre-tokenized (`input_ids` + `labels`, every token trained):
`packed` rows hold exactly `--seq` tokens; `mix` documents have log-normal lengths (median 600, sigma 1.0,
clipped to [32, seq]) and are packed by TRL (`packing=True`, best-fit decreasing, padding-free) in all three
implementations alike.

Implementations, all on TRL's `SFTTrainer` with the same settings (bf16, batch `--batch`, no gradient accumulation,
lr 2e-4 constant, adamw_torch_fused, LoRA r16 / alpha 32 / dropout 0 on all linear layers, nf4 + double quant for
QLoRA, no activation checkpointing unless `--grad-ckpt`):
  baseline  what a person writes by hand: `from_pretrained` + `SFTConfig` + `peft.LoraConfig` as `peft_config`
  liger     the same with `use_liger_kernel=True`
  ftlab     an ftlab YAML config with the same keys -> `ftlab.config.load_config` -> `ftlab.run.Run(...).train()`;
            more ftlab keys (e.g. future `lora_mlp_kernel: true`) with `--ftlab-set key=value`

A `TrainerCallback` given to every implementation times each optimizer step with `torch.cuda.synchronize()` and
counts the tokens the model processed (a forward pre-hook on the trained model: the attention mask's sum, or every
token of a padding-free batch). tokens/s is the median over the steps after warm-up of tokens(step) /
(end of step - end of previous step), so logging and data loading between steps are included.
Prints one line `BENCH_RESULT {json}` (and appends it to `--out` if given). Exit code 0 ok, 3 out of memory, 1 error.
"""
from __future__ import annotations
import time
T0 = time.time()   # process start, as near as Python gets
import argparse, contextlib, json, math, os, shlex, shutil, subprocess, sys, tempfile, traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODELS = HERE / "models"
PEAK_TFLOPS = 989.0   # H100/H200 SXM dense bf16
DEFAULT_CACHE = os.environ.get("FTLAB_BENCH_CACHE", str(Path(tempfile.gettempdir()) / "ftlab-bench"))
RESULT_TAG = "BENCH_RESULT "
MAXSEQ_LADDER = "32768,65536,98304,131072,196608,262144,327680,409600,524288"

# Settings every implementation shares (the SFTConfig keywords below and the ftlab YAML say the same thing).
LR, SCHEDULER, OPTIM = 2e-4, "constant", "adamw_torch_fused"
LORA_R, LORA_ALPHA, LORA_DROPOUT = 16, 32, 0.0
# ftlab keys added to every ftlab run's config. ftlab's fused LoRA projections and Liger's kernels are on by default
# on a GPU for the Llama / Mistral / Qwen2 / Qwen3 models here; e.g. {"use_liger_kernel": False} turns Liger off.
FTLAB_EXTRA: dict = {}


def model_names() -> list[str]:
    return sorted(p.stem for p in MODELS.glob("*.json"))


def model_json(name: str) -> dict:
    p = MODELS / f"{name}.json"
    if not p.exists():
        raise SystemExit(f"unknown model `{name}`: choose from {', '.join(model_names())}")
    return json.loads(p.read_text())


# ---------------------------------------------------------------------------------------------------- FLOPs / MFU
def flops_per_token(cfg: dict, seq: int) -> float:
    "Training FLOPs per token: L·h²·(12 + 12·kv/H + 18·ffn/h + 6·s/h + 6·V/(L·h))."
    L, h, H = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
    kv, ffn, V = cfg.get("num_key_value_heads", H), cfg["intermediate_size"], cfg["vocab_size"]
    return L * h * h * (12 + 12 * kv / H + 18 * ffn / h + 6 * seq / h + 6 * V / (L * h))


def mode_factor(mode: str) -> float:
    "Frozen base weights need no weight gradients: about 2/3 of the full training FLOPs for LoRA and QLoRA."
    return 1.0 if mode == "full" else 2.0 / 3.0


# ---------------------------------------------------------------------------------------------------- model folder
def _free_bytes(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free


def _make_room(models_dir: Path, need: int, keep: str):
    "Delete other cached model folders, oldest first, until `need` bytes are free (disk on the GPU machine is small)."
    others = sorted((p for p in models_dir.iterdir() if p.is_dir() and p.name != keep), key=lambda p: p.stat().st_mtime)
    while _free_bytes(models_dir) < need and others:
        victim = others.pop(0)
        print(f"[bench] removing cached model {victim} to free disk", flush=True)
        shutil.rmtree(victim, ignore_errors=True)


def save_tokenizer(cfg: dict, folder: Path):
    "A word-level fast tokenizer with one token per id of the model's vocabulary (`t123`), bos/eos as in the config."
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    V = cfg["vocab_size"]
    bos, eos = cfg.get("bos_token_id"), cfg.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    names = {0: "<unk>"}
    if bos is not None: names[bos] = "<|begin_of_text|>" if bos != eos else "<|endoftext|>"
    if eos is not None: names.setdefault(eos, "<|end_of_text|>")
    vocab = {names.get(i, f"t{i}"): i for i in range(V)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kw = dict(unk_token="<unk>")
    if bos is not None: kw["bos_token"] = names[bos]
    if eos is not None: kw["eos_token"] = names[eos]
    PreTrainedTokenizerFast(tokenizer_object=tok, **kw).save_pretrained(str(folder))


def prepare_model(name: str, cache: str, device: str) -> dict:
    "Build the random-init model on `device` and save it with a tokenizer to `cache/models/name` (once)."
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    models_dir = Path(cache) / "models"
    folder = models_dir / name
    models_dir.mkdir(parents=True, exist_ok=True)
    if (folder / ".complete").exists():
        os.utime(folder)
        return {"folder": str(folder), "cached": True}
    cfg_json = model_json(name)
    d = dict(cfg_json)
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    t = time.time()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):   # built where it lives: no slow CPU init of billions of weights
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    if device == "cuda": torch.cuda.synchronize()
    build_s = time.time() - t
    _make_room(models_dir, int(n_params * dtype.itemsize * 1.1) + (2 << 30), keep=name)
    tmp = models_dir / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t = time.time()
    model.save_pretrained(str(tmp))
    save_tokenizer(cfg_json, tmp)
    (tmp / ".complete").write_text("ok\n")
    save_s = time.time() - t
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    return {"folder": str(folder), "cached": False, "params": n_params, "build_s": round(build_s, 2),
            "save_s": round(save_s, 2), "size_gib": round(size / 2**30, 2)}


def ensure_model(name: str, cache: str, device: str) -> tuple[str, dict | None]:
    "The model folder; built in a child process when missing, so this process's memory statistics stay clean."
    folder = Path(cache) / "models" / name
    if (folder / ".complete").exists():
        os.utime(folder)
        return str(folder), None
    cmd = [sys.executable, str(Path(__file__).resolve()), "--prepare-model", name, "--cache", cache, "--device", device]
    p = subprocess.run(cmd, capture_output=True, text=True)
    info = None
    for line in p.stdout.splitlines():
        if line.startswith(RESULT_TAG): info = json.loads(line[len(RESULT_TAG):])
    if p.returncode != 0 or info is None:
        raise RuntimeError(f"preparing model {name} failed: {(p.stderr or p.stdout).strip().splitlines()[-1:]}")
    return str(folder), info


# ---------------------------------------------------------------------------------------------------- data
def make_rows(kind: str, n_rows: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    "Pre-tokenized rows; every token is trained (labels = input_ids)."
    import numpy as np
    rng = np.random.default_rng(seed)
    if kind == "packed":
        ids = rng.integers(3, vocab, size=(n_rows, seq))
        return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]
    if kind == "learn":
        # something a model can learn in a few steps (for loss curves): 512 of the ids, each followed by one of
        # four fixed successors, so the loss can fall from ln(vocab) towards ln(4)
        words = rng.choice(np.arange(3, vocab), size=512, replace=False)
        succ = rng.integers(0, 512, size=(512, 4))
        rows = []
        for _ in range(n_rows):
            i, seq_ids = int(rng.integers(512)), []
            pick = rng.integers(0, 4, size=seq)
            for j in range(seq):
                seq_ids.append(int(words[i])); i = int(succ[i, pick[j]])
            rows.append({"input_ids": seq_ids, "labels": seq_ids})
        return rows
    # mix: enough documents for n_rows packs of `seq` tokens, with a margin for imperfect packing
    target, total, rows = int(n_rows * seq * 1.25) + seq, 0, []
    while total < target:
        n = int(np.clip(round(rng.lognormal(math.log(600), 1.0)), 32, seq))
        r = rng.integers(3, vocab, size=n).tolist()
        rows.append({"input_ids": r, "labels": r})
        total += n
    return rows


# ---------------------------------------------------------------------------------------------------- measurement
def _sync():
    import torch
    if torch.cuda.is_available(): torch.cuda.synchronize()


def _gib(x) -> float | None:
    return None if x is None else round(x / 2**30, 3)


def make_meter():
    import torch
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        "Per-step wall times (synchronized), processed tokens per step, first-step times, losses."
        def __init__(self):
            self.t_train_call = None      # set by the caller just before trainer.train()
            self.extra = []               # more callbacks to run beside this one (e.g. the profiler)
            self.t_train_begin = None
            self.step_begin, self.step_end, self.tokens, self.losses = [], [], [], []
            self._pending, self._hook, self.params, self.alloc_at_begin = [], None, None, None

        def _count(self, module, args, kwargs):
            if not module.training: return
            am = kwargs.get("attention_mask")
            ids = kwargs.get("input_ids", args[0] if args else None)
            if am is not None and am.dim() == 2: self._pending.append(am.sum())
            elif ids is not None: self._pending.append(ids.numel())

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.t_train_begin = time.time()
            if model is not None and self._hook is None:
                self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)
                trainable = total = 0
                for p in model.parameters():
                    qs = getattr(p, "quant_state", None)   # 4-bit weights: count the weights they stand for
                    n = math.prod(qs.shape) if qs is not None and getattr(qs, "shape", None) else p.numel()
                    total += n
                    if p.requires_grad: trainable += n
                self.params = (trainable, total)
            if torch.cuda.is_available(): self.alloc_at_begin = torch.cuda.memory_allocated()

        def on_step_begin(self, args, state, control, **kw):
            _sync()
            self.step_begin.append(time.time())

        def on_step_end(self, args, state, control, **kw):
            _sync()
            self.step_end.append(time.time())
            self.tokens.append(int(sum(int(x) for x in self._pending)))
            self._pending = []

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs: self.losses.append(float(logs["loss"]))

    return Meter()


CATEGORIES = [  # (category, substrings of CUDA kernel names), first match wins
    ("attention", ("flash", "fmha", "attention", "sdpa", "scaled_dot")),
    ("matmul", ("gemm", "matmul", "cutlass", "nvjet", "sm90_xmma", "wgmma", "cublas")),
    ("nf4 dequant", ("dequant", "kdequantize", "kgemm_4bit", "4bit")),
    ("norm", ("rms", "norm")),
    ("loss / logits", ("cross_entropy", "log_softmax", "softmax", "nll")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("copy / cast", ("copy", "cast", "convert", "fill", "cat", "index")),
]


def profile_callback(start_step: int, n_steps: int, out_dir: str, tag: str):
    "A TrainerCallback that profiles optimizer steps start_step..start_step+n_steps-1 and writes the kernel table."
    import torch
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        def __init__(self): self.prof, self.summary, self.idle = None, None, None
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == start_step and self.prof is None:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
                self.prof.__enter__()
        def on_step_end(self, args, state, control, **kw):
            if self.prof is not None and self.summary is None and state.global_step == start_step + n_steps:
                if torch.cuda.is_available(): torch.cuda.synchronize()
                self.prof.__exit__(None, None, None)
                # Kernels only: operator rows (aten::mm, ...) carry their kernels' time too and would count it twice,
                # and so do the ranges the trainer names (`Optimizer.step#AdamW.step`, `ProfilerStep#3`).
                cuda = torch.autograd.DeviceType.CUDA
                events = [e for e in self.prof.key_averages()
                          if getattr(e, "self_device_time_total", 0) > 0 and getattr(e, "device_type", None) == cuda
                          and "#" not in e.key]
                total = sum(e.self_device_time_total for e in events) or 1
                cats = {}
                for e in events:
                    name = e.key.lower()
                    cat = next((c for c, subs in CATEGORIES if any(x in name for x in subs)), "other")
                    cats[cat] = cats.get(cat, 0) + e.self_device_time_total
                self.summary = {c: round(100 * t / total, 1) for c, t in sorted(cats.items(), key=lambda kv: -kv[1])}
                top = sorted(events, key=lambda e: -e.self_device_time_total)[:30]
                lines = [f"{tag}: GPU time by kernel over {n_steps} steps (self device time)", "",
                         "| share | ms/step | kernel |", "|---|---|---|"]
                lines += [f"| {100 * e.self_device_time_total / total:.1f}% | {e.self_device_time_total / 1000 / n_steps:.2f} | "
                          f"`{e.key[:110]}` |" for e in top]
                lines += ["", "By category: " + ", ".join(f"{c} {v}%" for c, v in self.summary.items())]
                Path(out_dir).mkdir(parents=True, exist_ok=True)
                try:
                    trace = Path(out_dir) / f"trace-{tag}.json"
                    self.prof.export_chrome_trace(str(trace))
                    self.idle = gpu_idle(json.loads(trace.read_text()), n_steps)
                    lines += ["", *idle_lines(self.idle)]
                    trace.unlink()
                except Exception as e:  # informative only
                    lines += ["", f"(GPU idle analysis failed: {type(e).__name__}: {e})"]
                (Path(out_dir) / f"profile-{tag}.md").write_text("\n".join(lines) + "\n")
    return Profile()


def gpu_idle(trace: dict, n_steps: int, min_gap_us: float = 20.0) -> dict:
    """Where the GPU waits, from a chrome trace of the profiled steps: busy and idle time per step, and the longest
    gaps between kernels with what the host was doing in them (the host operators that began inside the gap, and
    the synchronizing runtime calls that overlapped it)."""
    ev = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    gpu = sorted((e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    host = [e for e in ev if e.get("cat") in ("cpu_op", "user_annotation", "python_function")]
    rt = [e for e in ev if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    if not gpu: return {}
    busy, gaps, cur_s, cur_e, last = 0.0, [], gpu[0]["ts"], gpu[0]["ts"] + gpu[0]["dur"], gpu[0]
    for e in gpu[1:]:
        if e["ts"] > cur_e:
            busy += cur_e - cur_s
            if e["ts"] - cur_e >= min_gap_us: gaps.append((e["ts"] - cur_e, cur_e, e["ts"], last["name"], e["name"]))
            cur_s = e["ts"]
        if e["ts"] + e["dur"] >= cur_e: cur_e, last = e["ts"] + e["dur"], e
    busy += cur_e - cur_s
    span = (gpu[-1]["ts"] + gpu[-1]["dur"]) - gpu[0]["ts"]
    import numpy as np
    hs = np.array([e["ts"] for e in host], dtype=float); he = hs + np.array([e["dur"] for e in host], dtype=float)
    ss = np.array([e["ts"] for e in rt if "Synchronize" in e["name"] or "Memcpy" in e["name"]] or [0.0])
    se = ss + np.array([e["dur"] for e in rt if "Synchronize" in e["name"] or "Memcpy" in e["name"]] or [0.0])
    sn = [e["name"] for e in rt if "Synchronize" in e["name"] or "Memcpy" in e["name"]]
    by_op: dict = {}
    rows = []
    for g, a, b, before, after in sorted(gaps, reverse=True)[:400]:   # the longest gaps hold most of the idle time
        run = np.nonzero((hs <= a) & (he > a))[0]                     # host operators running when the GPU ran dry
        run = sorted(run, key=lambda i: hs[i])
        outer = host[run[0]]["name"] if len(run) else "(none)"
        inner = host[run[-1]]["name"] if len(run) else "(none)"
        began = np.nonzero((hs >= a) & (hs < b))[0]
        sync = sorted({sn[i] for i in np.nonzero((ss < b) & (se > a))[0]}) if sn else []
        key = f"{outer} > {inner}" if outer != inner else outer
        by_op[key] = by_op.get(key, 0.0) + g
        if len(rows) < 15:
            rows.append(dict(gap_ms=round(g / 1000, 3), before=before[:50], after=after[:50], running=key[:120],
                             began=", ".join(dict.fromkeys(host[i]["name"] for i in began[:30]))[:120],
                             sync=", ".join(sync)[:60]))
    small = sum(g for g, *_ in gaps if g < 100)
    return dict(span_ms_per_step=round(span / 1000 / n_steps, 2), busy_ms_per_step=round(busy / 1000 / n_steps, 2),
                idle_ms_per_step=round((span - busy) / 1000 / n_steps, 2), n_gaps=len(gaps),
                idle_in_gaps_under_100us_ms_per_step=round(small / 1000 / n_steps, 2),
                idle_in_400_longest_gaps_ms_per_step=round(sum(by_op.values()) / 1000 / n_steps, 2),
                idle_by_host_op_ms_per_step={k: round(v / 1000 / n_steps, 2) for k, v in
                                             sorted(by_op.items(), key=lambda kv: -kv[1])[:15]},
                longest_gaps=rows)


def idle_lines(d: dict) -> list[str]:
    if not d: return ["(no GPU kernels in the trace)"]
    out = [f"GPU timeline per step: span {d['span_ms_per_step']} ms, busy {d['busy_ms_per_step']} ms, idle "
           f"{d['idle_ms_per_step']} ms in {d['n_gaps']} gaps of 20 µs or more over the profiled steps "
           f"({d['idle_in_gaps_under_100us_ms_per_step']} ms/step of it in gaps under 100 µs). Profiling slows the host, "
           "so the idle time here is an upper bound.", "",
           f"Idle time of the 400 longest gaps ({d['idle_in_400_longest_gaps_ms_per_step']} ms/step) by the host "
           "operator running when the GPU ran dry (outermost > innermost):", "",
           "| ms/step | host operator |", "|---|---|"]
    out += [f"| {v} | `{k[:110]}` |" for k, v in d["idle_by_host_op_ms_per_step"].items()]
    out += ["", "Longest gaps:", "", "| gap ms | kernel before | kernel after | host running | host begun in the gap | sync calls |",
            "|---|---|---|---|---|---|"]
    out += [f"| {r['gap_ms']} | `{r['before']}` | `{r['after']}` | {r['running']} | {r['began']} | {r['sync']} |"
            for r in d["longest_gaps"]]
    return out


def summarize(meter, warmup: int) -> dict:
    import statistics
    ends, begins, toks = meter.step_end, meter.step_begin, meter.tokens
    n = len(ends)
    out = {"steps_done": n}
    if n == 0: return out
    # step i's time: from the end of step i-1 (or its own begin for the first) to its end
    wall = [ends[i] - (ends[i - 1] if i else begins[0]) for i in range(n)]
    compute = [e - b for b, e in zip(begins, ends)]
    idx = [i for i in range(n) if i >= warmup] or list(range(n))
    tps = [toks[i] / wall[i] for i in idx if wall[i] > 0]
    out.update(
        n_measured=len(idx),
        tokens_per_s=round(statistics.median(tps), 1) if tps else None,
        tokens_per_s_mean=round(sum(toks[i] for i in idx) / sum(wall[i] for i in idx), 1),
        tokens_per_s_min=round(min(tps), 1) if tps else None,
        tokens_per_s_max=round(max(tps), 1) if tps else None,
        step_s_median=round(statistics.median(wall[i] for i in idx), 4),
        step_compute_s_median=round(statistics.median(compute[i] for i in idx), 4),
        tokens_per_step_median=statistics.median(toks[i] for i in idx),
        first_step_s=round(wall[0], 3),
        first_step_from_start_s=round(ends[0] - T0, 2),
        first_step_from_train_s=round(ends[0] - meter.t_train_call, 2) if meter.t_train_call else None,
        train_begin_from_start_s=round(meter.t_train_begin - T0, 2) if meter.t_train_begin else None,
    )
    if meter.losses: out.update(loss_first=round(meter.losses[0], 4), loss_last=round(meter.losses[-1], 4),
                                losses=[round(x, 5) for x in meter.losses])
    return out


def liger_summary(model) -> str:
    "Which pieces of the trained model run Liger code (read after training)."
    import importlib
    try:
        m = model.get_base_model() if hasattr(model, "get_base_model") else model
        layer = m.model.layers[0]
        def where(fn): return getattr(getattr(fn, "__func__", fn), "__module__", "") or ""
        rope = getattr(importlib.import_module(type(m).__module__), "apply_rotary_pos_emb", None)
        parts = {"rms_norm": where(layer.input_layernorm.forward), "swiglu": where(layer.mlp.forward), "rope": where(rope)}
        return ", ".join(f"{k}={'transformers' if v.startswith('transformers.') else 'liger'}" for k, v in parts.items())
    except Exception as e:  # informative only
        return f"unknown ({type(e).__name__}: {e})"


def versions() -> dict:
    import importlib.metadata as md, platform
    out = {"python": platform.python_version()}
    for p in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "liger-kernel", "triton"):
        try: out[p] = md.version(p)
        except Exception: out[p] = None
    try:
        import torch
        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception: pass
    return out


# ---------------------------------------------------------------------------------------------------- CPU check aids
def cpu_liger_reference_ops():
    """CPU checks only. Liger's Triton kernels cannot run on CPU tensors (Triton's interpreter fails on its RMSNorm
    and SwiGLU and takes minutes for RoPE), so its RMSNorm and SwiGLU autograd Functions and its RoPE function are
    replaced by the PyTorch maths they implement. Liger's patching of the model itself is left as it is, so the path
    (TRL's flag -> transformers -> Liger's patches on a PEFT model) is what runs. Never used on a GPU."""
    import torch, torch.nn.functional as F
    import liger_kernel.transformers.rms_norm as rn, liger_kernel.transformers.swiglu as sw
    import liger_kernel.transformers.monkey_patch as mp

    class RMSNormRef:
        @staticmethod
        def apply(x, w, eps, offset=0.0, casting_mode="llama", in_place=True, row_mode=None):
            dt = x.dtype
            y = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(dt)
            return y if w is None else y * (offset + w)

    class SiLUMulRef:
        @staticmethod
        def apply(a, b, gate_multiplier=1.0, down_multiplier=1.0):
            return F.silu(a * gate_multiplier) * b * down_multiplier

    def rope_ref(q, k, cos, sin, position_ids=None, unsqueeze_dim=1, rotary_dim=None):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        half = lambda x: torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)
        return q * cos + half(q) * sin, k * cos + half(k) * sin

    rn.LigerRMSNormFunction, sw.LigerSiLUMulFunction, mp.liger_rotary_pos_emb = RMSNormRef, SiLUMulRef, rope_ref


# ---------------------------------------------------------------------------------------------------- implementations
def _ckpt_kwargs(config_cls, on: bool) -> dict:
    "Activation checkpointing under the name this transformers version knows (renamed after 5.17)."
    import dataclasses
    fields = {f.name for f in dataclasses.fields(config_cls)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    kw = {name: on}
    if on: kw[name + "_kwargs"] = {"use_reentrant": False}
    return kw


def bnb_config(dtype):
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)


def run_trl(a, folder: str, rows: list[dict], meter, info: dict, workdir: Path):
    "baseline / liger: the script a person writes by hand."
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    gpu = a.device == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    t = time.time()
    kw = {"dtype": dtype}
    if a.mode == "qlora": kw["quantization_config"] = bnb_config(dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, **kw)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    info["load_s"] = round(time.time() - t, 2)
    info["attn_implementation"] = model.config._attn_implementation
    t = time.time()
    args = SFTConfig(
        output_dir=str(workdir / "out"), bf16=gpu, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
        max_length=a.seq, packing=a.data == "mix", packing_strategy="bfd", learning_rate=LR,
        lr_scheduler_type=SCHEDULER, optim=OPTIM, logging_steps=1, report_to="none", save_strategy="no",
        max_steps=a.warmup + a.steps, use_liger_kernel=a.impl == "liger",
        **_ckpt_kwargs(SFTConfig, a.grad_ckpt), **({} if gpu else {"use_cpu": True}))
    peft_config = None if a.mode == "full" else LoraConfig(
        r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[meter, *meter.extra])
    info["trainer_init_s"] = round(time.time() - t, 2)
    meter.t_train_call = time.time()
    trainer.train()
    return trainer


UNSLOTH_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_unsloth(a, folder: str, rows: list[dict], meter, info: dict, workdir: Path):
    """unsloth: its standard recipe (`FastLanguageModel.from_pretrained`, `get_peft_model` on all seven projections,
    TRL's `SFTTrainer` as Unsloth patches it) with the baseline's settings. Unsloth was imported first (`one_run`)."""
    import torch
    from unsloth import FastLanguageModel
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    t = time.time()
    model, tokenizer = FastLanguageModel.from_pretrained(
        folder, max_seq_length=a.seq, dtype=torch.bfloat16, load_in_4bit=a.mode == "qlora",
        full_finetuning=a.mode == "full", local_files_only=True)
    if a.mode != "full":
        model = FastLanguageModel.get_peft_model(
            model, r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules=UNSLOTH_TARGETS,
            bias="none", use_gradient_checkpointing="unsloth" if a.grad_ckpt else False, random_state=a.seed)
    info["load_s"] = round(time.time() - t, 2)
    info["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    t = time.time()
    args = SFTConfig(
        output_dir=str(workdir / "out"), bf16=True, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
        max_length=a.seq, packing=a.data == "mix", packing_strategy="bfd", learning_rate=LR,
        lr_scheduler_type=SCHEDULER, optim=OPTIM, logging_steps=1, report_to="none", save_strategy="no",
        max_steps=a.warmup + a.steps, **_ckpt_kwargs(SFTConfig, False))   # Unsloth checkpoints through get_peft_model
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[meter, *meter.extra])
    info["trainer_init_s"] = round(time.time() - t, 2)
    meter.t_train_call = time.time()
    trainer.train()
    return trainer


def ftlab_yaml(a, folder: str, workdir: Path, extra: dict) -> str:
    "The ftlab config with the same settings as the baseline."
    import yaml
    gpu = a.device == "cuda"
    d = {"base_model": folder, "bf16": gpu}
    if a.mode != "full":
        d.update(adapter="lora" if a.mode == "lora" else "qlora", lora_r=LORA_R, lora_alpha=LORA_ALPHA,
                 lora_dropout=LORA_DROPOUT, lora_target_linear=True)
    if a.mode == "qlora": d["load_in_4bit"] = True
    d.update(sequence_len=a.seq, sample_packing=a.data == "mix", micro_batch_size=a.batch, gradient_accumulation_steps=1,
             max_steps=a.warmup + a.steps, learning_rate=LR, lr_scheduler=SCHEDULER, optimizer=OPTIM,
             gradient_checkpointing=bool(a.grad_ckpt), logging_steps=1,
             save_steps=10**9,                 # no checkpoint inside the run (the baseline has save_strategy="no")
             shuffle_merged_datasets=False,     # the rows are already random
             output_dir=str(workdir / "out"), dataset_prepared_path=str(workdir / "prepared"),
             datasets=[{"path": "@rows", "type": "tokenized"}])
    d.update(extra)
    return yaml.safe_dump(d, sort_keys=False)


@contextlib.contextmanager
def ftlab_run_hooks(cfg, info: dict, meter):
    """Around an ftlab `Run.train`: the model load and trainer build timed into `info`, the `train()` call marked on
    `meter`, and ftlab's end-of-run checkpoint and model save skipped (they come after the measurement, and the
    baseline saves nothing; full fine-tunes would spend minutes of GPU time writing to disk)."""
    import ftlab.methods as fm, ftlab.model as fmodel
    orig_load, method = fmodel.load_model, fm.get_method(cfg)
    orig_build = method.build
    def load_model(*args, **kw):
        t = time.time()
        m = orig_load(*args, **kw)
        info["load_s"] = round(time.time() - t, 2)
        info["attn_implementation"] = m.config._attn_implementation
        return m
    def build(*args, **kw):
        t = time.time()
        trainer = orig_build(*args, **kw)
        info["trainer_init_s"] = round(time.time() - t, 2)
        train = trainer.train
        def timed_train(*a_, **k_):
            # set here, after the run has wrapped the trainer's saving (`atomic_checkpoints`), so nothing is saved
            trainer._save_checkpoint = lambda *a_, **k_: None
            trainer.save_model = lambda *a_, **k_: None
            meter.t_train_call = time.time()
            return train(*a_, **k_)
        trainer.train = timed_train
        return trainer
    fmodel.load_model, method.build = load_model, build
    try: yield
    finally: fmodel.load_model, method.build = orig_load, orig_build


def run_ftlab(a, folder: str, rows: list[dict], meter, info: dict, workdir: Path):
    "ftlab: config -> Run -> train, with the meter as an extra callback."
    from ftlab.config import load_config
    from ftlab.run import Run
    extra = dict(FTLAB_EXTRA)
    for kv in a.ftlab_set or []:
        k, _, v = kv.partition("=")
        import yaml
        extra[k.strip()] = yaml.safe_load(v)
    text = ftlab_yaml(a, folder, workdir, extra)
    info["ftlab_extra"] = extra
    info["ftlab_config"] = text
    if a.print_config: print(text, flush=True)
    cfg = load_config(text, name="bench")
    if getattr(a, "solo_lora", False):
        import functools
        import ftlab.kernels.lora as fk
        fk.apply_fused_lora = functools.partial(fk.apply_fused_lora, share_input=False)
        info["ftlab_solo_lora"] = True
    if getattr(a, "no_grad_walk", False):     # transformers' own two walks of the module tree a step, to compare
        from transformers import TrainerCallback
        import ftlab.methods.grad_walk as gw
        class TransformersWalks(TrainerCallback):
            def release(self): pass
        gw.grad_walk_callback = lambda trainer: TransformersWalks()
        info["ftlab_grad_walk"] = False

    run = Run(cfg, namespace={"rows": rows})
    with ftlab_run_hooks(cfg, info, meter):
        run.train(callbacks=[meter, *meter.extra])
    return run.trainer


def offline_env():
    "No network for the libraries, no tokenizer threads, no advisory warnings (before anything imports them)."
    for k, v in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                 ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")): os.environ.setdefault(k, v)


def child_setup(device: str):
    "A benchmark process: offline, the libraries quiet, and the GPU it was asked for."
    offline_env()
    import torch
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no GPU (use --device cpu for checks)")
    import datasets, transformers
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()


def record_failure(row: dict, e: BaseException):
    "A run that failed is a result too: its status (`oom`, `error`) and the last line of the error in `row`."
    msg = f"{type(e).__name__}: {e}".strip()
    oom = type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()
    row["status"] = "oom" if oom else "error"
    row["error"] = "interrupted" if isinstance(e, KeyboardInterrupt) else (msg.splitlines()[-1][:400] or type(e).__name__)
    if not oom: traceback.print_exc()


def one_run(a) -> dict:
    offline_env()     # before Unsloth's import too
    cmd = "python bench/sft_bench.py " + shlex.join(sys.argv[1:])
    cfg_json = model_json(a.model)
    fpt = flops_per_token(cfg_json, a.seq)
    row = {"kind": "run", "model": a.model, "mode": a.mode, "impl": a.impl, "seq": a.seq, "data": a.data,
           "batch": a.batch, "steps": a.steps, "warmup": a.warmup, "grad_ckpt": bool(a.grad_ckpt), "device": a.device,
           "dtype": "bfloat16" if a.device == "cuda" else "float32", "status": "error", "error": None,
           "flops_per_token": fpt, "mfu_factor": round(mode_factor(a.mode), 4), "command": cmd}
    info: dict = {}
    meter = trainer = profiled = counted = None
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=Path(a.cache)))
    try:
        if a.impl == "unsloth":   # before transformers, TRL and PEFT, which it patches
            os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
            import unsloth  # noqa: F401
            info["unsloth"] = unsloth.__version__
        child_setup(a.device)
        import torch
        folder, prep = ensure_model(a.model, a.cache, a.device)
        if prep: row["model_prepare"] = prep
        world = int(os.environ.get("WORLD_SIZE", "1"))   # one of several processes (torchrun): each trains its share
        if world > 1: row["world_size"] = world
        rows = make_rows(a.data, (a.warmup + a.steps) * a.batch * world, a.seq, cfg_json["vocab_size"], seed=a.seed)
        if a.device == "cpu" and a.impl == "liger": cpu_liger_reference_ops(); row["liger_ops"] = "cpu check: PyTorch reference maths"
        if a.sdpa != "default":   # one attention backend for PyTorch's SDPA in this process, no fallback
            for name in ("flash", "cudnn", "efficient", "math"):
                getattr(torch.backends.cuda, f"enable_{'mem_efficient' if name == 'efficient' else name}_sdp")(name == a.sdpa)
            row["sdpa"] = a.sdpa
        meter = make_meter()
        meter.extra = []
        tag = f"{a.model}-{a.mode}-{a.impl}-{a.seq}" + (f"-{a.label}" if a.label else "")
        profiled = profile_callback(a.warmup, 2, a.profile, tag) if a.profile else None
        if a.count_syncs:
            sys.path.insert(0, str(HERE))
            from host_syncs import sync_callback
            counted = sync_callback(a.warmup, 2, a.count_syncs, tag)
        else: counted = None
        meter.extra = [cb for cb in (profiled, counted) if cb is not None]
        runner = {"ftlab": run_ftlab, "unsloth": run_unsloth}.get(a.impl, run_trl)
        trainer = runner(a, folder, rows, meter, info, workdir)
        row["status"] = "ok"
    except BaseException as e:  # noqa: BLE001 - a failing run is a result too
        record_failure(row, e)
    row.update(info)
    if meter is not None and profiled is not None and profiled.summary:
        row["profile_pct"] = profiled.summary
        if profiled.idle: row["profile_idle"] = {k: v for k, v in profiled.idle.items() if k != "longest_gaps"}
    if meter is not None and counted is not None and counted.summary:
        row["host_syncs_per_step"] = counted.summary["per_step"]
        row["host_syncs_by_source"] = counted.summary["by_source"]
    if meter is not None:
        row.update(summarize(meter, a.warmup))
        if meter.params: row["params_trainable"], row["params_total"] = meter.params
        row["alloc_at_train_begin_gib"] = _gib(meter.alloc_at_begin)
    if row["status"] == "ok" and row.get("steps_done", 0) < a.warmup + a.steps:
        row["status"], row["error"] = "error", f"only {row.get('steps_done')} of {a.warmup + a.steps} steps ran"
    if row.get("tokens_per_s") and a.device == "cuda":
        row["mfu_pct"] = round(100 * row["tokens_per_s"] * fpt * mode_factor(a.mode) / (PEAK_TFLOPS * 1e12), 2)
    try:
        import torch
        if torch.cuda.is_available():
            row["peak_alloc_gib"] = _gib(torch.cuda.max_memory_allocated())
            row["peak_reserved_gib"] = _gib(torch.cuda.max_memory_reserved())
            row["gpu_total_gib"] = _gib(torch.cuda.get_device_properties(0).total_memory)
        import resource   # host memory: activation offloading keeps layer inputs there
        row["peak_rss_gib"] = _gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    except Exception: pass
    if a.label: row["variant"] = a.label
    if trainer is not None and getattr(trainer.args, "use_liger_kernel", False):
        row["liger_patched"] = liger_summary(trainer.model)
    if a.impl == "ftlab" and trainer is not None:
        try:
            from ftlab.kernels.lora import fused_lora_summary
            summ = fused_lora_summary(trainer.model)
            row["fused_lora_layers"] = len(summ["patched"])
            row["fused_lora_shared_input_groups"] = summ.get("shared_input_groups")
        except Exception as e:  # informative only
            row["fused_lora_layers"] = f"unknown ({type(e).__name__})"
    row["versions"] = versions()
    row["wall_s"] = round(time.time() - T0, 2)
    shutil.rmtree(workdir, ignore_errors=True)
    return row


# ---------------------------------------------------------------------------------------------------- longest sequence
def est_step_s(cfg: dict, seq: int, mode: str, grad_ckpt: bool, tflops: float) -> float:
    "A rough step time at `tflops` effective, used only to skip lengths that cannot finish within the budget."
    f = flops_per_token(cfg, seq) * mode_factor(mode) * seq * (4 / 3 if grad_ckpt else 1)
    return f / (tflops * 1e12)


def find_max_seq(a) -> dict:
    "Increasing sequence lengths, one child process each, until one does not fit (or the time budget is spent)."
    cfg = model_json(a.model)
    seqs = [int(s) for s in a.seqs.split(",")]
    t_start, attempts, longest, first_fail = time.time(), [], None, None
    here = str(Path(__file__).resolve())
    base = [sys.executable, here, "--model", a.model, "--mode", a.mode, "--impl", a.impl, "--data", "packed",
            "--steps", str(a.fit_steps), "--warmup", "0", "--batch", "1", "--device", a.device, "--cache", a.cache]
    if a.grad_ckpt or not a.no_grad_ckpt: base.append("--grad-ckpt")
    for x in a.ftlab_set or []: base += ["--ftlab-set", x]
    note = None
    for seq in seqs:
        left = a.budget_s - (time.time() - t_start)
        # load + quantize (~60 s) and the steps at 300 TFLOP/s of the formula's FLOPs (131k tokens ran at 346 on the
        # H200, raw/h200-cmd8-maxseq.jsonl; the formula counts full, not causal, attention)
        need = 60 + a.fit_steps * est_step_s(cfg, seq, a.mode, True, 300)
        if need > left:
            note = f"stopped before {seq}: about {need:.0f} s needed, {left:.0f} s of the budget left"
            break
        cmd = base + ["--seq", str(seq)]
        print(f"[max-seq] trying {seq} tokens ({a.impl}, {a.mode}, grad ckpt), budget left {left:.0f} s", flush=True)
        t = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30, left))
            res = next((json.loads(l[len(RESULT_TAG):]) for l in p.stdout.splitlines() if l.startswith(RESULT_TAG)), None)
            if res is None:
                tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
                res = {"status": "crash", "error": tail[0][:300]}
        except subprocess.TimeoutExpired:
            res = {"status": "timeout", "error": f"over {left:.0f} s"}
        r = {"seq": seq, "status": res["status"], "error": res.get("error"), "peak_alloc_gib": res.get("peak_alloc_gib"),
             "peak_reserved_gib": res.get("peak_reserved_gib"), "gpu_total_gib": res.get("gpu_total_gib"),
             "tokens_per_s": res.get("tokens_per_s"), "step_s_median": res.get("step_s_median"),
             "load_s": res.get("load_s"), "peak_rss_gib": res.get("peak_rss_gib"), "wall_s": round(time.time() - t, 1)}
        attempts.append(r)
        print(f"[max-seq] {seq}: {r['status']} peak {r['peak_alloc_gib']} GiB alloc / {r['peak_reserved_gib']} GiB "
              f"reserved, {r['step_s_median']} s/step, {r['wall_s']} s", flush=True)
        if r["status"] == "ok":
            longest = seq
        else:
            first_fail = seq
            break
    else:
        note = note or "every length tried fit"
    return {"kind": "max_seq", "model": a.model, "mode": a.mode, "impl": a.impl, "batch": 1, "grad_ckpt": "--grad-ckpt" in base,
            "fit_steps": a.fit_steps, "device": a.device, "longest_ok": longest, "first_failed": first_fail,
            "predicted_max": predict_max_seq(attempts), "note": note, "attempts": attempts,
            "command": "python bench/sft_bench.py " + shlex.join(sys.argv[1:]), "wall_s": round(time.time() - T0, 1)}


def predict_max_seq(attempts: list[dict]) -> int | None:
    """Where a straight line through (seq, peak reserved) of the lengths that fit reaches 97% of the GPU's memory,
    rounded down to a multiple of 4096. With activation checkpointing memory grows about linearly with the length;
    this is an extrapolation, not a measurement."""
    pts = [(t["seq"], t["peak_reserved_gib"]) for t in attempts if t["status"] == "ok" and t.get("peak_reserved_gib")]
    total = next((t["gpu_total_gib"] for t in attempts if t.get("gpu_total_gib")), None)
    if len(pts) < 2 or not total: return None
    n = len(pts); mx = sum(x for x, _ in pts) / n; my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0: return None
    b = sum((x - mx) * (y - my) for x, y in pts) / sxx
    if b <= 0: return None
    a = my - b * mx
    return int((0.97 * total - a) / b) // 4096 * 4096


# ---------------------------------------------------------------------------------------------------- CLI
def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a name from bench/models/ (" + ", ".join(model_names()) + ")")
    ap.add_argument("--mode", choices=["full", "lora", "qlora"], default="lora")
    ap.add_argument("--impl", choices=["baseline", "liger", "ftlab", "unsloth"], default="baseline")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--data", choices=["packed", "mix", "learn"], default="packed",
                    help="packed: random ids, rows of exactly seq; mix: length mix packed by TRL; learn: rows of seq "
                         "tokens with a learnable structure (loss curves)")
    ap.add_argument("--sdpa", choices=["default", "flash", "cudnn", "efficient"], default="default",
                    help="the only attention backend PyTorch's SDPA may use in this run (default: PyTorch's choice)")
    ap.add_argument("--solo-lora", action="store_true",
                    help="ftlab's fused LoRA without computing q/k/v and gate/up together (one node per projection)")
    ap.add_argument("--no-grad-walk", action="store_true",
                    help="ftlab without its one walk of the parameters (ftlab.methods.grad_walk): transformers' walks")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="profile 2 steps after warm-up with torch.profiler; write DIR/profile-*.md (kernel table)")
    ap.add_argument("--count-syncs", default=None, metavar="DIR",
                    help="count the host waits (.item(), bool(tensor), copies to the host, data-dependent shapes) of 2 "
                         "steps after warm-up by call site; write DIR/syncs-*.md (see bench/host_syncs.py)")
    ap.add_argument("--steps", type=int, default=None, help="measured steps after warm-up (default 20; cpu 3)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps, not measured (default 5; cpu 2)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing on")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: float32 checks only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="append the result line to this JSONL file")
    ap.add_argument("--cache", default=DEFAULT_CACHE, help="model folders and scratch (default %(default)s)")
    ap.add_argument("--ftlab-set", action="append", metavar="KEY=VALUE", help="extra ftlab config key (repeatable)")
    ap.add_argument("--label", help="a name for this ftlab variant, kept in the row (`variant`) and shown in tables")
    ap.add_argument("--print-config", action="store_true", help="print the ftlab YAML config")
    ap.add_argument("--prepare-model", metavar="NAME", help="only build and save the model folder")
    ap.add_argument("--find-max-seq", action="store_true", help="longest sequence that fits at batch 1")
    ap.add_argument("--seqs", default=MAXSEQ_LADDER,
                    help="lengths tried by --find-max-seq, increasing")
    ap.add_argument("--fit-steps", type=int, default=2, help="steps per --find-max-seq attempt")
    ap.add_argument("--budget-s", type=float, default=480, help="time budget of --find-max-seq")
    ap.add_argument("--no-grad-ckpt", action="store_true", help="--find-max-seq without activation checkpointing")
    return ap


def main(argv=None):
    a = parser().parse_args(argv)
    Path(a.cache).mkdir(parents=True, exist_ok=True)
    if a.prepare_model:
        res = prepare_model(a.prepare_model, a.cache, a.device)
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0
    if not a.model: raise SystemExit("--model is required")
    cpu = a.device == "cpu"
    a.steps = a.steps if a.steps is not None else (3 if cpu else 20)
    a.warmup = a.warmup if a.warmup is not None else (2 if cpu else 5)
    row = find_max_seq(a) if a.find_max_seq else one_run(a)
    if row.get("world_size", 1) > 1:
        # several processes: rank 0's figures are per GPU (each rank trains the same shape of batch); the total is
        # rank 0's times the number of processes, and only rank 0 reports
        if row.get("tokens_per_s"): row["tokens_per_s_total"] = round(row["tokens_per_s"] * row["world_size"], 1)
        if int(os.environ.get("RANK", "0")) != 0: return 0 if row.get("status", "ok") == "ok" else 1
    line = json.dumps(row, default=str)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        with open(a.out, "a") as f: f.write(line + "\n")
    print(RESULT_TAG + line, flush=True)
    return 0 if row.get("status", "ok") == "ok" else (3 if row.get("status") == "oom" else 1)


if __name__ == "__main__":
    sys.exit(main())
