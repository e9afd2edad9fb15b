"""Strided EBFT training throughput through ftlab, with and without its EBFT kernels, and where a step's time goes.

    python bench/ebft_bench.py --model llama-3.2-1b --seq 2048 --kernels off --profile /tmp/prof
    python bench/ebft_bench.py --model llama-3.2-1b --seq 2048 --kernels on
    python bench/ebft_bench.py --model tiny --seq 256 --device cpu --steps 2 --warmup 1     # a CPU check

One run per process (so peak memory belongs to it). The model is a random-init copy of a published architecture
(`bench/models/NAME.json`, built and cached as `sft_bench.py` does); the data is random token documents of exactly
`--seq` tokens (`type: tokenized`, every token a document token). The run is an ftlab config (`rl: ebft`,
`ebft.mode: strided`, LoRA r16 on all linear layers, bf16, micro-batch 1, `--samples` rollouts per document, stride
and block length `--stride` / `--block`) trained by `ftlab.run.Run`, so the numbers are ftlab's own path.

Each optimizer step is timed with `torch.cuda.synchronize()`; inside it, the time in the block-parallel generation
(`generate_blocks`) and in the loss (`strided_step`: feature network, rewards, policy forward) are timed the same
way, and the rest of the step is the backward and the optimizer. tokens/s counts document tokens (`seq` per
document per step); `processed tokens/s` counts every token the policy forward sees (each of the `--samples`
sequences holds the document and every generated block). With `--profile DIR` the step after warm-up runs under
torch's profiler and the 25 CUDA kernels with the most time are printed and saved.
Prints one line `BENCH_RESULT {json}` (and appends it to `--out`).
"""
from __future__ import annotations
import argparse, contextlib, json, os, sys, tempfile, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULT_TAG = "BENCH_RESULT "


def _sync():
    import torch
    if torch.cuda.is_available(): torch.cuda.synchronize()


def timed(module, name: str, store: list):
    "Wrap `module.name` so each call's synchronized wall time is appended to `store`."
    inner = getattr(module, name)
    def wrapper(*a, **k):
        _sync(); t = time.perf_counter()
        try: return inner(*a, **k)
        finally: _sync(); store.append(time.perf_counter() - t)
    setattr(module, name, wrapper)
    return inner


def config_text(a, folder: str, work: Path) -> str:
    import yaml
    gpu = a.device == "cuda"
    d = {"base_model": folder, "rl": "ebft", "bf16": gpu, "adapter": "lora", "lora_r": 16, "lora_alpha": 32,
         "lora_dropout": 0.0, "lora_target_linear": True,
         "ebft": {"mode": "strided", "stride": a.stride, "context_length": a.stride, "generate_max_len": a.block,
                  "n_samples_per_prompt": a.samples, "temperature": 0.6, "top_p": a.top_p,
                  "feature_layers": [0.25, 0.5, 0.75], "embed_method": "last_token", "use_whitening": a.whitening,
                  "alignment_coef": 1.0, "diversity_coef": 1.0, "rl_coef": 1.0, "ce_coef": a.ce_coef,
                  "advantage_estimator": "rloo"},
         "sequence_len": a.seq, "micro_batch_size": 1, "gradient_accumulation_steps": 1,
         "max_steps": a.warmup + a.steps, "learning_rate": 1e-6, "optimizer": "adamw_torch_fused" if gpu else "adamw_torch",
         "lr_scheduler": "constant", "gradient_checkpointing": a.grad_ckpt, "logging_steps": 1, "save_steps": 10**9,
         "val_set_size": 0.0, "shuffle_merged_datasets": False, "output_dir": str(work / "out"),
         "dataset_prepared_path": str(work / "prepared"), "datasets": [{"path": "@rows", "type": "tokenized"}]}
    if a.kernels != "auto": d["ebft"]["kernels"] = a.kernels == "on"
    for kv in a.set or []:                      # more ftlab keys, e.g. --set lora_mlp_kernel=true
        k, _, v = kv.partition("=")
        d[k.strip()] = yaml.safe_load(v)
    return yaml.safe_dump(d, sort_keys=False)


def one_run(a) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import numpy as np, torch
    from transformers import TrainerCallback
    import sft_bench
    import ftlab.methods.ebft_strided as es
    from ftlab.config import load_config
    from ftlab.run import Run
    folder, built = sft_bench.ensure_model(a.model, a.cache, a.device)
    vocab = sft_bench.model_json(a.model)["vocab_size"]
    rng = np.random.default_rng(a.seed)
    n_rows = a.warmup + a.steps + 2
    rows = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in rng.integers(3, vocab, size=(n_rows, a.seq))]
    if a.kernels == "on" and a.pieces != "all":      # fused for the named pieces only, the plain maths for the others
        keep = set(a.pieces.split(","))
        for piece, fn in (("logprobs", "head_logprobs"), ("rewards", "block_rewards")):
            if piece not in keep:                        # both take `fused` as their last positional argument
                setattr(es, fn, lambda *x, _f=getattr(es, fn): _f(*x[:-1], False))
        if "loss" not in keep: es.fused_ops().reinforce_loss = es.reinforce_loss
    gen_t, loss_t = [], []
    timed(es, "generate_blocks", gen_t); timed(es, "strided_step", loss_t)
    steps, mark = [], {}

    class Meter(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            _sync(); mark["t"] = time.perf_counter(); mark["g"], mark["l"] = len(gen_t), len(loss_t)
            if a.profile and state.global_step == a.warmup:
                mark["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] +
                                                      ([torch.profiler.ProfilerActivity.CUDA] if a.device == "cuda" else []))
                mark["prof"].__enter__()
        def on_step_end(self, args, state, control, **kw):
            _sync()
            steps.append(dict(total=time.perf_counter() - mark["t"], generation=sum(gen_t[mark["g"]:]),
                              loss=sum(loss_t[mark["l"]:])))
            if "prof" in mark:
                p = mark.pop("prof"); p.__exit__(None, None, None); mark["table"] = p

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(config_text(a, folder, Path(tmp)), name="bench")
        if a.device == "cuda": torch.cuda.reset_peak_memory_stats()
        run = Run(cfg, namespace={"rows": rows})
        run.train(callbacks=[Meter()])
        notes = [r["message"] for r in run.records if r.get("event") == "note" and "kernel" in r.get("message", "").lower()]
    meas = steps[a.warmup:]
    med = lambda k: float(np.median([s[k] for s in meas]))
    step_s = med("total")
    e = cfg.ebft
    n_blocks = len(range(e.stride, a.seq - e.generate_max_len + 1, e.stride))   # upper bound, for the processed count
    res = dict(model=a.model, seq=a.seq, set=a.set or [], samples=a.samples, stride=a.stride, block=a.block, kernels=a.kernels, pieces=a.pieces,
               whitening=a.whitening, top_p=a.top_p, ce_coef=a.ce_coef, steps=len(meas), step_s=round(step_s, 4),
               generation_s=round(med("generation"), 4), loss_fwd_s=round(med("loss"), 4),
               backward_and_optimizer_s=round(step_s - med("generation") - med("loss"), 4),
               tokens_per_s=round(a.seq / step_s, 1),
               processed_tokens_per_s=round(a.samples * (a.seq + n_blocks * a.block) / step_s, 1),
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if a.device == "cuda" else None,
               kernel_notes=notes, built=built)
    if "table" in mark:
        p = mark["table"]
        key = "self_cuda_time_total" if a.device == "cuda" else "self_cpu_time_total"
        table = p.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70)
        print(table)
        Path(a.profile).mkdir(parents=True, exist_ok=True)
        (Path(a.profile) / f"ebft-{a.model}-{a.kernels}.txt").write_text(table)
    return res


def parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--ce-coef", type=float, default=0.0)
    ap.add_argument("--whitening", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--kernels", choices=["on", "off", "auto"], default="auto")
    ap.add_argument("--pieces", default="all", help="with --kernels on: which fused pieces, e.g. logprobs,rewards,loss")
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--profile", default=None, metavar="DIR")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--cache", default=os.environ.get("FTLAB_BENCH_CACHE", "/tmp/ftlab-bench"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="another top-level ftlab key (repeatable)")
    ap.add_argument("--out")
    return ap


if __name__ == "__main__":
    a = parser().parse_args()
    try:
        res = one_run(a)
    except Exception as e:
        import traceback; traceback.print_exc()
        res = dict(model=a.model, kernels=a.kernels, error=f"{type(e).__name__}: {e}"[:500])
    line = json.dumps(res)
    print(RESULT_TAG + line, flush=True)
    if a.out:
        with open(a.out, "a") as f: f.write(line + "\n")
    sys.exit(1 if "error" in res else 0)
