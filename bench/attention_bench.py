"""PyTorch SDPA's attention backends on one GPU, causal, bf16, forward + backward, at Llama-3.1-8B's attention shape
(32 query heads, 8 key/value heads, head dim 128), with GQA passed to SDPA (`enable_gqa=True`, as transformers does)
and with the key/value heads repeated beforehand.

    python bench/attention_bench.py [--seqs 4096,16384] [--out DIR]

Median of 10 after 3 warm-up repeats; a backend that cannot run a case says why. Prints JSON lines and writes
`attention.md` to `--out` (default `$OUT`, else the current folder). Needs CUDA.
"""
import argparse, json, os, statistics, time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def measure(backend, seq, gqa, heads=32, kv_heads=8, dim=128, repeats=10, warmup=3):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, heads, seq, dim, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(1, kv_heads, seq, dim, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    if not gqa: k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    times = []
    for i in range(warmup + repeats):
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        torch.cuda.synchronize(); t0 = time.perf_counter()
        with sdpa_kernel([BACKENDS[backend]]):
            out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=gqa)
        out.backward(torch.ones_like(out))
        torch.cuda.synchronize()
        if i >= warmup: times.append(time.perf_counter() - t0)
    ms = 1000 * statistics.median(times)
    flops = 4 * seq * seq * dim * heads * 0.5 * 3.5     # causal: half the scores; backward ~2.5x the forward
    return {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", default="4096,16384")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    rows = []
    for seq in [int(s) for s in a.seqs.split(",")]:
        for gqa in (True, False):
            for name in BACKENDS:
                try: r = measure(name, seq, gqa)
                except Exception as e: r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
                rows.append({"seq": seq, "gqa_in_sdpa": gqa, "backend": name, **r})
                print(json.dumps(rows[-1]), flush=True)
    md = [f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}: causal SDPA fwd + bwd, 32 q heads / 8 kv heads, "
          "head dim 128, bf16, median of 10 (TFLOP/s counts half the scores and 3.5x the forward's 4·s²·d·heads).\n",
          "| seq | GQA in SDPA | backend | ms | TFLOP/s |", "|---|---|---|---|---|"]
    md += [f"| {r['seq']:,} | {'yes' if r['gqa_in_sdpa'] else 'no (kv repeated)'} | {r['backend']} | "
           f"{r.get('ms', r.get('error'))} | {r.get('tflops', '')} |" for r in rows]
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    (out / "attention.md").write_text("\n".join(md) + "\n")
    (out / "attention.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    main()
