"""Run a matrix of `sft_bench.py` measurements, one child process each, and write JSON lines plus a markdown table.

    python bench/run_matrix.py --preset smoke --device cpu                 # the CPU check (tiny model)
    python bench/run_matrix.py --preset canary,lora4k:llama-3.2-1b,llama-3.2-3b --budget-s 510
    python bench/run_matrix.py --preset qlora --seqs 4096
    python bench/run_matrix.py --render a/bench.jsonl b/bench.jsonl --md bench/results/sft_throughput.md

`--preset NAME[:MODEL,MODEL...]` (comma-separated presets; a colon keeps only the named models of that preset).
Rows go to `--out` (default `$OUT/bench.jsonl`, else `/tmp/ftlab-bench/out/bench.jsonl`), the table to `bench.md`
beside it, every child's output to `bench.log` beside it. Ratios compare liger and ftlab with the baseline row of
the same model / mode / seq / data / checkpointing of the same command. A run that fails, runs out of memory or
passes `--timeout` is recorded with its status and the matrix goes on; a run that would not finish inside
`--budget-s` is recorded as skipped, so the command ends in time.
"""
from __future__ import annotations
import argparse, json, os, shlex, signal, subprocess, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import sft_bench as sb  # noqa: E402  (no heavy imports at module level)

IMPLS = ["baseline", "liger", "ftlab", "unsloth"]
# Unsloth pins older TRL and datasets than ftlab's, so its rows import from their own folder: set UNSLOTH_SITE to a
# `pip install --target` folder holding unsloth, unsloth_zoo and the versions they need; it goes first on PYTHONPATH
# for those rows only.
PEERS = ["baseline", "liger", "ftlab"]
BIG4 = ["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "qwen2.5-7b"]


def _p(models, modes, seqs, data, impls=PEERS, grad_ckpt=False):
    return dict(models=models, modes=modes, seqs=seqs, data=data, impls=impls, grad_ckpt=grad_ckpt)


PRESETS = {
    "smoke": _p(["tiny"], ["lora"], [1024], ["packed", "mix"]),
    "smoke-all": _p(["tiny"], ["full", "lora", "qlora"], [1024], ["packed", "mix"]),
    "canary": _p(["tiny"], ["lora"], [1024], ["packed"]),
    "lora4k": _p(BIG4, ["lora"], [4096], ["packed"]),
    "lora2k": _p(BIG4, ["lora"], [2048], ["packed"]),
    "full": _p(["llama-3.2-1b", "llama-3.2-3b"], ["full"], [4096], ["packed"]),
    "full2k": _p(["llama-3.2-1b", "llama-3.2-3b"], ["full"], [2048], ["packed"]),
    "qlora": _p(["llama-3.1-8b"], ["qlora"], [2048, 4096], ["packed"]),
    "mix": _p(["llama-3.2-1b", "llama-3.1-8b"], ["lora"], [4096], ["mix"]),
    "unsloth": _p(["llama-3.1-8b"], ["lora", "qlora"], [4096], ["packed"], impls=["baseline", "ftlab", "unsloth"]),
    "unsloth-full": _p(["llama-3.2-3b"], ["full"], [4096], ["packed"], impls=["baseline", "ftlab", "unsloth"]),
}
SPECIAL = {"maxseq": "QLoRA 8B longest sequence at batch 1 (sft_bench.py --find-max-seq)"}


def parse_run(spec: str) -> dict:
    "`MODEL:MODE:IMPL:SEQ:DATA[:ckpt]` -> one run."
    f = spec.split(":")
    if len(f) not in (5, 6) or f[1] not in ("full", "lora", "qlora") or f[2] not in IMPLS or f[4] not in ("packed", "mix", "learn"):
        raise SystemExit(f"--run {spec}: expected MODEL:full|lora|qlora:baseline|liger|ftlab:SEQ:packed|mix[:ckpt]")
    sb.model_json(f[0])
    return dict(model=f[0], mode=f[1], impl=f[2], seq=int(f[3]), data=f[4], grad_ckpt=len(f) == 6 and f[5] == "ckpt")


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """`LABEL:KEY=VALUE,KEY=VALUE` -> (label, ['KEY=VALUE', ...]): one more ftlab row per ftlab run, with those keys.
    An item starting with `--` is an `sft_bench.py` flag instead (e.g. `--solo-lora`), except `--torchrun` /
    `--torchrun=N`: the row runs as N workers (default 1) of `python -m torch.distributed.run --nproc_per_node N`
    (one per GPU; on a CPU over gloo). Its tokens/s and MFU are per GPU, `tokens_per_s_total` the sum."""
    label, _, kvs = spec.partition(":")
    sets = [x for x in kvs.split(",") if x]
    if not label or not all("=" in x or x.startswith("--") for x in sets):
        raise SystemExit(f"--ftlab-variant {spec}: expected LABEL:KEY=VALUE[,KEY=VALUE...]")
    return label, sets


def with_variants(runs: list[dict], variants: list[tuple[str, list[str]]]) -> list[dict]:
    "Each ftlab run once per variant (none given: as it is)."
    if not variants: return runs
    out = []
    for r in runs:
        if r.get("impl") != "ftlab": out.append(r); continue
        out += [dict(r, variant=label, variant_set=sets) for label, sets in variants]
    return out


def impl_name(r: dict) -> str:
    return r["impl"] + (f" ({r['variant']})" if r.get("variant") else "")


def run_spec(r: dict) -> str:
    return f"{r['model']}:{r['mode']}:{r['impl']}:{r['seq']}:{r['data']}" + (":ckpt" if r.get("grad_ckpt") else "")


def split_presets(text: str) -> list[str]:
    "`canary,lora4k:llama-3.2-1b,llama-3.2-3b,qlora` -> ['canary', 'lora4k:llama-3.2-1b,llama-3.2-3b', 'qlora']."
    items = []
    for tok in filter(None, text.split(",")):
        if tok.split(":")[0] in PRESETS or tok.split(":")[0] in SPECIAL or not items: items.append(tok)
        else: items[-1] += "," + tok
    return items


def expand(spec: str, a) -> list[dict]:
    "Runs of one `--preset` item, filtered by the command's options."
    name, _, only = spec.partition(":")
    if name in SPECIAL:
        return [{"special": name}]
    if name not in PRESETS:
        raise SystemExit(f"unknown preset `{name}`: choose from {', '.join([*PRESETS, *SPECIAL])}")
    p = PRESETS[name]
    keep = set(filter(None, only.split(","))) | set(filter(None, (a.only or "").split(",")))
    pick = lambda xs, flt: [x for x in xs if not flt or str(x) in flt.split(",")]
    seqs = [int(s) for s in a.seqs.split(",")] if a.seqs else p["seqs"]
    out = []
    for m in p["models"]:
        if keep and m not in keep: continue
        for mode in pick(p["modes"], a.modes):
            for seq in seqs:
                for data in pick(p["data"], a.data):
                    for impl in pick(p["impls"], a.impls):
                        out.append(dict(model=m, mode=mode, impl=impl, seq=seq, data=data,
                                        grad_ckpt=bool(p["grad_ckpt"] or a.grad_ckpt)))
    return out


def params_b(model: str) -> float:
    "Parameters in billions, from the config (attention, MLP, embeddings; norms left out)."
    c = sb.model_json(model)
    L, h, H = c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"]
    kv = c.get("num_key_value_heads", H)
    emb = h * c["vocab_size"] * (1 if c.get("tie_word_embeddings") else 2)
    return (L * (2 * h * h + 2 * h * h * kv / H + 3 * h * c["intermediate_size"]) + emb) / 1e9


def estimate_s(r: dict, a, seen: dict) -> float:
    "A pessimistic duration for planning; an observed duration of the same model, mode and seq replaces the guess."
    key = (r["model"], r["mode"], r["seq"])
    if key in seen: return seen[key] * 1.15
    if a.device == "cpu": return 60
    if r["model"] == "tiny": return 30
    steps = (a.steps if a.steps is not None else 20) + (a.warmup if a.warmup is not None else 5)
    f = sb.flops_per_token(sb.model_json(r["model"]), r["seq"]) * sb.mode_factor(r["mode"]) * r["seq"]
    step_s = f / 300e12 * (4 / 3 if r["grad_ckpt"] else 1)      # 300 TFLOP/s: a modest rate for an H100/H200
    pb = params_b(r["model"])
    est = 20 + 2.5 * pb + steps * step_s                          # start-up, imports, load; then the steps
    if r["mode"] == "qlora": est += 4 * pb + steps * 0.01 * pb   # quantizing on load, dequantizing each step
    if r["impl"] == "liger": est += 10                          # Triton compiles its kernels on the first step
    return est


def prepare_estimate_s(model: str) -> float:
    return 30 if model == "tiny" else 15 + 4 * params_b(model)


def run_child(cmd: list[str], timeout: float, log) -> tuple[dict | None, int | None, str]:
    "Run one child in its own process group; (its result row or None, exit code or None on timeout, last lines)."
    import tempfile
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if "torch.distributed.run" in cmd and "--device" in cmd and cmd[cmd.index("--device") + 1] == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"        # several CPU processes train as one run only with it (gloo)
    if "unsloth" in cmd and os.environ.get("UNSLOTH_SITE"):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ["UNSLOTH_SITE"], os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryFile("w+") as buf:
        p = subprocess.Popen(cmd, stdout=buf, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
                             cwd=str(HERE.parent))
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try: os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError: pass
            p.wait()
            rc = None
        buf.seek(0)
        text = buf.read()
    log.write(f"\n===== {shlex.join(cmd)}\n{text}"
              + (f"\n===== killed after {timeout:.0f} s\n" if rc is None else f"===== exit {rc}\n"))
    log.flush()
    res = None
    for line in text.splitlines():
        if line.startswith(sb.RESULT_TAG):
            try: res = json.loads(line[len(sb.RESULT_TAG):])
            except json.JSONDecodeError: pass
    tail = [l for l in text.splitlines() if l.strip() and not l.startswith(sb.RESULT_TAG)][-8:]
    return res, rc, "\n".join(tail)


def fmt(x, nd=1):
    if x is None or x == "": return "–"
    if isinstance(x, float): return f"{x:,.{nd}f}"
    if isinstance(x, int): return f"{x:,}"
    return str(x)


def progress(i, n, t0, r: dict) -> str:
    head = f"[{i}/{n} t+{time.time() - t0:4.0f}s] {r['model']} {r['mode']} {impl_name(r)} seq{r['seq']} {r['data']}" + \
           (" ckpt" if r.get("grad_ckpt") else "")
    if r.get("status") != "ok":
        return f"{head}: {r.get('status')} {r.get('error') or ''}".rstrip()
    return (f"{head}: ok {fmt(r.get('tokens_per_s'), 0)} tok/s, MFU {fmt(r.get('mfu_pct'))}%, peak "
            f"{fmt(r.get('peak_alloc_gib'))}/{fmt(r.get('peak_reserved_gib'))} GiB, first step "
            f"{fmt(r.get('first_step_from_start_s'))} s from start, run {fmt(r.get('matrix_wall_s'), 0)} s")


# ---------------------------------------------------------------------------------------------------- markdown
def group_key(r): return (r["model"], r["mode"], r["seq"], r["data"], bool(r.get("grad_ckpt")), r.get("batch", 1))


def render(rows: list[dict]) -> str:
    "Markdown: one section per command, ratios within it."
    out = []
    cmds = list(dict.fromkeys(r.get("matrix_command") or r.get("command") for r in rows))
    for cmd in cmds:
        rs = [r for r in rows if (r.get("matrix_command") or r.get("command")) == cmd]
        runs = [r for r in rs if r.get("kind") == "run"]
        out.append(f"### `{cmd}`\n")
        v = next((r.get("versions") for r in runs if r.get("versions")), None) or {}
        if v:
            out.append(f"{v.get('gpu') or 'CPU'} · torch {v.get('torch')} · transformers {v.get('transformers')} · "
                       f"trl {v.get('trl')} · peft {v.get('peft')} · bitsandbytes {v.get('bitsandbytes')} · "
                       f"liger-kernel {v.get('liger-kernel')}\n")
        if runs:
            first = {}
            for r in runs: first.setdefault(group_key(r), len(first))
            vorder = list(dict.fromkeys(r.get("variant") or "" for r in runs))
            runs = sorted(runs, key=lambda r: (first[group_key(r)], IMPLS.index(r["impl"]) if r.get("impl") in IMPLS else 9,
                                               vorder.index(r.get("variant") or "")))
            base = {group_key(r): r for r in runs if r["impl"] == "baseline" and r.get("status") == "ok"}
            out.append("| model | mode | seq | data | ckpt | impl | status | tokens/s | × base | MFU % | peak alloc GiB "
                       "| × base | peak reserved GiB | 1st step from start s | 1st step from train() s | load s |")
            out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            for r in runs:
                b = base.get(group_key(r))
                ok = r.get("status") == "ok"
                tr = mr = "–"
                if b and ok and r["impl"] != "baseline":
                    if r.get("tokens_per_s") and b.get("tokens_per_s"): tr = f"{r['tokens_per_s'] / b['tokens_per_s']:.3f}"
                    if r.get("peak_alloc_gib") and b.get("peak_alloc_gib"): mr = f"{r['peak_alloc_gib'] / b['peak_alloc_gib']:.3f}"
                status = r.get("status", "?")
                if status != "ok" and r.get("error"): status += f" ({str(r['error'])[:80]})"
                out.append(f"| {r['model']} | {r['mode']} | {r['seq']} | {r['data']} | {'yes' if r.get('grad_ckpt') else 'no'} "
                           f"| {impl_name(r)} | {status} | {fmt(r.get('tokens_per_s') if ok else None, 0)} | {tr} "
                           f"| {fmt(r.get('mfu_pct') if ok else None)} | {fmt(r.get('peak_alloc_gib'), 2)} | {mr} "
                           f"| {fmt(r.get('peak_reserved_gib'), 2)} | {fmt(r.get('first_step_from_start_s'))} "
                           f"| {fmt(r.get('first_step_from_train_s'))} | {fmt(r.get('load_s'))} |")
            out.append("")
        for r in (r for r in rs if r.get("kind") == "max_seq"):
            out.append(f"Longest sequence at batch 1, {r['model']} {r['mode']} {r['impl']}, activation checkpointing "
                       f"{'on' if r.get('grad_ckpt') else 'off'}, {r.get('fit_steps')} steps each: "
                       f"**{fmt(r.get('longest_ok'))} tokens** fit; first failure {fmt(r.get('first_failed'))}"
                       + (f"; a straight line through the peaks reaches 97% of the GPU at about "
                          f"{fmt(r['predicted_max'])} tokens (extrapolated)" if r.get("predicted_max") else "")
                       + (f" ({r['note']})" if r.get("note") else "") + "\n")
            out.append("| seq | status | peak alloc GiB | peak reserved GiB | host peak GiB | s/step | tokens/s | wall s |")
            out.append("|---|---|---|---|---|---|---|---|")
            for t in r.get("attempts", []):
                out.append(f"| {t['seq']:,} | {t['status']} | {fmt(t.get('peak_alloc_gib'), 2)} | "
                           f"{fmt(t.get('peak_reserved_gib'), 2)} | {fmt(t.get('peak_rss_gib'), 1)} | "
                           f"{fmt(t.get('step_s_median'), 2)} | "
                           f"{fmt(t.get('tokens_per_s'), 0)} | {fmt(t.get('wall_s'), 0)} |")
            out.append("")
        preps = [r for r in rs if r.get("kind") == "prepare" and not r.get("cached")]
        if preps:
            out.append("Random-init model folders written by this command: " + "; ".join(
                f"{r['model']} built in {fmt(r.get('build_s'))} s, saved ({fmt(r.get('size_gib'))} GiB) in "
                f"{fmt(r.get('save_s'))} s" for r in preps) + ".\n")
    out.append("tokens/s: median over the measured steps of the tokens the model processed in the step (no padding) "
               "over the time from the previous step's end to this step's end. MFU: tokens/s × L·h²·(12 + 12·kv/H + "
               "18·ffn/h + 6·s/h + 6·V/(L·h)) × (2/3 for LoRA and QLoRA) / 989 TFLOP/s, s = seq. Peak memory: "
               "`torch.cuda.max_memory_allocated/reserved` over the whole process. 1st step: end of the first "
               "optimizer step, from process start and from the call of `trainer.train()`. × base: this row over "
               "the baseline row of the same model, mode, seq, data and checkpointing, within one command.")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default=None, help=f"comma-separated: {', '.join([*PRESETS, *SPECIAL])}; NAME:MODEL,... keeps those models")
    ap.add_argument("--run", action="append", metavar="MODEL:MODE:IMPL:SEQ:DATA[:ckpt]",
                    help="one explicit run (repeatable), e.g. llama-3.1-8b:qlora:ftlab:4096:packed")
    ap.add_argument("--only", help="keep only these models (comma-separated)")
    ap.add_argument("--impls", help="keep only these implementations (baseline,liger,ftlab)")
    ap.add_argument("--modes", help="keep only these modes (full,lora,qlora)")
    ap.add_argument("--data", help="keep only these data kinds (packed,mix)")
    ap.add_argument("--seqs", help="sequence lengths instead of the presets' (comma-separated)")
    ap.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing on in every run")
    ap.add_argument("--no-ckpt-on-oom", action="store_true",
                    help="do not repeat a run that ran out of memory with activation checkpointing on")
    ap.add_argument("--steps", type=int, help="measured steps per run (sft_bench default 20; cpu 3)")
    ap.add_argument("--warmup", type=int, help="warm-up steps per run (sft_bench default 5; cpu 2)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per run (default %(default)s)")
    ap.add_argument("--budget-s", type=float, default=None, help="whole command's time budget (default 510; cpu 3600)")
    ap.add_argument("--cache", default=sb.DEFAULT_CACHE)
    ap.add_argument("--out", help="JSONL file to append to (default $OUT/bench.jsonl)")
    ap.add_argument("--ftlab-set", action="append", metavar="KEY=VALUE", help="passed to every ftlab run")
    ap.add_argument("--ftlab-variant", action="append", metavar="LABEL:KEY=VALUE[,KEY=VALUE...]",
                    help="run every ftlab row once per variant, with these extra keys (repeatable; e.g. "
                         "no-kernels:lora_qkv_kernel=false,lora_o_kernel=false,lora_mlp_kernel=false,use_liger_kernel=false)")
    ap.add_argument("--maxseq-impl", default="baseline", help="implementation for the maxseq preset")
    ap.add_argument("--fit-steps", type=int, default=2, help="steps per length in the maxseq preset")
    ap.add_argument("--maxseq-model", default="llama-3.1-8b", help="model for the maxseq preset")
    ap.add_argument("--maxseq-seqs", default=sb.MAXSEQ_LADDER,
                    help="lengths tried by the maxseq preset")
    ap.add_argument("--render", nargs="+", metavar="JSONL", help="only write the markdown of these JSONL files")
    ap.add_argument("--md", help="markdown output path (default: bench.md beside --out)")
    ap.add_argument("--dry-run", action="store_true", help="list the runs and their estimated times")
    a = ap.parse_args(argv)
    if a.budget_s is None: a.budget_s = 3600 if a.device == "cpu" else 510

    if a.render:
        rows = [json.loads(l) for f in a.render for l in Path(f).read_text().splitlines() if l.strip()]
        text = render(rows)
        if a.md: Path(a.md).write_text(text)
        print(text, end="")
        return 0
    if not a.preset and not a.run: ap.error("--preset or --run is required (or --render)")

    t0 = time.time()
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") and not a.out else None
    out = Path(a.out) if a.out else (out_dir or Path(sb.DEFAULT_CACHE) / "out") / "bench.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    md = Path(a.md) if a.md else out.with_suffix(".md")
    log_path = out.with_suffix(".log")
    command = "python bench/run_matrix.py " + shlex.join(sys.argv[1:] if argv is None else argv)

    runs = [r for spec in split_presets(a.preset or "") for r in expand(spec, a)] + [parse_run(x) for x in a.run or []]
    runs = with_variants(runs, [parse_variant(v) for v in a.ftlab_variant or []])
    # one model folder at a time: group by model, keeping the order of first appearance
    order = list(dict.fromkeys(r.get("model", "~special") for r in runs))
    runs = sorted(runs, key=lambda r: order.index(r.get("model", "~special")))
    seen: dict = {}
    if a.dry_run:
        total, models = 0.0, set()
        for r in runs:
            if "special" in r:
                print(f"maxseq: the rest of the budget"); continue
            if r["model"] not in models and not (Path(a.cache) / "models" / r["model"] / ".complete").exists():
                e = prepare_estimate_s(r["model"]); total += e
                print(f"prepare {r['model']}: ~{e:.0f} s")
            models.add(r["model"])
            e = estimate_s(r, a, seen); total += e
            print(f"{r['model']} {r['mode']} {impl_name(r)} seq{r['seq']} {r['data']}{' ckpt' if r['grad_ckpt'] else ''}: ~{e:.0f} s")
        print(f"total ~{total:.0f} s (budget {a.budget_s:.0f} s)")
        return 0

    print(f"[matrix] {len(runs)} runs, budget {a.budget_s:.0f} s, rows -> {out}", flush=True)
    rows, prepared = [], set()
    log = open(log_path, "a")

    def record(row: dict):
        row["matrix_command"] = command
        rows.append(row)
        with open(out, "a") as f: f.write(json.dumps(row, default=str) + "\n")

    child = [sys.executable, str(HERE / "sft_bench.py")]
    queue, i, ckpt_groups = list(runs), 0, set()
    gkey = lambda r: (r["model"], r["mode"], r["seq"], r["data"])
    while queue:
        r = queue.pop(0)
        i += 1
        if "special" not in r and gkey(r) in ckpt_groups and not r["grad_ckpt"]:
            r = dict(r, grad_ckpt=True)     # its group needed activation checkpointing to fit
        left = a.budget_s - (time.time() - t0)
        if "special" in r:
            budget = min(left - 20, a.timeout * 3)
            if budget < 120:
                record({"kind": "max_seq", "model": a.maxseq_model, "mode": "qlora", "impl": a.maxseq_impl,
                        "status": "skipped", "note": f"{left:.0f} s of the budget left", "attempts": []}); continue
            cmd = child + ["--find-max-seq", "--model", a.maxseq_model, "--mode", "qlora", "--impl", a.maxseq_impl,
                           "--seqs", a.maxseq_seqs, "--budget-s", str(int(budget)), "--fit-steps", str(a.fit_steps), "--device", a.device, "--cache", a.cache]
            for x in a.ftlab_set or []: cmd += ["--ftlab-set", x]
            print(f"[{i}/{i + len(queue)} t+{time.time() - t0:4.0f}s] longest QLoRA sequence of {a.maxseq_model} ({a.maxseq_impl}), "
                  f"budget {budget:.0f} s", flush=True)
            res, rc, tail = run_child(cmd, budget + 60, log)
            res = res or {"kind": "max_seq", "status": "crash", "error": tail.splitlines()[-1:] or None}
            record(res)
            print(f"[max-seq] longest that fit: {res.get('longest_ok')}, first failure: {res.get('first_failed')}, "
                  f"extrapolated: {res.get('predicted_max')} {res.get('note') or ''}", flush=True)
            continue
        # the model folder, once per model, in its own process
        if r["model"] not in prepared:
            folder_ok = (Path(a.cache) / "models" / r["model"] / ".complete").exists()
            if not folder_ok:
                need = prepare_estimate_s(r["model"])
                if need > left:
                    record(dict(r, kind="run", status="skipped", error=f"budget: {left:.0f} s left")); print(progress(i, i + len(queue), t0, rows[-1]), flush=True); continue
                t = time.time()
                res, rc, tail = run_child(child + ["--prepare-model", r["model"], "--device", a.device, "--cache", a.cache],
                                          min(a.timeout, max(left - 10, 10)), log)
                if res is None:
                    record(dict(r, kind="run", status="error", error="model preparation failed: " + (tail.splitlines()[-1:] or ["?"])[0]))
                    print(progress(i, i + len(queue), t0, rows[-1]), flush=True); continue
                record({"kind": "prepare", "model": r["model"], "device": a.device, **res, "wall_s": round(time.time() - t, 1)})
                print(f"[prepare] {r['model']}: built in {res.get('build_s')} s, saved {res.get('size_gib')} GiB in "
                      f"{res.get('save_s')} s ({time.time() - t:.0f} s with start-up)", flush=True)
            prepared.add(r["model"])
        left = a.budget_s - (time.time() - t0)
        est = estimate_s(r, a, seen)
        if est > left:
            record(dict(r, kind="run", status="skipped", error=f"budget: ~{est:.0f} s needed, {left:.0f} s left"))
            print(progress(i, i + len(queue), t0, rows[-1]), flush=True)
            continue
        cmd = child + ["--model", r["model"], "--mode", r["mode"], "--impl", r["impl"], "--seq", str(r["seq"]),
                       "--data", r["data"], "--device", a.device, "--cache", a.cache]
        if r["grad_ckpt"]: cmd.append("--grad-ckpt")
        if a.steps is not None: cmd += ["--steps", str(a.steps)]
        if a.warmup is not None: cmd += ["--warmup", str(a.warmup)]
        if r["impl"] == "ftlab":
            for x in [*(a.ftlab_set or []), *r.get("variant_set", [])]:
                if x == "--torchrun" or x.startswith("--torchrun="):   # the row's workers under torch's launcher
                    n = x.partition("=")[2] or "1"
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", n, *cmd[1:]]
                else: cmd += [x] if x.startswith("--") else ["--ftlab-set", x]
            if r.get("variant"): cmd += ["--label", r["variant"]]
        t = time.time()
        timeout = min(a.timeout, max(left - 5, 10))
        res, rc, tail = run_child(cmd, timeout, log)
        wall = time.time() - t
        if res is None:
            res = dict(r, kind="run", status="timeout" if rc is None else "crash",
                       error=(f"over {timeout:.0f} s" if rc is None else f"exit {rc}: " + (tail.splitlines()[-1:] or ["?"])[0]),
                       command=shlex.join(["python", *cmd[1:]]).replace(str(HERE / "sft_bench.py"), "bench/sft_bench.py"))
        res["matrix_wall_s"] = round(wall, 1)
        seen[(r["model"], r["mode"], r["seq"])] = max(seen.get((r["model"], r["mode"], r["seq"]), 0), wall)
        record(res)
        print(progress(i, i + len(queue), t0, res), flush=True)
        if res.get("status") not in ("ok", "oom") and tail:
            print("    " + "\n    ".join(tail.splitlines()[-4:]), flush=True)
        if res.get("status") == "oom" and not r["grad_ckpt"] and not a.no_ckpt_on_oom:
            # memory requires activation checkpointing: run this one again with it, and its group's other runs too
            ckpt_groups.add(gkey(r))
            again = [dict(x, grad_ckpt=True) for x in rows if x.get("kind") == "run" and "model" in x and x.get("status") == "ok"
                     and gkey(x) == gkey(r) and not x.get("grad_ckpt")]
            again = [dict(model=x["model"], mode=x["mode"], impl=x["impl"], seq=x["seq"], data=x["data"], grad_ckpt=True)
                     for x in again]
            queue[:0] = [dict(r, grad_ckpt=True)] + again
            print(f"    out of memory without activation checkpointing: again with it", flush=True)
    log.close()
    redo = [run_spec(r) for r in rows if r.get("kind") == "run" and r.get("status") in ("skipped", "timeout", "crash")]
    if redo:
        print("\n[matrix] not measured; to run them later:\n  python3 bench/run_matrix.py "
              + " ".join(f"--run {x}" for x in redo), flush=True)
    text = render(rows)
    md.write_text(text)
    print(f"\n[matrix] done in {time.time() - t0:.0f} s: {out} and {md}\n", flush=True)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
