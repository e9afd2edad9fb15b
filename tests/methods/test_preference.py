"""Preference tuning and reward models: data, the config → TRL mapping (checked step by step against TRL built by
hand), reference models, each method end to end, and the messages for bad input."""
import json
import pytest
from ftlab.assets import embedded_path
from ftlab.config import load_config
from ftlab.errors import ConfigError, DataError
from ftlab.events import read_metrics
from ftlab.methods import get_method
from ftlab.prepare import prepare_datasets
from ftlab.run import Run

LORA = "adapter: lora\nlora_r: 8\nlora_alpha: 16\nlora_dropout: 0.0\nlora_target_linear: true\n"
METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]


def rows(name, n):
    with open(embedded_path(f"ftlab:data/{name}.jsonl")) as f:
        return [json.loads(l) for l, _ in zip(f, range(n))]


def cfg_text(tmp_path, method, extra="", path='"@rows"', type_="chat_template"):
    return (f"base_model: ftlab:tiny\n{method}\n{LORA}output_dir: {tmp_path / 'out'}\nsequence_len: 128\n"
            f"micro_batch_size: 4\nlearning_rate: 0.001\nlr_scheduler: cosine\nwarmup_steps: 0\nseed: 7\n"
            f"shuffle_merged_datasets: false\nlogging_steps: 1\nsave_steps: 1000\n"
            f"datasets:\n  - path: {path}\n    type: {type_}\n{extra}")


def our_logs(run):
    return [r for r in read_metrics(run.output_dir) if r["event"] == "log"]


def trl_args(tmp_path, **kw):
    return dict(output_dir=str(tmp_path / "trl"), learning_rate=1e-3, per_device_train_batch_size=4, max_steps=3,
                lr_scheduler_type="cosine", warmup_steps=0, seed=7, data_seed=7, max_length=128, logging_steps=1,
                report_to="none", use_cpu=True, bf16=False, optim="adamw_torch", save_strategy="no",
                disable_tqdm=True, **kw)


def trl_model_and_tokenizer(cfg):
    from transformers import AutoModelForCausalLM
    from peft import LoraConfig
    from ftlab.tokenizer import load_tokenizer, model_path
    import torch
    model = AutoModelForCausalLM.from_pretrained(model_path("ftlab:tiny"), dtype=torch.float32)
    return model, load_tokenizer(cfg), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                                  task_type="CAUSAL_LM")


def assert_same_logs(ours, theirs, keys):
    theirs = [h for h in theirs if "loss" in h]
    assert [r["step"] for r in ours] == [1, 2, 3] and len(theirs) == 3
    for o, t in zip(ours, theirs):
        assert "loss" in t and all((k in o) == (k in t) for k in keys)   # KTO logs rewards only for sides in the batch
        for k in (k for k in keys if k in t):
            assert o[k] == pytest.approx(t[k], rel=1e-4, abs=1e-6), (o["step"], k, o[k], t[k])
    assert ours[-1]["loss"] != pytest.approx(ours[0]["loss"])   # the steps really trained something


# --- the config mapping, step by step against TRL


@pytest.mark.parametrize("method,extra,trl_kw", [
    ("rl: dpo", "rl_beta: 0.2\n", dict(beta=0.2, loss_type=["sigmoid"])),
    ("rl: ipo", "rl_beta: 0.3\n", dict(beta=0.3, loss_type=["ipo"])),
    ("rl: dpo", "dpo_label_smoothing: 0.1\n", dict(loss_type=["robust"], label_smoothing=0.1)),
    ("rl: dpo", "rpo_alpha: 0.5\n", dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])),
])
def test_dpo_steps_equal_trl_built_by_hand(tmp_path, method, extra, trl_kw):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    data = rows("preference", 16)
    cfg = load_config(cfg_text(tmp_path, method, extra + "max_steps: 3\n"))
    run = Run(cfg, namespace={"rows": data}).train()
    model, tok, peft = trl_model_and_tokenizer(cfg)
    trainer = DPOTrainer(model=model, args=DPOConfig(**trl_args(tmp_path, **trl_kw)), train_dataset=Dataset.from_list(data),
                         processing_class=tok, peft_config=peft)
    trainer.train()
    assert_same_logs(our_logs(run), trainer.state.log_history, METRICS + ["rewards/accuracies"])


def test_kto_steps_equal_trl_built_by_hand(tmp_path):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer
    data = rows("kto", 16)
    cfg = load_config(cfg_text(tmp_path, "rl: kto", "rl_beta: 0.2\nkto_desirable_weight: 1.5\nmax_steps: 3\n"))
    run = Run(cfg, namespace={"rows": data}).train()
    # TRL reads the same rows as conversations (ftlab's chat_template makes text prompts user messages)
    conv = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "completion": [{"role": "assistant", "content": r["completion"]}], "label": r["label"]} for r in data]
    model, tok, peft = trl_model_and_tokenizer(cfg)
    trainer = KTOTrainer(model=model, args=KTOConfig(**trl_args(tmp_path, beta=0.2, desirable_weight=1.5)),
                         train_dataset=Dataset.from_list(conv), processing_class=tok, peft_config=peft)
    trainer.train()
    assert_same_logs(our_logs(run), trainer.state.log_history, ["loss", "kl", "rewards/chosen", "rewards/rejected"])


# --- reference models


def built_trainer(tmp_path, text, data):
    from ftlab.methods import get_method
    from ftlab.model import load_model
    run = Run(load_config(text), namespace={"rows": data})
    prepared = run.prepare()
    method = get_method(run.cfg)
    return method.build(run.cfg, method, load_model(run.cfg, run.tokenizer, method.head), run.tokenizer, prepared, [])


def test_reference_models(tmp_path):
    import torch
    data = rows("preference", 8)
    lora = built_trainer(tmp_path, cfg_text(tmp_path, "rl: dpo"), data)
    assert lora.ref_model is None                     # the adapter is switched off for the reference: no copy
    full = built_trainer(tmp_path, cfg_text(tmp_path, "rl: dpo").replace(LORA, ""), data)
    ref, policy = full.ref_model, full.model
    assert ref is not None and ref is not policy and not any(p.requires_grad for p in ref.parameters())
    for (n, a), (_, b) in zip(policy.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), n                    # a copy of the weights as they are before training
    orpo = built_trainer(tmp_path, cfg_text(tmp_path, "rl: orpo"), data)
    assert getattr(orpo, "ref_model", None) is None


# --- every method end to end, from the command line


METHODS = [("rl: dpo", "preference", "chat_template"), ("rl: ipo", "preference", "chat_template"),
           ("rl: kto", "kto", "chat_template"), ("rl: orpo", "preference", "chat_template"),
           ("rl: simpo", "preference", "chat_template"), ("reward_model: true", "preference", "bradley_terry.chat_template"),
           ("process_reward_model: true", "stepwise", "stepwise_supervised")]


@pytest.mark.parametrize("method,data,type_", METHODS, ids=[m[0] for m in METHODS])
def test_each_method_trains_from_the_command_line(tmp_path, capsys, method, data, type_):
    from ftlab.cli import main
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg_text(tmp_path, method, "val_set_size: 8\neval_steps: 2\n", f"ftlab:data/{data}.jsonl", type_))
    assert main(["train", str(path), "--max-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "step 2 · loss" in out and "done:" in out
    recs = read_metrics(tmp_path / "out")
    assert [r["step"] for r in recs if r["event"] == "log"] == [1, 2] and any(r["event"] == "eval" for r in recs)
    # the progress line's tokens per second, from the trainer's own count of the tokens where it keeps one
    if get_method(load_config(path)).counts_tokens:
        assert [r.get("tokens_per_second", 0) > 0 for r in recs if r["event"] == "log"][1:] == [True]


# --- data: what each kind of example holds


def test_pair_tokens_match_the_chat_template(tmp_path, tok):
    cfg = load_config(cfg_text(tmp_path, "rl: dpo", path="ftlab:data/preference.jsonl"))
    ex = prepare_datasets(cfg, tok).train[0]
    full = tok.decode(ex["prompt_ids"] + ex["chosen_ids"])
    assert tok.decode(ex["prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert full.startswith("<|im_start|>user\n") and tok.decode(ex["chosen_ids"]).endswith("<|im_end|>\n")


def test_kto_takes_pairs_split_in_two(tmp_path, tok):
    cfg = load_config(cfg_text(tmp_path, "rl: kto", path="ftlab:data/preference.jsonl"))
    train = prepare_datasets(cfg, tok).train
    assert len(train) == 800 and sum(train["label"]) == 400


def test_process_reward_labels_sit_only_on_step_ends(tmp_path, tok):
    data = rows("stepwise", 20)
    cfg = load_config(cfg_text(tmp_path, "process_reward_model: true", type_="stepwise_supervised"))
    train = prepare_datasets(cfg, tok, {"rows": data}).train
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    assert len(nl) == 1
    for ex, row in zip(train, data):
        at = [i for i, l in enumerate(ex["labels"]) if l != -100]
        assert len(at) == len(row["completions"])                         # one label per step ...
        assert all(ex["input_ids"][i] == nl[0] for i in at)               # ... on the separator closing it
        assert [ex["labels"][i] for i in at] == [int(b) for b in row["labels"]]
        # the text up to each labelled position ends with that step
        for i, step in zip(at, row["completions"]):
            assert tok.decode(ex["input_ids"][:i + 1]).endswith(step + "\n")
    last = load_config(cfg_text(tmp_path, "process_reward_model: true", type_="stepwise_supervised")
                       + "    train_on_last_step_only: true\n")
    ex = prepare_datasets(last, tok, {"rows": data}).train[0]
    assert sum(l != -100 for l in ex["labels"]) == 1


# --- bad input: one clear message each


def data_error(tmp_path, tok, method, data, **kw):
    cfg = load_config(cfg_text(tmp_path, method, **kw))
    with pytest.raises(DataError) as e:
        prepare_datasets(cfg, tok, {"rows": data}, use_cache=False)
    return str(e.value)


def test_kto_without_boolean_label(tmp_path, tok):
    msg = data_error(tmp_path, tok, "rl: kto", [{"prompt": "hi", "completion": "hello"}])
    assert "row 0" in msg and "no `label` column" in msg and "true" in msg
    msg = data_error(tmp_path, tok, "rl: kto", [{"prompt": "hi", "completion": "hello", "label": "yes"}])
    assert "row 0" in msg and "must be true or false, got 'yes'" in msg


def test_pair_with_an_empty_side(tmp_path, tok):
    data = rows("preference", 3)
    data[2]["rejected"] = [{"role": "assistant", "content": "  "}]
    msg = data_error(tmp_path, tok, "rl: dpo", data)
    assert "row 2" in msg and "`rejected` is empty" in msg


def test_prompt_longer_than_sequence_len(tmp_path, tok):
    data = rows("preference", 6)
    data[3]["prompt"] = [{"role": "user", "content": "What is 3 plus 4? " * 40}]
    prepared = prepare_datasets(load_config(cfg_text(tmp_path, "rl: dpo")), tok, {"rows": data}, use_cache=False)
    assert len(prepared.train) == 5
    (w,) = prepared.warnings()
    assert "@rows#3" in w and "prompt of `sequence_len` tokens or more" in w and "Raise `sequence_len`" in w
    msg = data_error(tmp_path, tok, "rl: dpo", [data[3]])
    assert "no row trains any token" in msg and "prompt of `sequence_len` tokens" in msg


def test_packing_and_formats_are_checked_against_the_method(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(cfg_text(tmp_path, "rl: dpo", "sample_packing: true\n"))
    assert "sample_packing cannot be used with `rl: dpo`" in str(e.value) and "set `sample_packing: false`" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(cfg_text(tmp_path, "rl: dpo", type_="alpaca"))
    p = e.value.problems[0]
    assert p.key == "datasets[0].type" and p.line == 20 and "preference pairs" in p.message and "chat_template" in p.fix
    with pytest.raises(ConfigError) as e:
        load_config(cfg_text(tmp_path, "rl: dpo", type_="{field_prompt: q, field_choosen: a}"))
    assert "field_choosen" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(cfg_text(tmp_path, "rl: dpo", type_="chatml.intel"))
    assert "axolotl prompt format" in str(e.value) and "chat_template:" in str(e.value)


def test_user_defined_field_mapping(tmp_path, tok):
    data = [{"q": "What is 2 plus 2?", "good": "4.", "bad": "5."}]
    t = "{field_prompt: q, field_chosen: good, field_rejected: bad, prompt_format: \"Q: {prompt}\\nA: \"}"
    ex = prepare_datasets(load_config(cfg_text(tmp_path, "rl: dpo", type_=t)), tok, {"rows": data}).train[0]
    assert tok.decode(ex["prompt_ids"] + ex["chosen_ids"]).endswith("Q: What is 2 plus 2?\nA: 4.<|im_end|>")
    assert tok.decode(ex["rejected_ids"]) == " 5.<|im_end|>"   # the space merged into the answer token, as in TRL


# --- every method end to end, in a notebook cell


@pytest.mark.parametrize("method,data,type_", METHODS, ids=[m[0] for m in METHODS])
def test_each_method_trains_in_a_finetune_cell(tmp_path, monkeypatch, method, data, type_):
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output
    import ftlab.dashboard as dash
    monkeypatch.setattr(dash, "in_notebook", lambda: True)
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "ftlab")
    body = cfg_text(tmp_path, method, "val_set_size: 8\neval_steps: 2\n", f"ftlab:data/{data}.jsonl", type_)
    with capture_output() as cap:
        shell.run_cell_magic("finetune", "--name pref_run --max-steps 2", body)
    run = shell.user_ns["pref_run"]
    assert run.state == "finished" and list(run.history["step"]) == [1, 2]
    charts = [o.data["application/vnd.plotly.v1+json"] for o in cap.outputs if "application/vnd.plotly.v1+json" in o.data]
    titles = {a.get("text", "").replace("<b>", "").replace("</b>", "") for a in charts[-1]["layout"].get("annotations", [])}
    from ftlab.methods import get_method
    assert {p.title for p in get_method(run.cfg).panels} <= titles   # the method's own panels are drawn
    assert "finished at step 2" in "\n".join(o.data.get("text/html", "") for o in cap.outputs)


def test_preprocess_debug_shows_pairs_and_labels(tmp_path, capsys):
    from ftlab.cli import main
    for method, data, type_, expect in [("rl: dpo", "preference", "chat_template", ["▸ chosen", "▸ rejected", "▸ prompt"]),
                                        ("rl: kto", "kto", "chat_template", ["desirable", "▸ completion"]),
                                        ("process_reward_model: true", "stepwise", "stepwise_supervised", ["[↵]✓"])]:
        path = tmp_path / "cfg.yaml"
        path.write_text(cfg_text(tmp_path, method, "", f"ftlab:data/{data}.jsonl", type_))
        assert main(["preprocess", str(path), "--debug", "--samples", "2"]) == 0
        out = capsys.readouterr().out
        assert all(e in out for e in expect), (method, out[-600:])


QLORA = "adapter: qlora\nload_in_4bit: true\nlora_r: 8\nlora_alpha: 16\nlora_target_linear: true\n"


@pytest.mark.parametrize("method,data,type_,adapter", [
    ("rl: dpo", "preference", "chat_template", "qlora"), ("rl: dpo", "preference", "chat_template", "full"),
    ("rl: kto", "kto", "chat_template", "full"), ("rl: orpo", "preference", "chat_template", "qlora"),
    ("rl: simpo", "preference", "chat_template", "full"),
    ("reward_model: true", "preference", "bradley_terry.chat_template", "qlora"),
    ("process_reward_model: true", "stepwise", "stepwise_supervised", "qlora"),
    ("process_reward_model: true", "stepwise", "stepwise_supervised", "full")])
def test_methods_with_qlora_and_full_fine_tuning(tmp_path, method, data, type_, adapter):
    text = cfg_text(tmp_path, method, "max_steps: 2\n", f"ftlab:data/{data}.jsonl", type_)
    text = text.replace(LORA, QLORA if adapter == "qlora" else "")
    run = Run(load_config(text)).train()
    assert run.state == "finished" and [r["step"] for r in our_logs(run)] == [1, 2]
    assert all(r["loss"] == r["loss"] for r in our_logs(run))          # finite, not NaN
    model = run.trainer.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if adapter == "qlora":
        assert any("lora_" in n for n in trainable) and all("lora_" in n or "score" in n for n in trainable)
        assert any("Linear4bit" in type(m).__name__ for m in model.modules())
    else:
        assert len(trainable) == len(list(model.parameters()))          # every weight trains
    if "reward" in method:
        assert any("score" in n for n in trainable)                      # the new head is trained


def test_reward_model_scores_survive_merge(tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification
    text = cfg_text(tmp_path, "reward_model: true", "max_steps: 3\n", "ftlab:data/preference.jsonl",
                    "bradley_terry.chat_template").replace("learning_rate: 0.001", "learning_rate: 0.005")
    Run(load_config(text)).train()
    run = Run.load(tmp_path / "out")
    answers = ["4 plus 4 is 8.", "I am not sure."]
    scores = run.score("What is 4 plus 4?", answers)
    assert len(scores) == 2 and scores[0] != scores[1]
    merged = AutoModelForSequenceClassification.from_pretrained(run.merge(tmp_path / "merged"))
    tok = run.tokenizer
    for answer, s in zip(answers, scores):
        ids = tok.apply_chat_template([{"role": "user", "content": "What is 4 plus 4?"}, {"role": "assistant", "content": answer}],
                                      tokenize=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            assert merged(input_ids=torch.tensor([ids])).logits[0, 0].item() == pytest.approx(s, abs=1e-4)
    from ftlab.errors import FtlabError
    with pytest.raises(FtlabError) as e:
        Run(load_config(cfg_text(tmp_path, "rl: dpo"))).score("q", ["a"])
    assert "needs a reward model" in str(e.value) and "run.chat" in str(e.value)
