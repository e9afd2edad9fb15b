"""Host time of a step's gradient clipping and `zero_grad`: transformers' way (two walks of the module tree) against
one `ftlab.methods.grad_walk.ParameterWalk`, on a model with a real model's layers and parameters at a tiny width.

    python bench/grad_walk_bench.py [--model llama-3.1-8b] [--width 64] [--repeats 50]

The model is `bench/models/MODEL.json` with every width cut down (the tree, and so the walk, stays the real one)
and PEFT's LoRA r16 on all linear layers. Each repeat gives the trained parameters gradients, then times
`accelerator.clip_grad_norm_(model.parameters(), 1.0)` and `model.zero_grad()` as transformers' loop calls them,
against the same two calls over the walk. Prints one JSON line: medians in ms and their ratio. Host time only:
it runs on a CPU, and on a GPU machine the walk is the same Python.
"""
import argparse, json, statistics, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def narrow_model(name: str, width: int):
    from transformers import AutoConfig, AutoModelForCausalLM
    from peft import LoraConfig, get_peft_model
    cfg = json.loads((ROOT / "bench" / "models" / f"{name}.json").read_text())
    heads = 4
    cfg.update(hidden_size=width, intermediate_size=2 * width, num_attention_heads=heads,
               num_key_value_heads=min(cfg.get("num_key_value_heads", heads), heads), head_dim=width // heads,
               vocab_size=1024, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    config = AutoConfig.for_model(cfg.pop("model_type"), **{k: v for k, v in cfg.items() if k != "architectures"})
    model = AutoModelForCausalLM.from_config(config)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b"); ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=50)
    a = ap.parse_args(argv)
    import torch
    from accelerate import Accelerator
    sys.path.insert(0, str(ROOT))
    from ftlab.methods.grad_walk import ParameterWalk
    model, acc = narrow_model(a.model, a.width), Accelerator(cpu=True)
    trained = [p for p in model.parameters() if p.requires_grad]
    walk = ParameterWalk(model)

    def give_grads():
        for p in trained: p.grad = torch.ones_like(p)

    def transformers_way():
        acc.clip_grad_norm_(model.parameters(), 1.0)
        model.zero_grad()

    def walk_way():
        acc.clip_grad_norm_(walk.with_grad(), 1.0)
        for p in walk.with_grad(): p.grad = None

    times = {"transformers": [], "walk": []}
    for _ in range(a.repeats):
        for name, f in (("transformers", transformers_way), ("walk", walk_way)):
            give_grads()
            t = time.perf_counter(); f(); times[name].append(time.perf_counter() - t)
            assert all(p.grad is None for p in trained)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(json.dumps({"model": a.model, "width": a.width, "modules": sum(1 for _ in model.modules()),
                      "parameters": sum(1 for _ in model.parameters()), "trained": len(trained), "repeats": a.repeats,
                      "walks": walk.walks, "transformers_ms": round(med["transformers"], 3),
                      "walk_ms": round(med["walk"], 3), "ratio": round(med["transformers"] / med["walk"], 2),
                      "torch": torch.__version__}))
    walk.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
