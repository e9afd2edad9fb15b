"""Loss curves of ftlab with and without its kernels: same model, seed, data and settings, one child process each.

    python bench/loss_curve.py --model llama-3.1-8b --seq 4096 --steps 50 --lr 2e-4     # on the GPU machine
    python bench/loss_curve.py --model tiny --seq 256 --steps 10 --device cpu       # plumbing check

Each variant is `sft_bench.py --impl ftlab --data learn` (rows with a learnable structure, so the loss falls) with
its own `--ftlab-set` keys; the per-step training losses are compared with the first variant's. The curves match
when every step's loss is within `--rel-tol` (relative) of the reference's. Writes `$OUT/loss_curve.json` and
`loss_curve.md` (or `--out-dir`).
"""
from __future__ import annotations
import argparse, json, os, shlex, subprocess, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import sft_bench as sb  # noqa: E402

# ftlab's fused LoRA projections and Liger's kernels are on by default on a GPU; the reference turns them off
NO_KERNELS = "lora_qkv_kernel=false,lora_o_kernel=false,lora_mlp_kernel=false,use_liger_kernel=false"
DEFAULT_VARIANTS = [f"without kernels:{NO_KERNELS}", "defaults:"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--mode", choices=["lora", "qlora", "full"], default="lora")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=50, help="optimizer steps compared (default %(default)s)")
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate of every variant (default %(default)s)")
    ap.add_argument("--variant", action="append", metavar="LABEL:KEY=VALUE,...",
                    help="a variant (repeatable; the first is the reference). Default: the kernels turned off, then "
                         "ftlab's defaults (fused LoRA + Liger on a GPU)")
    ap.add_argument("--rel-tol", type=float, default=0.02, help="per-step relative tolerance (default %(default)s)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per variant")
    ap.add_argument("--cache", default=sb.DEFAULT_CACHE)
    ap.add_argument("--out-dir", default=None, help="default $OUT, else /tmp/ftlab-bench/out")
    a = ap.parse_args(argv)
    out_dir = Path(a.out_dir or os.environ.get("OUT") or Path(sb.DEFAULT_CACHE) / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python bench/loss_curve.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    variants = []
    for v in a.variant or DEFAULT_VARIANTS:
        label, _, kvs = v.partition(":")
        variants.append((label, [x for x in kvs.split(",") if x]))
    rows = []
    for label, sets in variants:
        cmd = [sys.executable, str(HERE / "sft_bench.py"), "--model", a.model, "--mode", a.mode, "--impl", "ftlab",
               "--seq", str(a.seq), "--data", "learn", "--steps", str(a.steps), "--warmup", "0", "--device", a.device,
               "--cache", a.cache, "--label", label, "--ftlab-set", f"learning_rate={a.lr}"]
        for x in sets: cmd += [x] if x.startswith("--") else ["--ftlab-set", x]
        t = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, cwd=str(HERE.parent))
        res = next((json.loads(l[len(sb.RESULT_TAG):]) for l in p.stdout.splitlines() if l.startswith(sb.RESULT_TAG)),
                   None) or {"status": "crash", "error": (p.stdout + p.stderr).strip().splitlines()[-1:]}
        res["label"], res["wall_s"] = label, round(time.time() - t, 1)
        rows.append(res)
        print(f"[loss-curve] {label}: {res.get('status')} {res.get('error') or ''} losses "
              f"{(res.get('losses') or [None])[0]} -> {(res.get('losses') or [None])[-1]}, "
              f"{res.get('tokens_per_s')} tok/s, {res['wall_s']} s", flush=True)
    ref = rows[0].get("losses") or []
    report = {"command": command, "model": a.model, "mode": a.mode, "seq": a.seq, "steps": a.steps, "lr": a.lr,
              "rel_tol": a.rel_tol, "versions": rows[0].get("versions"), "variants": []}
    for r in rows:
        ls = r.get("losses") or []
        n = min(len(ls), len(ref))
        diffs = [abs(ls[i] - ref[i]) for i in range(n)]
        rel = [d / max(abs(ref[i]), 1e-8) for i, d in enumerate(diffs)]
        ok = r.get("status") == "ok" and n == a.steps and len(ref) == a.steps and all(x <= a.rel_tol for x in rel)
        report["variants"].append(dict(
            label=r["label"], status=r.get("status"), error=r.get("error"), ftlab_extra=r.get("ftlab_extra"),
            fused_lora_layers=r.get("fused_lora_layers"), liger_patched=r.get("liger_patched"),
            tokens_per_s=r.get("tokens_per_s"), peak_alloc_gib=r.get("peak_alloc_gib"), losses=ls,
            max_abs_diff=round(max(diffs), 5) if diffs else None, mean_abs_diff=round(sum(diffs) / n, 5) if n else None,
            max_rel_diff=round(max(rel), 5) if rel else None, within_tol=ok, command=r.get("command")))
    (out_dir / "loss_curve.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    md = [f"### `{command}`", "",
          f"{a.model} {a.mode}, seq {a.seq}, {a.steps} steps, lr {a.lr}, same seed and data (`--data learn`); "
          f"tolerance: every step within {a.rel_tol:.0%} of the reference (the first row).", "",
          "| variant | status | first loss | last loss | max abs diff | mean abs diff | max rel diff | within tol | tokens/s |",
          "|---|---|---|---|---|---|---|---|---|"]
    for v in report["variants"]:
        ls = v["losses"] or [None]
        md.append(f"| {v['label']} | {v['status']} | {ls[0]} | {ls[-1]} | {v['max_abs_diff']} | {v['mean_abs_diff']} | "
                  f"{v['max_rel_diff']} | {'yes' if v['within_tol'] else 'no'} | {v['tokens_per_s']} |")
    md += ["", "Losses every 5 steps:", "", "| step | " + " | ".join(v["label"] for v in report["variants"]) + " |",
           "|---|" + "---|" * len(report["variants"])]
    for i in range(0, max(len(v["losses"]) for v in report["variants"]), 5):
        md.append(f"| {i + 1} | " + " | ".join(str(v["losses"][i]) if i < len(v["losses"]) else "–"
                                              for v in report["variants"]) + " |")
    (out_dir / "loss_curve.md").write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)
    return 0 if all(v["within_tol"] for v in report["variants"]) else 1


if __name__ == "__main__":
    sys.exit(main())
