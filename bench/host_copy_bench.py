"""What keeping a layer input in host memory costs on this machine: allocating and page-locking an exact-size buffer
(`ftlab.kernels.long_context.HostBuffers`), and copying GPU -> host -> GPU, page-locked against pageable.

    python bench/host_copy_bench.py [--tokens 400000] [--hidden 4096]

One bf16 layer input of `tokens x hidden` (Llama-3.1-8B at 400k tokens: 3.05 GiB). Prints one JSON line. Needs CUDA.
"""
import argparse, json, time

import torch

from ftlab.kernels.long_context import HostBuffers


def timed(f):
    torch.cuda.synchronize(); t = time.perf_counter(); r = f(); torch.cuda.synchronize()
    return r, round(time.perf_counter() - t, 3)


def main():
    ap = argparse.ArgumentParser(); ap.add_argument("--tokens", type=int, default=400_000); ap.add_argument("--hidden", type=int, default=4096)
    a = ap.parse_args()
    x = torch.randn(a.tokens, a.hidden, device="cuda", dtype=torch.bfloat16)
    gib = x.numel() * 2 / 2 ** 30
    pool = HostBuffers()
    slot, first_s = timed(lambda: pool.take(x))                 # allocate + page-lock + copy out
    back, restore_s = timed(slot.restore)
    assert torch.equal(back, x)
    del slot
    slot, reuse_s = timed(lambda: pool.take(x))                 # the buffer again: copy out only
    del slot
    pageable = torch.empty(x.shape, dtype=x.dtype)
    _, pageable_out_s = timed(lambda: pageable.copy_(x))
    _, pageable_in_s = timed(lambda: pageable.to("cuda"))
    pool.release()
    print(json.dumps({"gib": round(gib, 3), "pinned": bool(pool.pin), "first_take_s": first_s, "reused_take_s": reuse_s,
                      "restore_s": restore_s, "pinned_out_gib_s": round(gib / reuse_s, 1), "pinned_in_gib_s": round(gib / restore_s, 1),
                      "pageable_out_gib_s": round(gib / pageable_out_s, 1), "pageable_in_gib_s": round(gib / pageable_in_s, 1)}))


if __name__ == "__main__":
    main()
