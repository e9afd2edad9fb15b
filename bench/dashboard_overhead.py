"""What the live dashboard costs a run, as a share of training time on the tiny model.

    python bench/dashboard_overhead.py [--steps 200]

Trains ftlab:tiny with LoRA inside an IPython shell, with the dashboard observing the run in rich mode (the
notebook path: status and chart bundles built and published through IPython's display machinery). The dashboard
times itself; the ratio is its time over the run's training time, measured in the same process. It is run twice:
with the default throttle (about one redraw a second) and redrawing on every log step, the worst case.
Writes bench/results/dashboard_overhead.{json,md}.
"""
import argparse, json, pathlib, sys, tempfile, time

ROOT = pathlib.Path(__file__).resolve().parent


def one(steps: int, min_interval: float) -> dict:
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output
    from ftlab.config import load_config
    from ftlab.run import Run
    from ftlab.dashboard import Dashboard
    InteractiveShell.instance()
    out = tempfile.mkdtemp()
    cfg = load_config(f"""base_model: ftlab:tiny
adapter: lora
lora_target_linear: true
learning_rate: 0.002
micro_batch_size: 8
sequence_len: 256
max_steps: {steps}
save_steps: 100000
logging_steps: 1
output_dir: {out}
dataset_prepared_path: {out}/prepared
datasets:
  - path: ftlab:data/chat.jsonl
    type: chat_template
""")
    run = Run(cfg)
    dash = Dashboard.for_run(run, history=False, rich=True, min_interval=min_interval)
    run.observers.append(dash)
    with capture_output():
        run.train()
        dash.close()
    logs = [r for r in run.records if r["event"] == "log"]
    train_s = logs[-1]["time"]
    return {"steps": steps, "min_interval_s": min_interval, "train_seconds": round(train_s, 3),
            "dashboard_seconds": round(dash.seconds, 4), "redraws": dash.draws,
            "overhead_pct": round(100 * dash.seconds / train_s, 3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args()
    rows = [one(a.steps, 1.0), one(a.steps, 0.0)]
    cmd = "python bench/dashboard_overhead.py " + " ".join(sys.argv[1:])
    res = ROOT / "results"; res.mkdir(exist_ok=True)
    (res / "dashboard_overhead.json").write_text(json.dumps({"command": cmd.strip(), "rows": rows}, indent=2))
    md = ["| throttle | steps | train s | dashboard s | redraws | overhead |", "|---|---|---|---|---|---|"]
    md += [f"| {r['min_interval_s']} s | {r['steps']} | {r['train_seconds']} | {r['dashboard_seconds']} | {r['redraws']} | "
           f"{r['overhead_pct']}% |" for r in rows]
    md.append(f"\nMade by `{cmd.strip()}` on a 2-core CPU machine, ftlab:tiny with LoRA, one log per step.")
    (res / "dashboard_overhead.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
