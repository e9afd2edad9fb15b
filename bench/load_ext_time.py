"""How long `%load_ext ftlab` takes, against starting IPython alone, in the same command.

    python bench/load_ext_time.py [--repeat 7]

Each measurement is a fresh interpreter that creates an IPython shell and then (or not) runs `%load_ext ftlab`;
the figure is the median of the repeats, and the extension's cost is the difference. Also checks that loading the
extension imported neither torch nor plotly. Writes bench/results/load_ext.{json,md}.
"""
import argparse, json, pathlib, statistics, subprocess, sys

ROOT = pathlib.Path(__file__).resolve().parent
SHELL = "import time; t=time.perf_counter(); from IPython.core.interactiveshell import InteractiveShell; ip=InteractiveShell.instance(); "
PROBE = {"ipython": SHELL + "print(time.perf_counter()-t)",
         "ipython + %load_ext ftlab": SHELL + "ip.run_line_magic('load_ext','ftlab'); import sys; "
         "assert 'torch' not in sys.modules and 'plotly' not in sys.modules; print(time.perf_counter()-t)"}


def main():
    ap = argparse.ArgumentParser(); ap.add_argument("--repeat", type=int, default=7); a = ap.parse_args()
    res = {}
    for name, code in PROBE.items():
        ts = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
              for _ in range(a.repeat)]
        res[name] = round(statistics.median(ts), 4)
    cost = round(res["ipython + %load_ext ftlab"] - res["ipython"], 4)
    cmd = "python bench/load_ext_time.py " + " ".join(sys.argv[1:])
    out = {"command": cmd.strip(), "median_seconds": res, "load_ext_cost_seconds": cost, "repeat": a.repeat}
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "load_ext.json").write_text(json.dumps(out, indent=2))
    md = ["| what | median s |", "|---|---|"] + [f"| {k} | {v} |" for k, v in res.items()]
    md += [f"| cost of `%load_ext ftlab` | {cost} |", "", f"Made by `{cmd.strip()}`; torch and plotly are not imported."]
    (ROOT / "results" / "load_ext.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
