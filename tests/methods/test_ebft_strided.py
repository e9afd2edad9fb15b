"""EBFT strided mode: a training step equals one built by hand from plain sequences (each block after its own
prefix, ordinary causal attention, the ebft_math rewards); block-parallel generation equals a per-block loop;
`ftlab train` runs axolotl's strided example on the tiny model; the config checks name key and line; the run's
completions, mask view and panels show the blocks."""
from pathlib import Path
import pytest
from ftlab.config import load_config
from ftlab.errors import ConfigError, FtlabError
from ftlab.events import read_metrics
from ftlab.run import Run

CONFIGS = Path(__file__).parents[1] / "configs"
TEXT = (CONFIGS / "ebft_strided_text.yaml").read_text()
STRIDED_KEYS = {"ebft/rl_loss", "ebft/mean_reward", "ebft/alignment", "ebft/diversity", "ebft/cfm_loss",
                "ebft/num_blocks", "ebft/advantages_std"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    "Two steps of axolotl's raw-text strided example with a CE term, a learning rate that moves the adapter, no dropout."
    out = tmp_path_factory.mktemp("strided") / "out"
    text = TEXT.replace("learning_rate: 1.0e-6", "learning_rate: 1.0e-2").replace("warmup_steps: 2", "warmup_steps: 0")
    text = text.replace("ce_coef: 0.0\n", "ce_coef: 0.03\n").replace("lora_dropout: 0.05", "lora_dropout: 0.0")
    text = text.replace("./outputs/ebft-strided-validation", str(out))
    text = text.replace("bf16: auto", "bf16: false")     # float32 on a GPU too, so the sums by hand match closely
    return Run(load_config(text)).train(max_steps=2)


def batch_of(trainer, lengths):
    "A padded batch of prepared rows with these lengths (the first row of each length)."
    ds = trainer.train_dataset
    picked = [next(i for i, x in enumerate(ds["input_ids"]) if len(x) == n) for n in lengths]
    dev = trainer.accelerator.device
    return {k: v.to(dev) for k, v in trainer.data_collator([ds[i] for i in picked]).items()}


def test_a_strided_step_equals_one_built_by_hand(trained):
    import torch
    from ftlab.methods.ebft_math import advantages, feature_rewards, layer_features, normalise_features
    from ftlab.methods.ebft_strided import plan_anchors
    trainer, e = trained.trainer, trained.trainer.ebft
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    lengths = sorted({len(x) for x in trainer.train_dataset["input_ids"] if len(x) >= 30})
    batch = batch_of(trainer, [64, lengths[0]])          # the shorter row's last blocks run into padding
    docs, labels = batch["input_ids"], batch["labels"]
    dev = docs.device
    anchors, _, valid = plan_anchors(batch["lengths"], batch["prompt_lengths"].tolist(), docs.shape[1], e, dev)
    assert not valid.all() and valid.any()
    R, n, B, G = len(docs), e.n_samples_per_prompt, len(anchors), e.generate_max_len
    blocks = torch.randint(4, model.config.vocab_size, (R * n, B, G), generator=torch.Generator().manual_seed(3)).to(dev)
    trainer.rollouts = lambda *a: blocks                 # the same sampled tokens for both computations
    try: loss = trainer.compute_loss(model, batch)
    finally: del trainer.rollouts

    layers = trainer.feature_layers
    def last_features(ids):                              # the frozen base (adapter off), plain causal attention
        with torch.no_grad(), model.disable_adapter():
            hs = model(torch.tensor([ids], device=dev), output_hidden_states=True).hidden_states
        return layer_features(hs, layers, per_layer_norm=True)[0, -1]
    gen = torch.zeros(R, n, B, sum(model.config.hidden_size for _ in layers), device=dev)
    ref = torch.zeros(R, B, gen.shape[-1], device=dev)
    logp = torch.zeros(R, n, B, G, device=dev)
    for r in range(R):
        for b, a in enumerate(anchors.tolist()):
            ref[r, b] = last_features(docs[r, :a + G].tolist())
            for j in range(n):
                ids = docs[r, :a].tolist() + blocks[r * n + j, b].tolist()
                gen[r, j, b] = last_features(ids)
                lp = torch.log_softmax(model(torch.tensor([ids], device=dev)).logits[0].float(), -1)
                logp[r, j, b] = torch.stack([lp[a - 1 + t, ids[a + t]] for t in range(G)])
    fr = feature_rewards(*normalise_features(gen, ref, e.use_whitening), e.alignment_coef, e.diversity_coef)
    adv = advantages(fr.reward, e.advantage_estimator)
    keep = valid[:, None, :, None].expand(R, n, B, G)
    rl = (-logp * adv[..., None])[keep].mean()
    nll = []
    for r in range(R):
        lp = torch.log_softmax(model(docs[r:r + 1, :int(batch["lengths"][r])]).logits[0].float(), -1)
        nll += [-lp[i - 1, docs[r, i]] for i in range(1, int(batch["lengths"][r])) if labels[r, i] != -100]
    by_hand = e.rl_coef * rl + e.ce_coef * torch.stack(nll).mean()
    assert torch.allclose(loss, by_hand, atol=1e-4), (loss, by_hand)
    with torch.no_grad():                                # the adapter moved, so "adapter off" is a real difference
        on = model(docs[:1]).logits
        with model.disable_adapter(): off = model(docs[:1]).logits
    assert not torch.allclose(on, off, atol=1e-3)


def test_block_parallel_generation_equals_a_per_block_loop(trained):
    import torch
    from ftlab.methods.ebft_strided import generate_blocks, plan_anchors
    trainer, e = trained.trainer, trained.trainer.ebft
    model = trainer.accelerator.unwrap_model(trainer.model).train()
    batch = batch_of(trainer, [64])
    docs = batch["input_ids"]
    anchors, _, _ = plan_anchors(batch["lengths"], [0], docs.shape[1], e, docs.device)
    parallel = generate_blocks(model, docs, anchors, e.generate_max_len, temperature=0)
    with torch.no_grad():
        for b, a in enumerate(anchors.tolist()):           # the reference: one block at a time, greedy
            ids = docs[0, :a].tolist()
            for _ in range(e.generate_max_len):
                ids.append(int(model(torch.tensor([ids], device=docs.device)).logits[0, -1].argmax()))
            assert parallel[0, b].tolist() == ids[a:], b
    assert model.training                                  # generation put the model back in training mode
    g1, g2 = (torch.Generator(device=docs.device).manual_seed(5) for _ in range(2))
    s1 = generate_blocks(model, docs, anchors, e.generate_max_len, 0.6, 0.9, generator=g1)
    assert torch.equal(s1, generate_blocks(model, docs, anchors, e.generate_max_len, 0.6, 0.9, generator=g2))


def test_a_run_logs_the_strided_metrics_and_stores_its_blocks(trained):
    import torch
    logs = [r for r in read_metrics(trained.output_dir) if r["event"] == "log"]
    notes = [r["message"] for r in read_metrics(trained.output_dir) if r["event"] == "note"]
    said = "fused EBFT kernels on" if torch.cuda.is_available() else "EBFT maths in plain PyTorch"
    assert any(said in m for m in notes), notes              # the run says which path computes its maths
    assert trained.state == "finished" and [r["step"] for r in logs] == [1, 2]
    for r in logs:
        assert STRIDED_KEYS | {"ebft/ce_loss"} <= set(r) and r["ebft/num_blocks"] > 0
        assert r["ebft/mean_reward"] == pytest.approx(r["ebft/alignment"] - r["ebft/diversity"], abs=1e-4)
        t = {k: v for k, v in r.items() if k.startswith("timing/")}    # rollouts, feature rewards, the rest
        assert set(t) == {"timing/generation", "timing/rewards", "timing/update", "timing/step"} and min(t.values()) > 0
        assert t["timing/generation"] + t["timing/rewards"] + t["timing/update"] <= t["timing/step"] * (1 + 1e-6)
    view = trained.completions(step=2)
    rows = view.rows
    assert rows and {"alignment", "diversity"} == set(rows[0]["parts"]) and rows[0]["reference"]
    assert len(rows[0]["reference"]) > 0 and view.part_names == ["alignment", "diversity"]
    assert "alignment" in view._repr_html_() and "reference" in view._repr_html_()
    groups = view.groups(2)
    assert all(len(rs) == 4 for _, rs in groups)         # one group per stored block: its four samples
    from ftlab.dashboard import Dashboard
    dash = Dashboard.for_run(trained, rich=False)
    from ftlab.charts import figure
    shown = {t["name"].split(":")[0] for t in figure(trained.records, dash.panels)["data"]}
    assert {"RL loss (REINFORCE on the blocks)", "advantage spread", "blocks per batch", "CE loss on the reference"} <= shown
    assert "KL to the reference" not in shown
    from ftlab.events import format_record
    assert " · reward " in format_record(logs[-1], dash.figures) and " · align " in format_record(logs[-1], dash.figures)
    mv = trained.masks(n=1)
    assert mv.samples[0].anchors is not None and "anchor" in mv.html


def test_ftlab_train_runs_axolotls_strided_example(tmp_path):
    from ftlab.cli import main
    out = tmp_path / "out"
    assert main(["train", str(CONFIGS / "ebft_strided_text.yaml"), "--max-steps", "3", "--set", f"output_dir={out}"]) == 0
    logs = [r for r in read_metrics(out) if r["event"] == "log"]
    assert [r["step"] for r in logs] == [1, 2, 3] and all(STRIDED_KEYS <= set(r) for r in logs)
    assert "ebft/ce_loss" not in logs[0]                 # ce_coef 0: no CE term, none logged
    assert (out / "adapter_model.safetensors").exists()


def test_structured_data_puts_the_anchors_in_the_completion(tmp_path):
    cfg = load_config(CONFIGS / "ebft_strided.yaml")
    assert cfg.ebft.mode == "strided" and cfg.datasets[0].type == "ebft_strided_structured.transform"
    prepared = Run(cfg.model_copy(update={"output_dir": tmp_path})).prepare()
    from ftlab.methods.ebft_strided import pad_documents, plan_anchors, prompt_length
    rows = [prepared.train[i] for i in range(4)]
    batch = pad_documents(rows, 3)
    anchors, offset, _ = plan_anchors(batch["lengths"], batch["prompt_lengths"].tolist(), batch["input_ids"].shape[1], cfg.ebft)
    longest = max(prompt_length(r["labels"]) for r in rows)
    assert longest > 0 and offset == max(cfg.ebft.context_length, longest + cfg.ebft.min_completion_prefix)
    assert all(a >= longest + 8 for a in anchors.tolist())


def test_strided_config_checks_name_key_and_line():
    base = (CONFIGS / "ebft_strided.yaml").read_text()
    def refused(text):
        with pytest.raises(ConfigError) as e: load_config(text)
        (p,) = e.value.problems
        return p
    p = refused(base.replace("bf16: auto\n", "bf16: auto\ntorch_compile: true\n"))
    assert p.key == "torch_compile" and p.line == base.splitlines().index("bf16: auto") + 2 and "flex attention" in p.message
    p = refused(base.replace("use_reentrant: true", "use_reentrant: false"))
    assert p.key == "gradient_checkpointing_kwargs.use_reentrant" and "use_reentrant: true" in p.fix
    assert p.line == next(i for i, l in enumerate(base.splitlines(), 1) if "use_reentrant" in l)
    p = refused(base.replace("bf16: auto\n", "bf16: auto\nactivation_offloading: true\n"))
    assert p.key == "activation_offloading"
    p = refused(base.replace("ebft_strided_structured.transform", "ebft_opencode.transform"))
    assert p.key == "datasets[0].type" and "documents" in p.message         # a prompts-only type in strided mode
    cfg = load_config(base + "trl:\n  temperature: 0.9\n")
    assert any("`trl:` is not read in strided mode" in n for n in cfg.notes)


def test_documents_too_short_for_a_block_stop_before_the_model_loads(tmp_path, monkeypatch):
    import ftlab.model
    def no_load(*a, **k): raise AssertionError("the model was loaded")
    monkeypatch.setattr(ftlab.model, "load_model", no_load)
    text = TEXT.replace("sequence_len: 64", "sequence_len: 12").replace("./outputs/ebft-strided-validation", str(tmp_path))
    with pytest.raises(FtlabError) as e:
        Run(load_config(text)).train(max_steps=1)
    assert "holds one EBFT block" in str(e.value) and e.value.problems[0].key == "ebft.context_length"


def test_health_rules_for_strided_runs():
    from ftlab.health import HealthMonitor
    from ftlab.methods import get_method
    rules = {r.name: r for r in get_method("ebft").rules}
    assert {"no_blocks", "advantages_flat", "diversity_collapsing"} <= set(rules)
    flat = [{"step": s, "ebft/advantages_std": 0.0, "ebft/num_blocks": 7} for s in range(6)]
    assert rules["advantages_flat"].check(flat, []) and "ebft.temperature" in rules["advantages_flat"].fix
    assert rules["no_blocks"].check(flat, []) is None
    assert rules["no_blocks"].check([{"step": s, "ebft/num_blocks": 0} for s in range(3)], [])
    assert "ebft.n_samples_per_prompt" in rules["diversity_collapsing"].fix


def test_flex_attention_that_cannot_compile_falls_back_to_the_dense_mask(trained, monkeypatch):
    "torch's compiler failing on the flex kernel (as torch 2.11's inductor did on an H200) is one note, then dense masks."
    import torch
    import ftlab.methods.ebft_strided as es
    trainer = trained.trainer
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    batch = batch_of(trainer, [64])
    real, seen, said = es.strided_step, [], []

    class NoValidChoicesError(RuntimeError): pass

    def strided_step(*args):
        seen.append(args[9])                              # the backend the step was asked for
        if args[9] == "flex": raise RuntimeError("compiling flex attention failed") from NoValidChoicesError("no choices")
        return real(*args)
    monkeypatch.setattr(es, "strided_step", strided_step)
    monkeypatch.setattr(trainer, "backend", "flex")
    monkeypatch.setattr(trainer, "say", said.append)
    assert torch.isfinite(trainer.compute_loss(model, batch))
    assert seen == ["flex", "dense"] and trainer.backend == "dense"
    assert len(said) == 1 and "NoValidChoicesError" not in said[0] and "dense block mask" in said[0]
    trainer.compute_loss(model, batch)
    assert seen == ["flex", "dense", "dense"] and len(said) == 1   # said once, flex not tried again

    def broken(*args): raise ValueError("a mistake that is not the compiler's")
    monkeypatch.setattr(es, "strided_step", broken)
    monkeypatch.setattr(trainer, "backend", "flex")
    with pytest.raises(ValueError, match="not the compiler's"): trainer.compute_loss(model, batch)
