"""Label masks, token by token, for every dataset strategy."""
import json, sys, textwrap
import pytest
from ftlab.strategies import STRATEGIES, StrategyContext, IGNORE
from ftlab.prepare import prepare_datasets, tokenize_dataset
from ftlab.masks import MaskReport
from ftlab.errors import DataError
from ftlab.assets import embedded_path


def trained_text(tok, ex):
    return tok.decode([i for i, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE])


def runs(ex):
    "Maximal runs of trained tokens, as lists of ids."
    out, cur = [], []
    for i, l in zip(ex["input_ids"], ex["labels"]):
        if l != IGNORE: cur.append(i)
        elif cur: out.append(cur); cur = []
    return out + ([cur] if cur else [])


def one(name, row, cfg, tok, ds=None):
    (ex,) = STRATEGIES[name](row, StrategyContext(tok, ds or cfg.datasets[0], cfg))
    return ex


CONV = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "5."}, {"role": "user", "content": "Say hello"},
        {"role": "assistant", "content": "hello"}]


# ── chat_template ──────────────────────────────────────────────────────────────────────────────────────────────

def test_chat_only_assistant_content_and_eot_trained(make_cfg, tok):
    cfg = make_cfg()
    ex = one("chat_template", {"messages": CONV}, cfg, tok)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert [tok.decode(r) for r in runs(ex)] == ["5.<|im_end|>", "hello<|im_end|>"]
    # Labels equal the ids where trained; nothing else (system, user, role headers, newlines) is trained.
    assert all(l in (IGNORE, i) for i, l in zip(ex["input_ids"], ex["labels"]))
    assert sum(l == end for l in ex["labels"]) == 2 and ex["eot_trained"] is True


def test_chat_mask_matches_generation_markers_on_whole_dataset(make_cfg, tok):
    """Offsets-based masks agree with the template's {% generation %} mask on every row of chat.jsonl."""
    cfg = make_cfg().model_copy(update={"sequence_len": 1024})
    rows = [json.loads(l) for l in embedded_path("ftlab:data/chat.jsonl").read_text().splitlines()]
    for k, row in enumerate(rows):
        ex = one("chat_template", row, cfg, tok)
        ref = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert ex["input_ids"] == ref["input_ids"], k
        assert [int(l != IGNORE) for l in ex["labels"]] == ref["assistant_masks"], k


def test_content_equal_to_role_name_is_found_in_content_not_header(make_cfg, tok):
    cfg = make_cfg()
    ex = one("chat_template", {"messages": [{"role": "user", "content": "assistant"},
                                            {"role": "assistant", "content": "user"}]}, cfg, tok)
    assert trained_text(tok, ex) == "user<|im_end|>"


@pytest.mark.parametrize("mode,expected", [
    ("turn", ["5.<|im_end|>", "hello<|im_end|>"]),
    ("last", ["5.", "hello<|im_end|>"]),
    ("none", ["5.", "hello"]),
])
def test_train_on_eos_modes(make_cfg, tok, mode, expected):
    cfg = make_cfg(datasets=f"  - path: ftlab:data/chat.jsonl\n    type: chat_template\n    train_on_eos: {mode}\n")
    ex = one("chat_template", {"messages": CONV}, cfg, tok)
    assert [tok.decode(r) for r in runs(ex)] == expected
    assert ex["eot_trained"] is (mode != "none")


def test_train_on_eos_all_trains_every_turn_end(make_cfg, tok):
    cfg = make_cfg(datasets="  - path: ftlab:data/chat.jsonl\n    type: chat_template\n    train_on_eos: all\n")
    ex = one("chat_template", {"messages": CONV}, cfg, tok)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert sum(l == end for l in ex["labels"]) == 5  # system, 2 user, 2 assistant turns


def test_roles_to_train(make_cfg, tok):
    cfg = make_cfg(datasets="  - path: ftlab:data/chat.jsonl\n    type: chat_template\n    roles_to_train: [user]\n")
    ex = one("chat_template", {"messages": CONV}, cfg, tok)
    assert [tok.decode(r) for r in runs(ex)] == ["What is 2 plus 3?<|im_end|>", "Say hello<|im_end|>"]


def test_train_on_inputs_trains_every_turn_but_not_the_template(make_cfg, tok):
    """axolotl's meaning: every turn is trained (content and end token), the role headers are not."""
    cfg = make_cfg(extra="train_on_inputs: true\n")
    ex = one("chat_template", {"messages": CONV}, cfg, tok)
    assert [tok.decode(r) for r in runs(ex)] == [m["content"] + "<|im_end|>" for m in CONV]
    assert "<|im_start|>" not in trained_text(tok, ex) and ex["eot_trained"] is True


def test_sharegpt_field_mapping(make_cfg, tok):
    cfg = make_cfg(datasets=("  - path: ftlab:data/sharegpt.jsonl\n    type: chat_template\n    field_messages: conversations\n"
                             "    message_property_mappings:\n      role: from\n      content: value\n"))
    row = {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello friend"}]}
    ex = one("chat_template", row, cfg, tok)
    assert trained_text(tok, ex) == "Hello friend<|im_end|>"
    assert "<|im_start|>user\nHi there" in tok.decode(ex["input_ids"])


def test_truncation_inside_response_is_flagged(make_cfg, tok):
    cfg = make_cfg().model_copy(update={"sequence_len": 12})
    ex = one("chat_template", {"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "one two three four five six seven"}]}, cfg, tok)
    assert len(ex["input_ids"]) == 12 and ex["truncated"] is True


def test_template_without_special_end_token_warns(make_cfg, tok):
    """With the llama3 template the tiny vocabulary has no <|eot_id|> special token: the end of turn cannot be trained."""
    cfg = make_cfg(extra="chat_template: llama3\n")
    from ftlab.tokenizer import load_tokenizer
    t3 = load_tokenizer(cfg)
    report = MaskReport()
    tokenize_dataset(cfg.datasets[0], cfg, t3, report=report)
    assert report.eot_untrained == [f"ftlab:data/chat.jsonl#{i}" for i in range(report.rows)]
    assert report.eot_untrained and any("will not learn to stop" in w for w in report.warnings())


# ── alpaca, input_output, completion ───────────────────────────────────────────────────────────────────────────

def test_alpaca_trains_output_and_eos(make_cfg, tok):
    cfg = make_cfg(datasets="  - path: ftlab:data/alpaca.jsonl\n    type: alpaca\n")
    for row in [{"instruction": "Add the numbers", "input": "2 and 2", "output": "4"},
                {"instruction": "Greet me", "input": "", "output": "Hello!"}]:
        ex = one("alpaca", row, cfg, tok)
        assert trained_text(tok, ex) == row["output"] + tok.eos_token
        assert ("### Input:" in tok.decode(ex["input_ids"])) == bool(row["input"])


def test_alpaca_train_on_inputs(make_cfg, tok):
    cfg = make_cfg(extra="train_on_inputs: true\n", datasets="  - path: ftlab:data/alpaca.jsonl\n    type: alpaca\n")
    ex = one("alpaca", {"instruction": "Greet me", "output": "Hi"}, cfg, tok)
    assert ex["labels"] == ex["input_ids"]


def test_input_output_segments(make_cfg, tok):
    cfg = make_cfg(datasets="  - path: ftlab:data/input_output.jsonl\n    type: input_output\n")
    row = {"segments": [{"text": "Q: 2+2?\n", "label": False}, {"text": "A: 4", "label": True},
                        {"text": "\n(end)", "label": False}, {"text": "<|im_end|>", "label": True}]}
    ex = one("input_output", row, cfg, tok)
    assert tok.decode(ex["input_ids"]) == "Q: 2+2?\nA: 4\n(end)<|im_end|>"
    assert [tok.decode(r) for r in runs(ex)] == ["A: 4", "<|im_end|>"] and ex["eot_trained"] is True
    ex2 = one("input_output", {"segments": row["segments"][:2]}, cfg, tok)
    assert ex2["eot_trained"] is False


def test_input_output_train_on_inputs_trains_every_segment(make_cfg, tok):
    """As in axolotl: with `train_on_inputs: true` a segment's `label: false` no longer masks it."""
    cfg = make_cfg(extra="train_on_inputs: true\n", datasets="  - path: ftlab:data/input_output.jsonl\n    type: input_output\n")
    row = {"segments": [{"text": "Q: 2+2?\n", "label": False}, {"text": "A: 4", "label": True},
                        {"text": "<|im_end|>", "label": False}]}
    ex = one("input_output", row, cfg, tok)
    assert ex["labels"] == ex["input_ids"] and ex["eot_trained"] is True


@pytest.mark.parametrize("output", ["Hello<|im_end|>", "<|im_end|>"])
def test_alpaca_output_ending_with_eos_gets_no_second_one(make_cfg, tok, output):
    cfg = make_cfg(datasets="  - path: ftlab:data/alpaca.jsonl\n    type: alpaca\n")
    ex = one("alpaca", {"instruction": "Greet me", "output": output}, cfg, tok)
    assert ex["input_ids"][-2:] != [tok.eos_token_id] * 2 and ex["input_ids"][-1] == tok.eos_token_id
    assert trained_text(tok, ex) == output


def test_completion_text_ending_with_eos_gets_no_second_one(make_cfg, tok):
    cfg = make_cfg(datasets="  - path: ftlab:data/completion.jsonl\n    type: completion\n")
    ex = one("completion", {"text": "The end.<|im_end|>"}, cfg, tok)
    assert ex["input_ids"] == tok("The end.<|im_end|>")["input_ids"] and ex["labels"] == ex["input_ids"]


def test_completion_splits_long_text(make_cfg, tok):
    cfg = make_cfg(datasets="  - path: ftlab:data/completion.jsonl\n    type: completion\n").model_copy(update={"sequence_len": 32})
    text = " ".join(f"word{i}" for i in range(200))
    exs = STRATEGIES["completion"]({"text": text}, StrategyContext(tok, cfg.datasets[0], cfg))
    assert len(exs) > 2 and all(len(e["input_ids"]) <= 32 and e["labels"] == e["input_ids"] for e in exs)
    ids = [i for e in exs for i in e["input_ids"]]
    assert ids == tok(text, add_special_tokens=True)["input_ids"] + [tok.eos_token_id]


# ── custom transforms ──────────────────────────────────────────────────────────────────────────────────────────

def test_custom_transform_import_path(make_cfg, tok, tmp_path, monkeypatch):
    (tmp_path / "mytransforms.py").write_text(textwrap.dedent("""
        def qa(cfg, **kwargs):
            def map_fn(row, tokenizer=None):
                return {"messages": [{"role": "user", "content": row["q"]}, {"role": "assistant", "content": row["a"]}]}
            return map_fn, {"remove_columns": "__all__"}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [{"q": "Capital of France?", "a": "Paris"}, {"q": "2+2?", "a": "4"}]
    cfg = make_cfg(datasets="  - path: '@rows'\n    type: mytransforms.qa\n")
    exs = tokenize_dataset(cfg.datasets[0], cfg, tok, {"rows": rows})
    assert [trained_text(tok, e) for e in exs] == ["Paris<|im_end|>", "4<|im_end|>"]


def test_custom_transform_from_notebook_namespace(make_cfg, tok):
    def to_text(cfg):
        return (lambda row, tokenizer=None: {"text": row["body"].upper()}), {"remove_columns": ["body"]}
    cfg = make_cfg(datasets="  - path: '@rows'\n    type: '@to_text'\n")
    exs = tokenize_dataset(cfg.datasets[0], cfg, tok, {"rows": [{"body": "abc"}], "to_text": to_text})
    assert tok.decode(exs[0]["input_ids"]).startswith("ABC") and exs[0]["labels"] == exs[0]["input_ids"]


def test_transform_returning_wrong_shape_is_named(make_cfg, tok):
    cfg = make_cfg(datasets="  - path: '@rows'\n    type: '@bad'\n")
    with pytest.raises(Exception) as e:
        tokenize_dataset(cfg.datasets[0], cfg, tok, {"rows": [{"a": 1}], "bad": lambda cfg: 42})
    assert "(map_fn, kwargs)" in str(e.value)


# ── preparation: dropped rows, warnings, bad rows ──────────────────────────────────────────────────────────────

def test_rows_training_nothing_are_dropped_with_warning(make_cfg, tok):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "only a question"}]}]
    cfg = make_cfg(datasets="  - path: '@rows'\n    type: chat_template\n")
    p = prepare_datasets(cfg, tok, {"rows": rows}, use_cache=False)
    assert len(p.train) == 1 and p.report.no_trained == ["@rows#1"]
    assert "train no token" in p.warnings()[0]


def test_bad_row_names_dataset_and_index(make_cfg, tok):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"speaker": "user", "text": "hi"}]}]
    cfg = make_cfg(datasets="  - path: '@rows'\n    type: chat_template\n")
    with pytest.raises(DataError) as e:
        prepare_datasets(cfg, tok, {"rows": rows}, use_cache=False)
    msg = str(e.value)
    assert "@rows" in msg and "row 1" in msg and "message_property_mappings" in msg
