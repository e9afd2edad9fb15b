"""GRPO step time split into generation, reward scoring and update: TRL's GRPOTrainer with transformers' default
`generate` beside ftlab's GRPO with the generation settings transformers and TRL already have, in one command.

    python bench/grpo_bench.py --model llama-3.2-1b                        # the GPU machine: every row
    python bench/grpo_bench.py --model llama-3.1-8b --rows trl,ftlab-static --warmup 1 --steps 2
    python bench/grpo_bench.py --model tiny --device cpu                    # plumbing check; its speeds mean nothing

Every row trains the same random-init model (`bench/models/NAME.json`, built once by `sft_bench.py`'s model cache)
with LoRA r16 on all linear layers (`--mode full` for full fine-tuning), bf16 on a GPU, on `--prompts` prompts per
step of exactly `--prompt-len` tokens, `--generations` completions each of exactly `--completion-len` tokens
(`min_new_tokens` = `max_completion_length`; transformers' continuous batching may not apply `min_new_tokens`, so the
mean completion length is reported per row), a reward that costs nothing, no KL term (TRL's default `beta: 0`),
no activation checkpointing unless `--grad-ckpt`. Rows (`--rows`, comma-separated; `--variant` adds more):

  trl                TRL's GRPOTrainer as a person writes it: `from_pretrained` + `GRPOConfig` + `peft.LoraConfig`;
                     transformers' `generate` with its default dynamic KV cache (TRL turns compilation off)
  ftlab              ftlab's GRPO (YAML -> `Run`), its defaults: on a GPU ftlab's static-cache sampler with CUDA
                     graphs (`trl.sampler: auto`), ftlab's fused LoRA projections and Liger's kernels
  ftlab-generate     + `trl.sampler: generate`: the same `generate` as the trl row
  ftlab-static       + `cache_implementation: static` and `generation_kwargs: {disable_compile: false}`: a static KV
                     cache and transformers' compiled decoding step (CUDA graphs)
  ftlab-paged        + `use_transformers_continuous_batching: true`: transformers' continuous batching, paged KV cache
  ftlab-gen4         + `generation_batch_size` = 4 x the micro-batch: four steps' completions generated at once
                     (trained over the next four optimizer steps)
  ftlab-static-gen4  static + compiled with the 4x generation batch

Each row runs in a child process of its own (`--row`), so memory figures and compiled state belong to it. TRL's
trainer is timed with ftlab's `GRPOPhases` (measurement only), ftlab's logs the same `timing/*` metrics itself.
Per row, over the measured steps (after `--warmup`; rows that generate every k steps round both up to multiples
of k, so every figure is per optimizer step):

  timing/*        seconds per step in generation, reward scoring, log-probs before the update, the update itself,
                  and the whole step (`torch.cuda.synchronize()` at each boundary)
  gen tok/s       completion tokens generated / generation seconds
  decode ms       generation seconds per `generate` call / completion length (the prefill is inside)
  weight-read ms  the trained model's parameter bytes / the memory bandwidth measured in the same process (a
                  device-to-device copy of `--bw-mib` MiB: bytes read + written / time)
  ratio           decode ms / weight-read ms: how far one decoding step is from reading the weights once
  sampler step    ftlab's sampler only: one decoding step alone (its CUDA graph replayed after a prefill, the
                  fastest of 3 passes over the completion length), and that over weight-read ms; with
                  `--profile-decode DIR`, the kernels of one step (DIR/decode-profile-ROW.md)

Writes `$OUT/grpo_bench.jsonl` and `grpo_bench.md` (or `--out-dir`). Prints `BENCH_RESULT {json}` per row.
"""
from __future__ import annotations
import time
T0 = time.time()
import argparse, json, math, os, shlex, subprocess, sys, tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import sft_bench as sb  # noqa: E402

# row -> (implementation, extra keys of the ftlab config's `trl:` section, generation period k, what it is)
ROWS = {
    "trl": ("trl", {}, 1, "TRL GRPOTrainer, transformers generate (dynamic cache)"),
    "ftlab": ("ftlab", {}, 1, "ftlab GRPO, defaults (on a GPU: ftlab's CUDA-graph sampler)"),
    "ftlab-generate": ("ftlab", {"sampler": "generate"}, 1, "ftlab GRPO, transformers generate (dynamic cache)"),
    "ftlab-static": ("ftlab", {"cache_implementation": "static", "generation_kwargs": {"disable_compile": False}}, 1,
                     "static KV cache + compiled decoding"),
    "ftlab-paged": ("ftlab", {"use_transformers_continuous_batching": True}, 1, "continuous batching (paged)"),
    "ftlab-gen4": ("ftlab", {}, 4, "generation_batch_size 4x"),
    "ftlab-static-gen4": ("ftlab", {"cache_implementation": "static", "generation_kwargs": {"disable_compile": False}}, 4,
                          "static + compiled, generation_batch_size 4x"),
}
DEFAULT_ROWS = "trl,ftlab,ftlab-generate,ftlab-static,ftlab-paged,ftlab-gen4"
PHASES = ("generation", "rewards", "logprobs", "update")


def bench_reward(completions, **kw):
    "A reward that costs nothing and still spreads within each group (so the advantages are not all 0)."
    return [float(i % 2) for i in range(len(completions))]


def measure_bandwidth(device: str, mib: int, iters: int = 10) -> float:
    "Bytes per second a device-to-device copy moves (read + written), after one warm-up copy."
    import torch
    n = mib * 2**20
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x); sb._sync()
    t = time.perf_counter()
    for _ in range(iters): y.copy_(x)
    sb._sync()
    dt = time.perf_counter() - t
    del x, y
    if torch.cuda.is_available():        # the copy's buffers are not the row's memory
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    return 2 * n * iters / dt


def prompt_rows(n: int, length: int, cfg_json: dict, seed: int = 0) -> list[dict]:
    "`n` text prompts of exactly `length` tokens of the bench tokenizer (one word per id; no special token among them)."
    import numpy as np
    eos = cfg_json.get("eos_token_id")
    special = {0, cfg_json.get("bos_token_id"), *(eos if isinstance(eos, list) else [eos])}
    rng = np.random.default_rng(seed)
    return [{"prompt": " ".join(f"t{i if i not in special else 3}" for i in rng.integers(3, cfg_json["vocab_size"], size=length))}
            for _ in range(n)]


def step_meter():
    "A TrainerCallback that keeps each step's end (synchronized) and each training log record."
    from transformers import TrainerCallback

    class StepMeter(TrainerCallback):
        def __init__(self): self.ends, self.logs, self.t_train_call = [], [], None
        def on_step_end(self, args, state, control, **kw):
            sb._sync(); self.ends.append(time.perf_counter())
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "timing/step" in logs: self.logs.append(dict(logs, step=state.global_step))
    return StepMeter()


def settings(a, gen_k: int) -> dict:
    "The shared settings of every row: batch, lengths, steps (rounded up to whole generation periods)."
    per_step = a.prompts * a.generations
    up = lambda n: math.ceil(n / gen_k) * gen_k
    return dict(micro_batch=per_step, warmup=up(a.warmup), steps=up(a.steps), gen_batch=per_step * gen_k,
                seq=a.prompt_len + a.completion_len + 8)


def run_trl(a, folder: str, prompts: list[dict], s: dict, meter, info: dict, workdir: Path):
    "TRL's GRPOTrainer as written by hand, timed by ftlab's GRPOPhases (which only measures)."
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    from ftlab.methods.grpo import GRPOPhases
    gpu = a.device == "cuda"
    t = time.time()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if gpu else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    info["load_s"] = round(time.time() - t, 2)
    args = GRPOConfig(
        output_dir=str(workdir / "out"), per_device_train_batch_size=s["micro_batch"], gradient_accumulation_steps=1,
        num_generations=a.generations, max_completion_length=a.completion_len,
        generation_kwargs={"min_new_tokens": a.completion_len}, learning_rate=sb.LR, lr_scheduler_type=sb.SCHEDULER,
        optim=sb.OPTIM if gpu else "adamw_torch", logging_steps=1, report_to="none", save_strategy="no",
        max_steps=s["warmup"] + s["steps"], bf16=gpu, seed=a.seed, disable_tqdm=True,
        **sb._ckpt_kwargs(GRPOConfig, a.grad_ckpt), **({} if gpu else {"use_cpu": True}))
    peft_config = None if a.mode == "full" else LoraConfig(
        r=sb.LORA_R, lora_alpha=sb.LORA_ALPHA, lora_dropout=sb.LORA_DROPOUT, target_modules="all-linear", task_type="CAUSAL_LM")
    timed = type("TimedGRPOTrainer", (GRPOPhases, GRPOTrainer), {})
    trainer = timed(model=model, reward_funcs=[bench_reward], args=args, train_dataset=Dataset.from_list(prompts),
                    processing_class=tokenizer, peft_config=peft_config, callbacks=[meter])
    from transformers.trainer_callback import PrinterCallback
    trainer.remove_callback(PrinterCallback)         # as ftlab's runs do: no log dict printed per step
    meter.t_train_call = time.time()
    trainer.train()
    return trainer


def ftlab_config(a, folder: str, s: dict, trl_extra: dict, top_extra: dict, workdir: Path) -> str:
    "The ftlab YAML with the same settings as the TRL row."
    import yaml
    gpu = a.device == "cuda"
    d = {"base_model": folder, "bf16": gpu, "rl": "grpo"}
    if a.mode != "full":
        d.update(adapter="lora", lora_r=sb.LORA_R, lora_alpha=sb.LORA_ALPHA, lora_dropout=sb.LORA_DROPOUT,
                 lora_target_linear=True)
    trl = {"reward_funcs": ["@bench_reward"], "num_generations": a.generations, "max_completion_length": a.completion_len,
           "log_completions": False}
    for k, v in trl_extra.items():
        trl[k] = {**trl.get(k, {}), **v} if isinstance(v, dict) else v
    trl["generation_kwargs"] = {"min_new_tokens": a.completion_len, **trl.get("generation_kwargs", {})}
    if s["gen_batch"] != s["micro_batch"]: trl["generation_batch_size"] = s["gen_batch"]
    d.update(sequence_len=s["seq"], micro_batch_size=s["micro_batch"], gradient_accumulation_steps=1,
             max_steps=s["warmup"] + s["steps"], learning_rate=sb.LR, lr_scheduler=sb.SCHEDULER,
             optimizer=sb.OPTIM if gpu else "adamw_torch", gradient_checkpointing=bool(a.grad_ckpt), logging_steps=1,
             save_steps=10**9, seed=a.seed, output_dir=str(workdir / "out"), dataset_prepared_path=str(workdir / "prepared"),
             datasets=[{"path": "@prompts", "type": "passthrough"}], trl=trl)
    d.update(top_extra)
    return yaml.safe_dump(d, sort_keys=False)


def run_ftlab(a, folder: str, prompts: list[dict], s: dict, meter, info: dict, workdir: Path, trl_extra: dict,
              top_extra: dict):
    from ftlab.config import load_config
    from ftlab.run import Run
    text = ftlab_config(a, folder, s, trl_extra, top_extra, workdir)
    info["ftlab_config"] = text
    if a.print_config: print(text, flush=True)
    cfg = load_config(text, name="grpo-bench")
    run = Run(cfg, namespace={"prompts": prompts, "bench_reward": bench_reward})
    with sb.ftlab_run_hooks(cfg, info, meter):
        run.train(callbacks=[meter])
    info["notes"] = [r["message"] for r in run.records if r["event"] == "note"]
    return run.trainer


def summarize(meter, s: dict, a, bandwidth: float, weight_bytes: int) -> dict:
    "Per-step means over the measured steps, and the generation figures."
    logs = [r for r in meter.logs if r["step"] > s["warmup"]]
    out = {"steps_done": len(meter.logs), "n_measured": len(logs)}
    if not logs: return out
    mean = lambda key: sum(r.get(key) or 0.0 for r in logs) / len(logs)
    for p in (*PHASES, "step"): out[f"{p}_s"] = round(mean(f"timing/{p}"), 4)
    out["trl_step_time_s"] = round(mean("step_time"), 4)
    ends = meter.ends
    if len(ends) > s["warmup"]:
        out["wall_s_per_step"] = round((ends[-1] - ends[s["warmup"] - 1]) / len(logs), 4) if s["warmup"] else None
    gen = [r for r in logs if (r.get("timing/generation") or 0) > 0]
    out["generate_calls"] = len(gen)
    if gen:
        lengths = [r["completions/mean_length"] for r in gen if r.get("completions/mean_length") is not None]
        mean_len = sum(lengths) / len(lengths) if lengths else float(a.completion_len)
        gen_s = sum(r["timing/generation"] for r in gen)
        out["completion_len_mean"] = round(mean_len, 2)
        out["gen_tokens_per_s"] = round(len(gen) * s["gen_batch"] * mean_len / gen_s, 1)
        out["decode_ms"] = round(1000 * gen_s / len(gen) / a.completion_len, 3)
    out["weight_bytes"] = weight_bytes
    out["bandwidth_gb_s"] = round(bandwidth / 1e9, 1)
    out["weight_read_ms"] = round(1000 * weight_bytes / bandwidth, 4)
    if out.get("decode_ms"): out["decode_over_weight_read"] = round(out["decode_ms"] / out["weight_read_ms"], 2)
    return out


def sampler_step(trainer, a, reps: int = 3) -> dict:
    """One decoding step of ftlab's sampler alone: after a prefill, its recorded step (the CUDA graph; on a CPU the
    same steps run one by one) repeated over the completion length, `reps` times, the fastest kept (`sampler_step_ms`).
    No prefill, setup or merge refresh inside, unlike `decode ms`. With `--profile-decode DIR`, one step run eagerly
    under the profiler too: its kernels, how many and their summed GPU time (`decode_kernels_per_step`,
    `decode_kernel_ms_per_step`), and `DIR/decode-profile-ROW.md`. Empty where the row did not sample with it."""
    import contextlib, torch
    sampler = getattr(trainer, "sampler", None)
    if sampler is None or not sampler.decoders: return {}
    d = next(reversed(sampler.decoders.values()))         # the shape the measured steps used
    batch, n = d.tok.shape[0], d.s.max_new_tokens - 1
    if n < 1: return {}
    # the decoder's cache holds the prompt and the completion: a longer prompt would replay past its end
    assert a.prompt_len + d.s.max_new_tokens <= d.length, (a.prompt_len, d.s.max_new_tokens, d.length)
    dev = d.tok.device
    ids = torch.randint(0, trainer.model.config.vocab_size, (batch, a.prompt_len), device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    model, was = trainer.model, trainer.model.training
    out, best = {}, None
    model.eval()
    try:
        with torch.no_grad(), (sampler.merged.applied() if sampler.merged else contextlib.nullcontext()):
            for _ in range(reps):
                d.prefill(ids, torch.ones_like(ids))
                sync(); t = time.perf_counter()
                for _ in range(n): d.graph.replay() if d.graph is not None else d.step()
                sync(); ms = 1000 * (time.perf_counter() - t) / n
                best = ms if best is None else min(best, ms)
            out["sampler_step_ms"] = round(best, 3)
            if a.profile_decode:
                d.prefill(ids, torch.ones_like(ids))
                sync()
                acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
                with torch.profiler.profile(activities=acts) as prof:
                    d.step(); sync()
                out.update(decode_profile(prof, a, d.graph is not None, best))
    finally: model.train(was)
    return out


def decode_profile(prof, a, graphs: bool, step_ms: float) -> dict:
    "The kernels of one eager decoding step (count, summed GPU time, the longest by name) and their table, written out."
    import torch
    cuda = torch.autograd.DeviceType.CUDA
    ks = [e for e in prof.key_averages() if getattr(e, "device_type", None) == cuda
          and getattr(e, "self_device_time_total", 0) > 0 and "#" not in e.key]
    n, us = sum(e.count for e in ks), sum(e.self_device_time_total for e in ks)
    out = {"decode_kernels_per_step": n, "decode_kernel_ms_per_step": round(us / 1000, 3)}
    lines = [f"{a.model} {a.row}: the kernels of one decoding step run eagerly (the recorded graph runs the same ones); "
             f"{n} kernels, {us / 1000:.3f} ms of GPU time in all; the recorded step takes {step_ms:.3f} ms"
             + ("" if graphs else " (no graph: eager steps)"), "",
             "| ms | share | launches | kernel |", "|---|---|---|---|"]
    lines += [f"| {e.self_device_time_total / 1000:.3f} | {100 * e.self_device_time_total / max(us, 1):.1f}% | {e.count} | "
              f"`{e.key[:100]}` |" for e in sorted(ks, key=lambda e: -e.self_device_time_total)[:40]]
    folder = Path(a.profile_decode)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"decode-profile-{a.row}.md").write_text("\n".join(lines) + "\n")
    return out


def one_row(a) -> dict:
    "One row, in this process."
    impl, trl_extra, gen_k, what = row_spec(a)
    s = settings(a, gen_k)
    cfg_json = sb.model_json(a.model)
    row = {"kind": "grpo", "row": a.row, "what": what, "impl": impl, "model": a.model, "mode": a.mode, "device": a.device,
           "prompts_per_step": a.prompts, "generations": a.generations, "prompt_len": a.prompt_len,
           "completion_len": a.completion_len, "generation_batch": s["gen_batch"], "warmup": s["warmup"], "steps": s["steps"],
           "grad_ckpt": bool(a.grad_ckpt), "status": "error", "error": None,
           "command": "python bench/grpo_bench.py " + shlex.join(child_args(a, a.row))}
    info: dict = {}
    meter = trainer = bandwidth = None
    workdir = Path(tempfile.mkdtemp(prefix="grpo-", dir=Path(a.cache)))
    try:
        sb.child_setup(a.device)
        bandwidth = measure_bandwidth(a.device, a.bw_mib)
        if a.in_process: folder = sb.prepare_model(a.model, a.cache, a.device)["folder"]
        else: folder, _ = sb.ensure_model(a.model, a.cache, a.device)
        prompts = prompt_rows(2 * (s["warmup"] + s["steps"]) * a.prompts * gen_k, a.prompt_len, cfg_json, a.seed)
        meter = step_meter()
        if impl == "trl": trainer = run_trl(a, folder, prompts, s, meter, info, workdir)
        else: trainer = run_ftlab(a, folder, prompts, s, meter, info, workdir, trl_extra, top_extra(a))
        row["status"] = "ok"
    except BaseException as e:  # noqa: BLE001 - a failing row is a result too
        sb.record_failure(row, e)
    row.update(info)
    if meter is not None and trainer is not None:
        model = trainer.model
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        row.update(summarize(meter, s, a, bandwidth, weight_bytes))
        row["liger"] = bool(getattr(trainer.args, "use_liger_kernel", False))
        try:
            row.update(sampler_step(trainer, a))
            if row.get("sampler_step_ms") and row.get("weight_read_ms"):
                row["sampler_step_over_weight_read"] = round(row["sampler_step_ms"] / row["weight_read_ms"], 2)
        except Exception as e:  # informative only
            row["sampler_step_error"] = f"{type(e).__name__}: {e}"
        try:
            from ftlab.kernels.lora import fused_lora_summary
            row["fused_lora_layers"] = len(fused_lora_summary(model)["patched"])
        except Exception: pass
    if row["status"] == "ok" and row.get("n_measured", 0) < s["steps"]:
        row["status"], row["error"] = "error", f"only {row.get('n_measured')} of {s['steps']} measured steps logged"
    try:
        import torch
        if torch.cuda.is_available():
            row["peak_alloc_gib"] = sb._gib(torch.cuda.max_memory_allocated())
            row["peak_reserved_gib"] = sb._gib(torch.cuda.max_memory_reserved())
    except Exception: pass
    row["versions"] = sb.versions()
    row["wall_s"] = round(time.time() - T0, 2)
    import shutil
    shutil.rmtree(workdir, ignore_errors=True)
    return row


# ---------------------------------------------------------------------------------------------------- rows, variants
def parse_sets(items) -> dict:
    "`key=value` items (values read as YAML) into a nested dict; dots nest (`trl.cache_implementation=static`)."
    import yaml
    out: dict = {}
    for kv in items or []:
        k, _, v = kv.partition("=")
        *path, last = k.strip().split(".")
        d = out
        for p in path: d = d.setdefault(p, {})
        d[last] = yaml.safe_load(v)
    return out


def row_spec(a):
    "(implementation, trl extras, generation period, description) of `a.row` (a preset, or a `--variant` label)."
    if a.row in ROWS and not a.set: return ROWS[a.row]
    base = ROWS.get(a.base or "ftlab")
    sets = parse_sets(a.set)
    trl = {**base[1], **sets.get("trl", {})}
    return base[0], trl, int(a.gen_factor or base[2]), f"{base[3]} + " + ", ".join(a.set or [])


def top_extra(a) -> dict:
    return {k: v for k, v in parse_sets(a.set).items() if k != "trl"}


def child_args(a, row: str, variant: tuple | None = None) -> list[str]:
    "The command-line arguments that run `row` alone."
    out = ["--row", row, "--model", a.model, "--mode", a.mode, "--device", a.device, "--prompts", str(a.prompts),
           "--generations", str(a.generations), "--prompt-len", str(a.prompt_len), "--completion-len", str(a.completion_len),
           "--warmup", str(a.warmup), "--steps", str(a.steps), "--cache", a.cache, "--seed", str(a.seed),
           "--bw-mib", str(a.bw_mib)]
    if a.grad_ckpt: out.append("--grad-ckpt")
    if a.profile_decode: out += ["--profile-decode", a.profile_decode]
    if variant is not None:
        base, k, sets = variant
        out += ["--base", base] + (["--gen-factor", str(k)] if k else [])
        for x in sets: out += ["--set", x]
    elif a.set:
        out += (["--base", a.base] if a.base else []) + (["--gen-factor", str(a.gen_factor)] if a.gen_factor else [])
        for x in a.set: out += ["--set", x]
    return out


def parse_variant(text: str) -> tuple[str, tuple]:
    "`LABEL:[BASE:]KEY=VALUE,...` -> (label, (base row, generation period or None, sets)); `gen=K` sets the period."
    label, _, rest = text.partition(":")
    base = "ftlab"
    head, _, tail = rest.partition(":")
    if head in ROWS: base, rest = head, tail
    sets, k = [], None
    for x in [x for x in rest.split(",") if x]:
        if x.startswith("gen="): k = int(x[4:])
        else: sets.append(x)
    return label, (base, k, sets)


# ---------------------------------------------------------------------------------------------------- the command
def render(rows: list[dict], command: str) -> str:
    ok = [r for r in rows if r.get("status") == "ok"]
    ref = next((r for r in ok if r["row"] == "trl"), None)
    r0 = ok[0] if ok else (rows[0] if rows else {})     # a row that timed out has no settings to show
    v = r0.get("versions") or {}
    lines = [f"### `{command}`", "",
             f"{r0.get('model')} {r0.get('mode')}, {r0.get('device')} ({v.get('gpu') or 'cpu'}); {r0.get('prompts_per_step')} "
             f"prompt(s) x {r0.get('generations')} completions per step, prompt {r0.get('prompt_len')} tokens, completion "
             f"{r0.get('completion_len')} tokens; torch {v.get('torch')}, transformers {v.get('transformers')}, trl "
             f"{v.get('trl')}. Seconds per optimizer step (mean over the measured steps); `× trl`: generation tokens/s "
             "over the trl row's.", "",
             "| row | status | step s | generation s | rewards s | log-probs s | update s | gen tok/s | × trl | "
             "decode ms | weight-read ms | decode / weight-read | sampler step ms | step / weight-read | GB/s | "
             "completion len | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = lambda k: "–" if r.get(k) is None else r[k]
        x = (f"{r['gen_tokens_per_s'] / ref['gen_tokens_per_s']:.2f}" if ref and r.get("gen_tokens_per_s") and
             ref.get("gen_tokens_per_s") else "–")
        status = r.get("status") + (f" ({r['error'][:80]})" if r.get("error") else "")
        lines.append(f"| {r['row']} | {status} | {f('step_s')} | {f('generation_s')} | {f('rewards_s')} | {f('logprobs_s')} | "
                     f"{f('update_s')} | {f('gen_tokens_per_s')} | {x} | {f('decode_ms')} | {f('weight_read_ms')} | "
                     f"{f('decode_over_weight_read')} | {f('sampler_step_ms')} | {f('sampler_step_over_weight_read')} | "
                     f"{f('bandwidth_gb_s')} | {f('completion_len_mean')} | {f('peak_alloc_gib')} |")
    lines += ["", "GB/s: the memory bandwidth a device copy reached in that row's process; weight-read ms = the trained "
              "model's parameter bytes / it."]
    lines += ["", "Rows: " + "; ".join(f"`{r['row']}` {r.get('what')}" for r in rows)]
    return "\n".join(lines) + "\n"


def run_rows(a) -> int:
    names = [x for x in a.rows.split(",") if x]
    variants = dict(parse_variant(v) for v in a.variant or [])
    unknown = [n for n in names if n not in ROWS]
    if unknown: raise SystemExit(f"unknown rows {unknown}: choose from {', '.join(ROWS)} (or add one with --variant)")
    out_dir = Path(a.out_dir or os.environ.get("OUT") or Path(a.cache) / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python bench/grpo_bench.py " + shlex.join(sys.argv[1:])
    rows, skipped, t_start = [], [], time.time()
    if not a.in_process:      # build the model folder once, before the rows, so no row's time limit pays for it
        _, built = sb.ensure_model(a.model, a.cache, a.device)
        if built: print(f"[grpo-bench] {a.model}: model folder built in {time.time() - t_start:.0f} s", flush=True)
    for name in names + list(variants):
        args = child_args(a, name, variants.get(name))
        left = a.budget_s - (time.time() - t_start)
        if left < a.min_row_s:
            skipped.append("python bench/grpo_bench.py " + shlex.join(args)); continue
        print(f"[grpo-bench] {name} (budget left {left:.0f} s)", flush=True)
        if a.in_process:
            res = one_row(defaults(parser().parse_args(args + ["--in-process"])))
        else:
            try:
                p = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True,
                                   timeout=max(30.0, min(a.timeout, left)), cwd=str(HERE.parent))
                res = next((json.loads(l[len(sb.RESULT_TAG):]) for l in p.stdout.splitlines() if l.startswith(sb.RESULT_TAG)), None)
                if res is None:
                    res = {"row": name, "status": "crash", "error": ((p.stderr or p.stdout).strip().splitlines() or ["no output"])[-1][:300]}
                with open(out_dir / "grpo_bench.log", "a") as log: log.write(f"== {name}\n{p.stdout}\n{p.stderr}\n")
            except subprocess.TimeoutExpired:
                res = {"row": name, "status": "timeout", "error": f"over {min(a.timeout, left):.0f} s"}
        res.setdefault("row", name)
        rows.append(res)
        with open(out_dir / "grpo_bench.jsonl", "a") as f: f.write(json.dumps(dict(res, matrix_command=command), default=str) + "\n")
        print(f"[grpo-bench] {name}: {res.get('status')} {res.get('error') or ''} step {res.get('step_s')} s, generation "
              f"{res.get('generation_s')} s, {res.get('gen_tokens_per_s')} tok/s, decode {res.get('decode_ms')} ms "
              f"(weights {res.get('weight_read_ms')} ms)", flush=True)
    md = render(rows, command)
    if skipped: md += "\nSkipped for the time budget (run them with):\n\n" + "\n".join(f"    {c}" for c in skipped) + "\n"
    (out_dir / "grpo_bench.md").write_text(md)
    print(md, flush=True)
    return 0 if rows and all(r.get("status") == "ok" for r in rows) else 1


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3.2-1b", help="a name from bench/models/ (" + ", ".join(sb.model_names()) + ")")
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--rows", default=DEFAULT_ROWS, help=f"rows to run, in order (default {DEFAULT_ROWS})")
    ap.add_argument("--variant", action="append", metavar="LABEL:[ROW:]KEY=VALUE,...",
                    help="one more ftlab row on top of ROW (default ftlab): ftlab keys, dotted for sections "
                         "(trl.cache_implementation=static, use_liger_kernel=false); gen=K for a K-times generation batch")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--prompts", type=int, default=1, help="prompts per optimizer step (default %(default)s)")
    ap.add_argument("--generations", type=int, default=None, help="completions per prompt (default 8; cpu 4)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128; cpu 16)")
    ap.add_argument("--completion-len", type=int, default=None, help="completion tokens (default 256; cpu 16)")
    ap.add_argument("--warmup", type=int, default=None, help="steps not measured (default 2; cpu 1)")
    ap.add_argument("--steps", type=int, default=None, help="measured steps (default 4; cpu 2)")
    ap.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bw-mib", type=int, default=None, help="size of the bandwidth copy (default 2048 MiB; cpu 256)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per row (default %(default)s)")
    ap.add_argument("--budget-s", type=float, default=540, help="the whole command; rows that would start after "
                    "less than --min-row-s is left are skipped and listed (default %(default)s)")
    ap.add_argument("--min-row-s", type=float, default=60)
    ap.add_argument("--cache", default=sb.DEFAULT_CACHE, help="model folders and scratch (default %(default)s)")
    ap.add_argument("--out-dir", default=None, help="default $OUT, else CACHE/out")
    ap.add_argument("--in-process", action="store_true", help="run the rows in this process (CPU checks, tests)")
    ap.add_argument("--print-config", action="store_true", help="print each ftlab row's YAML")
    ap.add_argument("--profile-decode", metavar="DIR", help="profile one decoding step of ftlab's sampler per row: "
                    "DIR/decode-profile-ROW.md (its kernels)")
    # one row (what the command runs in each child)
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--gen-factor", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", help=argparse.SUPPRESS)
    return ap


def defaults(a):
    cpu = a.device == "cpu"
    for k, gpu_v, cpu_v in (("generations", 8, 4), ("prompt_len", 128, 16), ("completion_len", 256, 16), ("warmup", 2, 1),
                            ("steps", 4, 2), ("bw_mib", 2048, 256)):
        if getattr(a, k) is None: setattr(a, k, cpu_v if cpu else gpu_v)
    return a


def main(argv=None):
    a = defaults(parser().parse_args(argv))
    Path(a.cache).mkdir(parents=True, exist_ok=True)
    if a.row is None: return run_rows(a)
    row = one_row(a)
    print(sb.RESULT_TAG + json.dumps(row, default=str), flush=True)
    return 0 if row["status"] == "ok" else (3 if row["status"] == "oom" else 1)


if __name__ == "__main__":
    sys.exit(main())
