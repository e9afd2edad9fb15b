"""ftlab's static-cache sampler for GRPO: the same completions as transformers' `generate` where both are greedy, the
settings it does not carry out left to `generate`, a graph that cannot be recorded falling back with a note; on the
GPU, the recorded graph replaying what the eager steps compute, with the weights as the optimizer leaves them. LoRA
layers sample with merged copies of their weights: the same completions, refreshed after each change of the adapter,
kept apart where the copy would not fit, and the layers' own forwards given back afterwards."""
import json
import pytest
import torch
from ftlab.config import load_config
from ftlab.events import read_metrics
from ftlab.run import Run
from ftlab.methods.sampler import GraphSampler, SampleSettings
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
    assert any(n.startswith(SAMPLER_NOTE) and "LoRA merged into a" in n for n in notes(ours))   # merged LoRA sampled
    assert not any(SAMPLER_NOTE in n for n in notes(theirs))
    assert ours.trainer.sampler is not None and theirs.trainer.sampler is None
    a, b = completions(ours), completions(theirs)
    assert len(a) == 16 and a == b


def test_the_config_turns_the_merged_copies_off(tmp_path):
    "`trl.sampler_merge_lora: false` keeps the LoRA layers as they are while sampling (the copy's memory saved)."
    run = grpo_run(tmp_path, "  sampler: graphs\n  sampler_merge_lora: false\n", steps=1)
    assert run.trainer.sampler is not None and run.trainer.sampler.merged is None
    assert any(n.startswith(SAMPLER_NOTE) for n in notes(run)) and not any("LoRA merged" in n for n in notes(run))


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


GREEDY = SampleSettings(max_new_tokens=24, eos_ids=(2,), pad_id=0, do_sample=False)
PROMPTS = [[5 + (7 * i) % 900 for i in range(n)] for n in (9, 4, 17, 2)]


def tiny_lora(**lora):
    "The embedded tiny Llama (float32) with LoRA on all seven projections and ftlab's fused kernels, B drawn at random."
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from ftlab.assets import embedded_path
    from ftlab.kernels.lora import apply_fused_lora
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(embedded_path("ftlab:tiny")), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", **lora)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name: p.normal_(std=0.05)
    apply_fused_lora(model)
    return model


def own_forwards(model): return {name: m.__dict__.get("forward") for name, m in model.named_modules()}


def test_merged_lora_samples_the_unmerged_completions_with_one_matmul_per_input():
    """Generating with the merged copies runs, per layer, four matmuls (q/k/v stacked, o, gate/up stacked, down) where
    the model without its adapter runs seven, and one per LoRA layer to refresh its copy; the completions are the
    unmerged layers' and the copies are what PEFT's own merge makes."""
    from torch.utils._python_dispatch import TorchDispatchMode
    class Matmuls(TorchDispatchMode):
        n = 0
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm, torch.ops.aten.addmm_)
            return func(*args, **(kwargs or {}))
    model = tiny_lora()
    merging, apart = GraphSampler(model, GREEDY, bucket=16), GraphSampler(model, GREEDY, bucket=16, merge=0)
    assert merging.merge_note.startswith("LoRA merged into a") and apart.merged is None and apart.merge_note is None
    with Matmuls() as merged: ours = merging.completions(PROMPTS, 0)
    with Matmuls() as fused: theirs = apart.completions(PROMPTS, 0)
    with Matmuls() as plain, model.disable_adapter(): apart.completions(PROMPTS, 0)
    assert ours == theirs and max(map(len, ours)) > 1
    n_layers = model.config.num_hidden_layers
    forwards, rest = divmod(plain.n, 7 * n_layers + 1)                 # prefill and steps: each layer's 7 and the head
    assert rest == 0 and forwards > 1
    assert merged.n == forwards * (4 * n_layers + 1) + len(merging.merged.layers) < fused.n
    model.merge_adapter()                                                # PEFT's own merge: the same weights
    assert all(torch.equal(buf, m.get_base_layer().weight) for m, buf in merging.merged.layers)
    model.unmerge_adapter()


def test_the_next_generate_follows_the_adapter_changed_in_place():
    "The copies are refreshed at the start of each call: an optimizer-like in-place change of lora_B reaches the next one."
    model = tiny_lora()
    sampler = GraphSampler(model, GREEDY, bucket=16)
    before = sampler.completions(PROMPTS, 0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name: p.add_(torch.randn_like(p) * 0.1)
    after = sampler.completions(PROMPTS, 0)
    assert after != before and after == GraphSampler(model, GREEDY, bucket=16, merge=0).completions(PROMPTS, 0)
    assert len(sampler.decoders) == 1


def test_a_copy_too_large_for_free_memory_keeps_lora_apart_and_the_run_says_so(tmp_path, monkeypatch):
    from types import SimpleNamespace as NS
    from transformers import GenerationConfig
    import ftlab.methods.sampler_merge as merge
    from ftlab.methods.sampler import choose_sampler
    from ftlab.methods.sampler_merge import size_text
    model = tiny_lora()
    need = sum(p.numel() * 4 for name, p in model.named_parameters() if "base_layer" in name)   # float32 projections
    kept = f"LoRA kept apart while sampling: the merged copy would take {size_text(need)} of {size_text(4 * need - 1)} free"
    small = GraphSampler(model, GREEDY, bucket=16, free_memory=lambda device: 4 * need - 1)
    assert small.merged is None and small.merge_note == kept
    assert GraphSampler(model, GREEDY, free_memory=lambda device: 4 * need).merged.nbytes == need
    monkeypatch.setattr(merge, "device_free_bytes", lambda device: 4 * need - 1)      # what CUDA would report
    trainer = NS(accelerator=NS(device=torch.device("cpu"), state=NS(deepspeed_plugin=None)), model=model,
                 is_fsdp_enabled=False, generation_config=GenerationConfig(max_new_tokens=8, eos_token_id=[2], pad_token_id=0))
    sampler, note = choose_sampler(trainer, load_config(grpo_cfg(tmp_path, extra="  sampler: graphs\n")))
    assert sampler.merged is None and note.startswith(SAMPLER_NOTE) and note.endswith("; " + kept)


def test_dora_and_full_fine_tuning_keep_their_own_path():
    from transformers import AutoModelForCausalLM
    from ftlab.assets import embedded_path
    dora = GraphSampler(tiny_lora(use_dora=True), GREEDY)
    n = 7 * dora.model.config.num_hidden_layers
    assert dora.merged is None and dora.merge_note == f"LoRA kept apart while sampling: {n} of {n} LoRA layers kept apart (DoRA)"
    full = GraphSampler(AutoModelForCausalLM.from_pretrained(str(embedded_path("ftlab:tiny"))), GREEDY)
    assert full.merged is None and full.merge_note is None


def test_the_swapped_forwards_are_given_back_after_generate_and_when_it_fails(monkeypatch):
    import ftlab.methods.sampler as sm
    model = tiny_lora()
    before = own_forwards(model)
    sampler = GraphSampler(model, GREEDY, bucket=16)
    sampler.completions(PROMPTS, 0)
    assert own_forwards(model) == before
    during = {}
    def fail(self, *a, **kw):
        during.update(own_forwards(model))
        raise RuntimeError("out of memory")
    monkeypatch.setattr(sm.Decoder, "run", fail)
    with pytest.raises(RuntimeError, match="out of memory"): sampler.completions(PROMPTS, 0)
    swapped = {name for name in before if during[name] is not before[name]}
    assert len(swapped) == 8 * model.config.num_hidden_layers               # every projection, and each SwiGLU MLP
    assert own_forwards(model) == before


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_graphs_with_merged_lora_sample_what_generate_samples(dtype):
    """A small random Llama with LoRA (B drawn at random) and ftlab's fused kernels: greedy completions from the
    recorded graphs with merged weights are those of `model.generate` on the same weights merged by PEFT (the copies
    equal them bit for bit). A random model's bf16 logits often tie, and the two paths' rounding (a 256-slot static
    cache against a growing one) may break a tie either way: where rows part, both tokens are within a few roundings
    of the top logit. In float32 they are equal."""
    from peft import LoraConfig, get_peft_model
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import pad
    from ftlab.kernels.lora import apply_fused_lora
    from ftlab.methods.sampler import sample_settings
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    model = get_peft_model(LlamaForCausalLM(config).to("cuda", dtype), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name: p.normal_(std=0.02)
    apply_fused_lora(model)
    prompts = [[5 + (7 * i + 3 * n) % 1000 for i in range(n)] for n in (9, 4, 17, 2, 30, 1, 12, 6)]
    gen = GenerationConfig(max_new_tokens=40, do_sample=False, eos_token_id=[2], pad_token_id=0)
    sampler = GraphSampler(model, sample_settings(gen)[0])
    assert sampler.graphs and sampler.merge_note.startswith("LoRA merged into a")
    ours = sampler.completions(prompts, 0)
    assert len(sampler.decoders) == 1 and sampler.decoders[next(iter(sampler.decoders))].graph is not None
    ids = pad([torch.tensor(p) for p in prompts], padding_value=0, padding_side="left").cuda()
    mask = pad([torch.ones(len(p), dtype=torch.long) for p in prompts], padding_value=0, padding_side="left").cuda()
    model.merge_adapter()
    try:
        assert all(torch.equal(buf, m.get_base_layer().weight) for m, buf in sampler.merged.layers)
        theirs = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)[:, ids.shape[1]:].tolist()
        theirs = [r[:r.index(2) + 1] if 2 in r else r for r in theirs]
        with torch.no_grad():
            for p, a, b in zip(prompts, ours, theirs):
                if a == b: continue
                k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                assert k < min(len(a), len(b)), (a, b)                  # one ended where the other went on
                logits = model(torch.tensor([p + a[:k]], device="cuda")).logits[0, -1].float()
                tol = 4 * torch.finfo(dtype).eps * logits.abs().max()
                assert logits.max() - logits[a[k]] <= tol and logits.max() - logits[b[k]] <= tol, (k, a, b)
        if dtype == torch.float32: assert ours == theirs
    finally:
        model.unmerge_adapter()


@pytest.mark.gpu
def test_qlora_samples_the_same_with_merged_copies_as_with_its_4bit_layers(tmp_path):
    """A small random Llama loaded in 4 bits (NF4) with LoRA and ftlab's fused kernels: each merged copy is the
    dequantized base weight plus the adapter's delta, and greedy completions from the merged copies are those of the
    4-bit layers themselves (`merge=0`: the fused 4-bit projections, dequantizing with `kernels/nf4.py`), except where
    a tie of bf16 logits breaks either way."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.integrations import dequantize_bnb_weight
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GenerationConfig, LlamaConfig, LlamaForCausalLM
    from ftlab.kernels.lora import apply_fused_lora
    from ftlab.methods.sampler import sample_settings
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    q4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "m", quantization_config=q4, dtype=torch.bfloat16, device_map={"": 0})
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name: p.normal_(std=0.02)
    assert apply_fused_lora(model) == 7 * config.num_hidden_layers
    prompts = [[5 + (7 * i + 3 * n) % 1000 for i in range(n)] for n in (9, 4, 17, 2, 30, 1, 12, 6)]
    settings = sample_settings(GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=[2], pad_token_id=0))[0]
    merged, apart = GraphSampler(model, settings), GraphSampler(model, settings, merge=0)
    assert merged.merge_note.startswith("LoRA merged into a") and apart.merged is None
    ours, theirs = merged.completions(prompts, 0), apart.completions(prompts, 0)
    with torch.no_grad():
        for m, buf in merged.merged.layers:
            W = m.get_base_layer().weight
            assert torch.equal(buf, (dequantize_bnb_weight(W, state=W.quant_state) + m.get_delta_weight("default")).to(buf.dtype))
        for p, a, b in zip(prompts, ours, theirs):
            if a == b: continue
            k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            assert k < min(len(a), len(b)), (a, b)
            logits = model(torch.tensor([p + a[:k]], device="cuda")).logits[0, -1].float()
            tol = 8 * torch.finfo(torch.bfloat16).eps * logits.abs().max()
            assert logits.max() - logits[a[k]] <= tol and logits.max() - logits[b[k]] <= tol, (k, a, b)
