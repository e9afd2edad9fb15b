"""Axolotl keys that real configs use, trained on the tiny model: each does what axolotl does with it."""
import torch
from ftlab.run import Run
from ftlab.events import read_metrics

from run_helpers import logs


def notes(run):
    return [r["message"] for r in read_metrics(run.output_dir) if r["event"] == "note"]


def test_full_fine_tune_with_axolotl_keys(make_cfg):
    cfg = make_cfg("model_type: LlamaForCausalLM\nattn_implementation: flash_attention_2\nflash_attention: true\n"
                   "unfrozen_parameters: ['^model.norm.weight$', 'model.layers.1.mlp.*']\n"
                   "val_set_size: 0.1\nevals_per_epoch: 0\nmax_steps: 4\nlearning_rate: 0.001\nwarmup_steps: 0\n"
                   "cosine_min_lr_ratio: 0.1\ncosine_constant_lr_ratio: 0.5\ncut_cross_entropy: true\n"
                   "dataset_exact_deduplication: true\nbatch_size: 2\n")
    assert cfg.gradient_accumulation_steps == 2 and any("chunked LM head" in n for n in cfg.notes)
    run = Run(cfg)
    before = {n: p.detach().clone() for n, p in __import__("ftlab.model", fromlist=["x"]).load_model(cfg).named_parameters()}
    run.train()
    assert run.state == "finished"
    said = notes(run)
    assert any("flash_attention_2" in n and "SDPA" in n for n in said), said            # flash-attn absent: SDPA, said once
    assert any("unfrozen_parameters: 4 of" in n for n in said), said
    recs = logs(run)
    assert not any("eval_loss" in r for r in read_metrics(run.output_dir))            # evals_per_epoch: 0 -> no evaluation
    lrs = [r["learning_rate"] for r in recs]
    assert abs(lrs[-1] - 1e-4) < 1e-9 and abs(lrs[-2] - 1e-4) < 1e-9, lrs             # the floor, reached at 50% and held
    model = run.trainer.model
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach().cpu(), before[n])
        assert changed == (n == "model.norm.weight" or n.startswith("model.layers.1.mlp.")), n


def test_lora_target_parameters_and_quadratic_warmup(make_cfg):
    cfg = make_cfg("adapter: lora\nlora_r: 4\nlora_target_modules: [q_proj]\nlora_target_parameters: ['mlp.down_proj.weight']\n"
                   "max_steps: 3\nwarmup_steps: 2\nlr_quadratic_warmup: true\nlearning_rate: 0.001\n")
    run = Run(cfg)
    run.train()
    assert run.state == "finished"
    names = [n for n, p in run.trainer.model.named_parameters() if p.requires_grad]
    assert any("down_proj" in n and "lora_A" in n for n in names) and any("q_proj" in n and "lora_A" in n for n in names)
    lrs = [r["learning_rate"] for r in logs(run)]
    assert abs(lrs[0] - 0.0) < 1e-12 and abs(lrs[1] - 0.25e-3) < 1e-9, lrs              # (step / warmup)^2
