"""ftlab's static-cache sampler for GRPO: the same completions as transformers' `generate` where both are greedy, the
settings it does not carry out left to `generate`, a graph that cannot be recorded falling back with a note; on the
GPU, the recorded graph replaying what the eager steps compute, with the weights as the optimizer leaves them."""
import json
import pytest
import torch
from ftlab.config import load_config
from ftlab.events import read_metrics
from ftlab.run import Run
from test_grpo import count_reward, grpo_cfg

SAMPLER_NOTE = "completions are sampled by ftlab's static-cache sampler"


def grpo_run(tmp_path, extra, steps=2, name="out"):
    (tmp_path / name).mkdir()
    run = Run(load_config(grpo_cfg(tmp_path / name, extra=extra)), namespace={"count_reward": count_reward})
    return run.train(max_steps=steps)


def notes(run): return [r["message"] for r in run.records if r["event"] == "note"]


def completions(run): return [json.loads(l)["completion"] for l in (run.output_dir / "completions.jsonl").read_text().splitlines()]


def test_greedy_completions_equal_transformers_generate(tmp_path):
    "`top_k: 1` makes both paths greedy: the sampler and TRL's `generate` path sample the same completions, step after step."
    ours = grpo_run(tmp_path, "  sampler: graphs\n  top_k: 1\n", name="ours")
    theirs = grpo_run(tmp_path, "  sampler: generate\n  top_k: 1\n", name="theirs")
    assert any(n.startswith(SAMPLER_NOTE) for n in notes(ours)) and not any(SAMPLER_NOTE in n for n in notes(theirs))
    assert ours.trainer.sampler is not None and theirs.trainer.sampler is None
    a, b = completions(ours), completions(theirs)
    assert len(a) == 16 and a == b


def test_sampling_keeps_min_new_tokens_and_varies_within_a_group(tmp_path):
    run = grpo_run(tmp_path, "  sampler: graphs\n  generation_kwargs: {min_new_tokens: 24}\n", steps=1)
    log, = [r for r in read_metrics(run.output_dir) if r["event"] == "log"]
    assert log["completions/mean_length"] == 24           # no completion ends before min_new_tokens
    assert len(set(completions(run))) > 1                   # sampled, not greedy


def test_settings_only_generate_has_stay_with_generate(tmp_path):
    run = grpo_run(tmp_path, "  sampler: graphs\n  repetition_penalty: 1.2\n", steps=1)
    assert run.trainer.sampler is None
    assert "completions are sampled with transformers' `generate`: generation setting `repetition_penalty` is one only " \
           "transformers' `generate` has" in notes(run)


def test_a_graph_that_cannot_be_recorded_falls_back_with_a_note(tmp_path, monkeypatch):
    "Recording needs CUDA: asked for on a CPU, the first generation fails to record, and TRL's path samples from then on."
    import ftlab.methods.sampler as sm
    class Recording(sm.GraphSampler):
        def __init__(self, *a, **kw): super().__init__(*a, **{**kw, "graphs": True})
    monkeypatch.setattr(sm, "GraphSampler", Recording)
    run = grpo_run(tmp_path, "  sampler: graphs\n", steps=2)
    assert run.state == "finished" and run.trainer.sampler is None
    said = [n for n in notes(run) if "from now on" in n]
    assert len(said) == 1 and "a CUDA graph of its decoding step could not be recorded" in said[0], notes(run)
    assert [r["step"] for r in read_metrics(run.output_dir) if r["event"] == "log"] == [1, 2]


def test_ebft_structured_mode_samples_with_it_too(tmp_path):
    "EBFT's structured mode generates through GRPO's path: axolotl's no-vLLM example trains with the sampler."
    from pathlib import Path
    text = (Path(__file__).parents[1] / "configs" / "ebft_opencode_novllm.yaml").read_text()
    text = text.replace("./outputs/ebft-validation", str(tmp_path / "out")).replace("bf16: auto", "bf16: false")
    run = Run(load_config(text.replace("trl:\n", "trl:\n  sampler: graphs\n", 1))).train(max_steps=2)
    assert run.state == "finished" and any(n.startswith(SAMPLER_NOTE) for n in notes(run))
    logs = [r for r in read_metrics(run.output_dir) if r["event"] == "log"]
    assert [r["step"] for r in logs] == [1, 2] and all(r["completions/mean_length"] > 0 and "ebft/reward" in r for r in logs)


@pytest.mark.gpu
def test_the_recorded_step_replays_the_eager_steps_with_the_current_weights(tmp_path):
    """On CUDA, bf16, LoRA with ftlab's fused kernels and Liger: one GRPO step through the graph sampler (the default),
    then greedy completions from the recorded graphs equal those of the same steps run eagerly; after the adapter's
    weights change in place (as the optimizer changes them), the replay follows them."""
    from ftlab.methods.sampler import GraphSampler
    import dataclasses
    run = grpo_run(tmp_path, "", steps=1)
    sampler = run.trainer.sampler
    assert sampler is not None and sampler.graphs and any(SAMPLER_NOTE in n and "CUDA graphs" in n for n in notes(run))
    greedy = dataclasses.replace(sampler.settings, do_sample=False)
    prompts = [[5 + i for i in range(n)] for n in (9, 4, 17, 2)]
    graphed, eager = GraphSampler(sampler.model, greedy), GraphSampler(sampler.model, greedy, graphs=False)
    assert graphed.graphs and graphed.completions(prompts, 0) == eager.completions(prompts, 0)
    before = graphed.completions(prompts, 0)
    with torch.no_grad():
        for name, p in sampler.model.named_parameters():
            if "lora_B" in name: p.add_(torch.randn_like(p) * 0.5)
    after = graphed.completions(prompts, 0)
    assert after == eager.completions(prompts, 0) and after != before
    assert len(graphed.decoders) == 1                     # the same recording, replayed with the new weights


@pytest.mark.gpu
def test_the_graph_sampler_equals_generate_in_float32_and_draws_fresh_samples():
    from transformers import AutoModelForCausalLM, GenerationConfig
    from trl.trainer.utils import pad
    from ftlab.assets import embedded_path
    from ftlab.methods.sampler import GraphSampler, sample_settings
    model = AutoModelForCausalLM.from_pretrained(str(embedded_path("ftlab:tiny")), dtype=torch.float32).cuda().eval()
    prompts = [[5 + (7 * i) % 900 for i in range(n)] for n in (9, 4, 17, 2)]
    gen = GenerationConfig(max_new_tokens=40, do_sample=False, eos_token_id=[2], pad_token_id=0)
    ids = pad([torch.tensor(p) for p in prompts], padding_value=0, padding_side="left").cuda()
    mask = pad([torch.ones(len(p), dtype=torch.long) for p in prompts], padding_value=0, padding_side="left").cuda()
    theirs = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)[:, ids.shape[1]:].tolist()
    theirs = [r[:r.index(2) + 1] if 2 in r else r for r in theirs]
    assert GraphSampler(model, sample_settings(gen)[0]).completions(prompts, 0) == theirs
    sampled = GraphSampler(model, sample_settings(GenerationConfig(max_new_tokens=40, do_sample=True, eos_token_id=[2], pad_token_id=0))[0])
    one, two = sampled.completions(prompts * 4, 0), sampled.completions(prompts * 4, 0)
    assert one != two and len({tuple(r) for r in one}) > 4    # each replay draws new noise; rows differ
