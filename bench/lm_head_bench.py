"""The LM head and its loss on one GPU: plain logits + cross-entropy, Liger's fused linear cross-entropy, and TRL's
chunked log-prob head (the one `SFTTrainer`, `DPOTrainer` and `GRPOTrainer` use in TRL 1.16), fwd + bwd.

    python bench/lm_head_bench.py [--tokens 4096,16384,65536] [--hidden 4096] [--vocab 128256] [--out DIR]

Llama-3.1-8B's head by default (hidden 4096, vocab 128,256), bf16, frozen head weight (as under LoRA): the gradient
flows to the hidden states only. Per implementation and token count: median time of a forward + backward over 10
repeats after 3 warm-up ones, and peak memory allocated during it above what the inputs hold. Also the largest
difference of the per-token loss from the float32 reference. Writes `lm_head.json` and `lm_head.md` to `--out`
(default `$OUT`, else the current folder). Needs CUDA.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def impls():
    "name -> f(hidden, weight, targets) returning the per-token negative log-likelihood (float32)."
    import torch
    import torch.nn.functional as F
    out = {"plain logits + cross_entropy": lambda h, w, y: F.cross_entropy((h @ w.t()).float(), y, reduction="none")}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss(reduction="none")
        out["Liger fused linear cross-entropy"] = lambda h, w, y: liger(w, h, y).float()
    except Exception as e:
        print(f"Liger unavailable: {type(e).__name__}: {e}")
    try:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
        out["TRL chunked log-prob head"] = lambda h, w, y: -ChunkedLogProbFunction.apply(
            h, w, None, y, 1.0, chunk, None, 1.0, ("log_probs",))[0].float()
    except Exception as e:
        print(f"TRL's chunked head unavailable: {type(e).__name__}: {e}")
    return out


def measure(fn, n_tokens, hidden, vocab, repeats=10, warmup=3) -> dict:
    import torch
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(vocab, hidden, device="cuda", generator=g) / hidden ** 0.5).to(torch.bfloat16)
    h0 = torch.randn(n_tokens, hidden, device="cuda", generator=g).to(torch.bfloat16)
    y = torch.randint(0, vocab, (n_tokens,), device="cuda", generator=g)
    ref = torch.nn.functional.cross_entropy(h0.float() @ w.float().t(), y, reduction="none")
    times, peak, err = [], 0, None
    for i in range(warmup + repeats):
        h = h0.clone().requires_grad_()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        nll = fn(h, w, y)
        nll.mean().backward()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
        if i == 0: err = (nll.detach() - ref).abs().max().item()
        del h, nll
    return {"ms": round(1000 * statistics.median(times), 2), "peak_gib": round(peak / 2 ** 30, 3),
            "max_abs_err": round(err, 4)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="4096,16384,65536")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args(argv)
    import torch
    rows = []
    for n in [int(x) for x in a.tokens.split(",")]:
        for name, fn in impls().items():
            try: r = measure(fn, n, a.hidden, a.vocab)
            except torch.OutOfMemoryError: r = {"error": "out of memory"}
            torch.cuda.empty_cache()
            rows.append({"tokens": n, "impl": name, **r})
            print(json.dumps(rows[-1]), flush=True)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    cmd = "python bench/lm_head_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "lm_head.json").write_text(json.dumps({"command": cmd, "gpu": torch.cuda.get_device_name(0), "rows": rows}, indent=1))
    md = [f"### `{cmd}`\n", f"{torch.cuda.get_device_name(0)}, hidden {a.hidden}, vocab {a.vocab:,}, bf16, frozen head "
          "weight; forward + backward of the mean token loss, median of 10.\n",
          "| tokens | implementation | ms | × plain | peak GiB above inputs | × plain | max abs error vs fp32 |",
          "|---|---|---|---|---|---|---|"]
    for n in sorted({r["tokens"] for r in rows}):
        rs = [r for r in rows if r["tokens"] == n]
        plain = next((r for r in rs if r["impl"].startswith("plain") and "ms" in r), None)
        for r in rs:
            if "ms" not in r: md.append(f"| {n:,} | {r['impl']} | {r['error']} | | | | |"); continue
            x = lambda k: f"{r[k] / plain[k]:.2f}" if plain else "–"
            md.append(f"| {n:,} | {r['impl']} | {r['ms']} | {x('ms')} | {r['peak_gib']} | {x('peak_gib')} | {r['max_abs_err']} |")
    (out / "lm_head.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
