"""EBFT structured mode: the reward the trainer computes is the one `ebft_math` gives on the base model's hidden states
(adapter off); a run shaped like axolotl's examples trains on the tiny model with LoRA and logs the EBFT metrics; the
config checks name key and line; axolotl's example configs validate."""
from pathlib import Path
import pytest
from ftlab.config import load_config
from ftlab.errors import ConfigError, FtlabError
from ftlab.events import read_metrics
from ftlab.run import Run

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    "Three steps of axolotl's no-vLLM example on the tiny model (LoRA), with a learning rate that moves the adapter."
    out = tmp_path_factory.mktemp("ebft") / "out"
    text = (CONFIGS / "ebft_opencode_novllm.yaml").read_text().replace("learning_rate: 1.0e-5", "learning_rate: 1.0e-2")
    text = text.replace("warmup_steps: 2", "warmup_steps: 0").replace("./outputs/ebft-validation", str(out))
    text = text.replace("bf16: auto", "bf16: false")     # float32 on a GPU too, so the sums by hand match closely
    run = Run(load_config(text)).train(max_steps=3)
    return run


def test_a_run_logs_the_ebft_metrics(trained):
    logs = [r for r in read_metrics(trained.output_dir) if r["event"] == "log"]
    assert trained.state == "finished" and [r["step"] for r in logs] == [1, 2, 3]
    for r in logs:
        assert {"ebft/reward", "ebft/alignment", "ebft/diversity", "ebft/cfm_loss", "rewards/feature_matching/mean"} <= set(r)
        assert r["ebft/reward"] == pytest.approx(r["rewards/feature_matching/mean"], abs=1e-5)
        assert r["ebft/reward"] == pytest.approx(r["ebft/alignment"] - r["ebft/diversity"], abs=1e-5)   # both coefs 1
        assert r["timing/rewards"] > 0 and r["timing/generation"] > 0   # GRPO's clock: the feature reward is the rewards phase
    from ftlab.dashboard import Dashboard
    dash = Dashboard.for_run(trained, rich=False)
    assert {"alignment (to the reference)", "CFM loss"} <= {p.title for p in dash.panels}
    from ftlab.events import format_record
    assert " · align " in format_record(logs[-1], dash.figures)


def test_the_reward_is_ebft_math_on_the_base_models_hidden_states(trained):
    import torch
    from ftlab.methods.ebft_math import (feature_layer_indices, feature_rewards, layer_features, normalise_features,
                                         pool_embeddings)
    trainer = trained.trainer
    rows = trainer.train_dataset.select(range(2))
    prompts = [p for p in rows["prompt"] for _ in range(4)]
    truth = [g for g in rows["ground_truth"] for _ in range(4)]
    tok = trainer.processing_class
    completions = [tok(f" def f{i}(x):\n    return x + {i}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                   for i in range(8)]
    trainer.model.train()
    got = trainer.feature_matching(prompts=prompts, completions=None, completion_ids=completions, ground_truth=truth)

    model = trainer.accelerator.unwrap_model(trainer.model)
    layers = feature_layer_indices([0.25, 0.5, 0.75], model.config.num_hidden_layers)
    prompt_ids = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"] for p in prompts]
    def features(ids, adapter_on=False):
        with torch.no_grad(), (torch.enable_grad() if adapter_on else model.disable_adapter()):
            h = model(torch.tensor([ids], device=model.device), output_hidden_states=True).hidden_states
        return pool_embeddings(layer_features(h, layers).float(), "last_token")[0]
    def by_hand(adapter_on=False):
        gen = torch.stack([features(p + c[:-1], adapter_on) for p, c in zip(prompt_ids, completions)]).view(2, 4, -1)
        ref = torch.stack([features(prompt_ids[i] + tok(truth[i], add_special_tokens=False)["input_ids"], adapter_on) for i in (0, 4)])
        return feature_rewards(*normalise_features(gen, ref), 1.0, 1.0).reward.reshape(-1)
    got = torch.tensor(got, device=model.device)
    assert torch.allclose(got, by_hand(), atol=1e-4)
    assert not torch.allclose(got, by_hand(adapter_on=True), atol=1e-4)   # the trained adapter was off


def test_config_checks_name_key_and_line():
    base = (CONFIGS / "ebft_opencode_novllm.yaml").read_text()
    line = base.splitlines().index("  num_generations: 4") + 1
    with pytest.raises(ConfigError) as e:
        load_config(base.replace("  num_generations: 4\n", "  num_generations: 3\n"))
    (p,) = e.value.problems
    assert p.key == "trl.num_generations" and p.line == line and "groups of num_generations=3" in p.message
    with pytest.raises(ConfigError) as e:
        load_config(base.replace("  use_vllm: false\n", "  use_vllm: false\n  reward_funcs: [rewards.accuracy]\n"))
    assert e.value.problems[0].key == "trl.reward_funcs" and "rl: grpo" in e.value.problems[0].fix
    with pytest.raises(ConfigError) as e:
        load_config(base.replace("  embed_method: last_token\n", "  embed_method: cls\n"))
    assert e.value.problems[0].key == "ebft.embed_method"
    cfg = load_config(base.replace("  ce_coef: 0.0\n", "  ce_coef: 0.0\n  stride: 4\n  advantage_estimator: rloo\n"))
    assert any("(stride) only apply to `mode: strided`" in n for n in cfg.notes)
    assert any("`trl.scale_rewards` is not used" in n for n in cfg.notes)


def test_axolotl_example_configs_validate():
    cfg = load_config(CONFIGS / "ebft_opencode_novllm.yaml")
    assert cfg.method == "ebft" and cfg.datasets[0].type == "ebft_opencode.transform" and cfg.trl.num_generations == 4
    cfg = load_config(CONFIGS / "ebft_structured_vllm.yaml")
    assert cfg.trl.use_vllm and cfg.trl.chat_template_kwargs == {"enable_thinking": False} and cfg.trl.vllm_server_port == 8000
    cfg = load_config(CONFIGS / "ebft_strided.yaml")       # strided mode runs (tests/methods/test_ebft_strided.py)
    assert cfg.ebft.mode == "strided" and cfg.ebft.stride == 8 and cfg.datasets[0].type == "ebft_strided_structured.transform"


def test_rows_without_a_reference_stop_before_the_model_loads(tmp_path, monkeypatch):
    import ftlab.model
    def no_load(*a, **k): raise AssertionError("the model was loaded")
    monkeypatch.setattr(ftlab.model, "load_model", no_load)
    rows = [{"prompt": [{"role": "user", "content": f"Say {i}."}], "answer": str(i)} for i in range(8)]
    text = (CONFIGS / "ebft_opencode_novllm.yaml").read_text().replace("path: ftlab:data/ebft_code.jsonl", 'path: "@rows"')
    text = text.replace("type: ebft_opencode.transform", "type: chat_template").replace("./outputs/ebft-validation", str(tmp_path))
    with pytest.raises(FtlabError) as e:
        Run(load_config(text), namespace={"rows": rows}).train(max_steps=1)
    assert "no `ground_truth` column" in str(e.value) and "ebft_opencode.transform" in e.value.problems[0].fix


def test_a_transform_from_a_cell_keeps_the_reference(tmp_path):
    rows = [{"question": f"Count to {n}.", "solution": ", ".join(map(str, range(1, n + 1)))} for n in range(2, 10)]
    def to_ebft(cfg):
        def map_fn(row): return {"prompt": [{"role": "user", "content": row["question"]}], "ground_truth": row["solution"]}
        return map_fn, {"remove_columns": "__all__"}
    text = (CONFIGS / "ebft_opencode_novllm.yaml").read_text().replace("path: ftlab:data/ebft_code.jsonl", 'path: "@rows"')
    text = text.replace("type: ebft_opencode.transform", 'type: "@to_ebft"').replace("./outputs/ebft-validation", str(tmp_path))
    prepared = Run(load_config(text), namespace={"rows": rows, "to_ebft": to_ebft}).prepare()
    assert sorted(prepared.train["ground_truth"]) == sorted(r["solution"] for r in rows)
    assert "solution" not in prepared.train.column_names
