"""NF4 dequantization on one GPU: bitsandbytes' `dequantize_4bit` against ftlab's one-launch Triton kernel
(`kernels/nf4.py`), on the projection shapes of a model, in one command.

    python bench/nf4_bench.py [--model llama-3.1-8b] [--repeats 20] [--out DIR]
    TRITON_INTERPRET=1 python bench/nf4_bench.py --device cpu --model tiny --repeats 1     # plumbing only

Per projection shape of the model (`bench/models/NAME.json`: q, k, v, o, gate, up, down), a random bf16 weight is
quantized as QLoRA does (NF4, double quantization, bf16 storage and compute dtype); each implementation then
dequantizes it `--repeats` times after 3 warm-up calls, timed with CUDA events. Reported: microseconds per call,
the bytes moved (packed weight and scales read, bf16 weight written) over that time, and the time of one whole
step's dequantization (every projection of every layer, twice: forward and backward), with the ratio of the two.
The outputs are compared too (`equal`: bit for bit). Writes `nf4.json` and `nf4.md` to `--out` (default `$OUT`, else
the current folder).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def shapes(cfg: dict) -> dict:
    "Projection name -> (out, in) for a Llama-style config."
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * hd
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}


def timed(fn, repeats: int, device: str) -> float:
    "Median microseconds of `fn()` over `repeats` calls after 3 warm-up ones."
    import time, torch
    for _ in range(3): fn()
    out = []
    for _ in range(repeats):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); b.synchronize()
            out.append(a.elapsed_time(b) * 1000)
        else:
            t = time.perf_counter(); fn(); out.append((time.perf_counter() - t) * 1e6)
    return statistics.median(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args(argv)
    import torch
    import bitsandbytes.functional as bnbf
    from ftlab.kernels import nf4
    cfg = json.loads((HERE / "models" / f"{a.model}.json").read_text())
    layers = cfg["num_hidden_layers"]
    rows, total = [], {"bitsandbytes": 0.0, "ftlab": 0.0}
    gen = torch.Generator(device="cpu").manual_seed(0)
    for name, (o, i) in shapes(cfg).items():
        W = (torch.randn(o, i, generator=gen) * 0.02).to(a.device, torch.bfloat16)
        q, qs = bnbf.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=torch.bfloat16)
        del W
        lib, ours = bnbf.dequantize_4bit(q, qs), nf4.dequantize_nf4(q, qs)
        row = {"projection": name, "shape": [o, i], "covered": nf4.covers(q, qs), "equal": bool(torch.equal(lib, ours))}
        moved = q.numel() * q.element_size() + qs.absmax.numel() + o * i * 2      # bytes read and written
        for impl, fn in (("bitsandbytes", lambda: bnbf.dequantize_4bit(q, qs)), ("ftlab", lambda: nf4.dequantize_nf4(q, qs))):
            us = timed(fn, a.repeats, a.device)
            row[f"{impl}_us"], row[f"{impl}_gb_s"] = round(us, 1), round(moved / us / 1e3, 1)
            total[impl] += 2 * layers * us / 1000                                    # ms a step: forward and backward
        row["ratio"] = round(row["bitsandbytes_us"] / row["ftlab_us"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {"model": a.model, "device": a.device, "layers": layers, "rows": rows,
               "step_ms": {k: round(v, 2) for k, v in total.items()},
               "step_ratio": round(total["bitsandbytes"] / total["ftlab"], 2),
               "nf4_verified": {str(k): v for k, v in nf4.verified.items()},
               "gpu": torch.cuda.get_device_name(0) if a.device == "cuda" else None}
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    (out / "nf4.json").write_text(json.dumps(summary, indent=1))
    lines = [f"### `python bench/nf4_bench.py --model {a.model} --repeats {a.repeats}` ({summary['gpu'] or a.device})", "",
             "| projection | shape | bitsandbytes µs (GB/s) | ftlab µs (GB/s) | × | equal |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['projection']} | {r['shape'][0]} x {r['shape'][1]} | {r['bitsandbytes_us']} ({r['bitsandbytes_gb_s']}) | "
              f"{r['ftlab_us']} ({r['ftlab_gb_s']}) | {r['ratio']} | {'yes' if r['equal'] else 'no'} |" for r in rows]
    lines += ["", f"One step's dequantization ({layers} layers x 7 projections, forward and backward): bitsandbytes "
              f"{summary['step_ms']['bitsandbytes']} ms, ftlab {summary['step_ms']['ftlab']} ms ({summary['step_ratio']}x)."]
    (out / "nf4.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 0 if all(r["equal"] or a.device == "cpu" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
