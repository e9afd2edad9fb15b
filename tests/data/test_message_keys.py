"""chat_template keys, token by token: `eot_tokens` with `train_on_eot` beside `train_on_eos`, per-message `training` /
`weight` flags and character details, content given in parts, reasoning (`field_thinking`, `template_thinking_key`,
`split_thinking`), the system column (`field_system`), and roles the template does not know."""
import copy
import pytest
from ftlab.errors import FtlabError
from ftlab.chat_templates import resolve_chat_template
from ftlab.strategies import STRATEGIES, StrategyContext, IGNORE

CONV = [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 plus 3?"}, {"role": "assistant", "content": "6."}]
# each assistant turn ends with its own end-of-turn token and then the eos token, as Llama 3 base models write
# `<|eot_id|><|end_of_text|>`; a user turn ends with a newline
EOT_THEN_EOS = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content }}"
                "{% if m.role == 'assistant' %}{{ '<|eot|>' + eos_token }}{% else %}{{ '\n' }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def cfg():
    from ftlab.config import load_config
    return load_config("base_model: ftlab:tiny\nsequence_len: 512\ndatasets: [{path: ftlab:data/chat.jsonl, type: chat_template}]")


@pytest.fixture(scope="module")
def eot_tok(tok):
    t = copy.deepcopy(tok)
    t.add_special_tokens({"additional_special_tokens": ["<|eot|>"]}, replace_extra_special_tokens=False)
    t.chat_template = EOT_THEN_EOS
    return t


def run(tok, cfg, row, top=None, **ds):
    c = cfg.model_copy(update=top or {})
    ctx = StrategyContext(tok, cfg.datasets[0].model_copy(update=ds), c)
    (ex,) = STRATEGIES["chat_template"](row, ctx)
    return ex, ctx


def stretches(tok, ex):
    out, cur = [], []
    for i, l in zip(ex["input_ids"], ex["labels"]):
        if l != IGNORE: cur.append(i)
        elif cur: out.append(tok.decode(cur)); cur = []
    return out + ([tok.decode(cur)] if cur else [])


def trained(tok, cfg, row, top=None, **ds):
    return stretches(tok, run(tok, cfg, row, top, **ds)[0])


# ---- end of turn: eot_tokens, train_on_eot, train_on_eos ----

@pytest.mark.parametrize("ds, want", [
    ({}, ["4.<|eot|><|im_end|>", "6.<|eot|><|im_end|>"]),                            # both kinds: turn
    ({"train_on_eos": "none"}, ["4.", "6."]),                                        # train_on_eot follows train_on_eos
    ({"train_on_eos": "none", "train_on_eot": "turn"}, ["4.<|eot|>", "6.<|eot|>"]),
    ({"train_on_eot": "none"}, ["4.", "<|im_end|>", "6.", "<|im_end|>"]),            # eos only
    ({"train_on_eot": "last", "train_on_eos": "none"}, ["4.", "6.<|eot|>"]),
    ({"train_on_eot": "last"}, ["4.", "<|im_end|>", "6.<|eot|><|im_end|>"]),
])
def test_eot_and_eos(eot_tok, cfg, ds, want):
    assert trained(eot_tok, cfg, {"messages": CONV}, **ds) == want


def test_train_on_eot_all_counts_every_turn(tok, cfg):
    "ChatML ends every turn, user turns too, with <|im_end|>: `all` trains each of them."
    assert trained(tok, cfg, {"messages": CONV}, train_on_eot="all") == ["<|im_end|>", "4.<|im_end|>", "<|im_end|>", "6.<|im_end|>"]


def test_eot_tokens(eot_tok, cfg):
    "Listed eot_tokens decide which token ends a turn; an empty list leaves only the eos token."
    assert trained(eot_tok, cfg, {"messages": CONV}, {"eot_tokens": ["<|eot|>"]}, train_on_eos="none",
                   train_on_eot="turn") == ["4.<|eot|>", "6.<|eot|>"]
    assert trained(eot_tok, cfg, {"messages": CONV}, {"eot_tokens": []}, train_on_eos="turn",
                   train_on_eot="none") == ["4.", "<|im_end|>", "6.", "<|im_end|>"]
    # the user turn's newline is not listed: nothing ends it, even with `all`
    assert trained(eot_tok, cfg, {"messages": CONV}, {"eot_tokens": ["<|eot|>"]}, train_on_eos="none",
                   train_on_eot="all") == ["4.<|eot|>", "6.<|eot|>"]


def test_eot_tokens_mistakes(eot_tok, tok, cfg):
    with pytest.raises(FtlabError, match="`eot_tokens` lists `<|nope|>`, which this tokenizer cuts into") as e:
        run(eot_tok, cfg, {"messages": CONV}, {"eot_tokens": ["<|nope|>"]})
    assert e.value.problems[0].key == "eot_tokens" and "additional_special_tokens" in e.value.problems[0].fix
    with pytest.raises(FtlabError, match="lists the eos token `<\\|im_end\\|>`.*disagree"):
        run(tok, cfg, {"messages": CONV}, {"eot_tokens": ["<|im_end|>"]}, train_on_eos="turn", train_on_eot="none")
    _, ctx = run(tok, cfg, {"messages": CONV}, {"eot_tokens": ["<|im_end|>", "<|endoftext|>"]})
    assert ctx.notes == ["`eot_tokens` lists `<|endoftext|>`, which the chat template never writes: it marks no turn's end"]


def test_eot_tokens_in_the_config(make_cfg):
    cfg = make_cfg("eot_tokens: ['<|im_end|>']\n")
    assert cfg.eot_tokens == ["<|im_end|>"]


# ---- per-message training ----

def test_message_training_flag(tok, cfg):
    "`message_field_training` overrides the roles, both ways; numbers 0/1 (a `weight` field) work too."
    msgs = [{**m, "train": t} for m, t in zip(CONV, [True, False, None, True])]
    assert trained(tok, cfg, {"messages": msgs}, message_field_training="train") == [
        "What is 2 plus 2?<|im_end|>", "6.<|im_end|>"]
    msgs = [{**m, "weight": w} for m, w in zip(CONV, [0, 0, 0, 1])]
    assert trained(tok, cfg, {"messages": msgs}, message_field_training="weight", roles_to_train=[]) == ["6.<|im_end|>"]
    with pytest.raises(FtlabError, match="message 1: `train` is 'yes', not true/false"):
        run(tok, cfg, {"messages": [CONV[0], {**CONV[1], "train": "yes"}]}, message_field_training="train")


def _inside(tok, text, start, end):
    "The tokens of `text` lying wholly inside characters [start, end), decoded, as the expectation."
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return tok.decode([i for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]) if start <= s and e <= end and e > s])


def test_training_detail(tok, cfg):
    "axolotl's own example: only `very well` (characters 9 to 18, end included) of the answer is trained, and the turn's end."
    answer = "I'm doing very well, thank you!"
    detail = [{"begin_offset": 0, "end_offset": 8, "train": False}, {"begin_offset": 9, "end_offset": 18, "train": True},
              {"begin_offset": 19, "end_offset": 30, "train": False}]
    msgs = [CONV[0], {"role": "assistant", "content": answer, "detail": detail}]
    ex, _ = run(tok, cfg, {"messages": msgs}, message_field_training_detail="detail")
    text = tok.apply_chat_template(msgs, tokenize=False)
    start = text.index(answer)
    assert stretches(tok, ex) == [_inside(tok, text, start + 9, start + 19), "<|im_end|>"]
    assert stretches(tok, ex)[0].strip() == "very well"
    bad = [CONV[0], {"role": "assistant", "content": "short", "detail": [{"begin_offset": 2, "end_offset": 9}]}]
    with pytest.raises(FtlabError, match="message 1: training detail 0 \\(characters 2 to 9\\) lies outside the content"):
        run(tok, cfg, {"messages": bad}, message_field_training_detail="detail")


def test_content_parts(tok, cfg):
    parts = [{"type": "text", "text": "Let me think."}, {"type": "text", "text": " The answer is 4."}]
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is 2 plus 2?"}]}, {"role": "assistant", "content": parts}]
    assert trained(tok, cfg, {"messages": msgs}) == ["Let me think. The answer is 4.<|im_end|>"]   # joined, no flags
    msgs[1]["content"] = [{**parts[0], "train": False}, {**parts[1], "weight": 1}]
    assert trained(tok, cfg, {"messages": msgs}) == [" The answer is 4.<|im_end|>"]
    msgs[1]["content"] = [{"type": "image", "image": "cat.png"}, parts[1]]
    with pytest.raises(FtlabError, match="message 1: content part 0 is of type `image`"):
        run(tok, cfg, {"messages": msgs})


# ---- reasoning ----

@pytest.fixture(scope="module")
def qwen3(tok):
    t = copy.deepcopy(tok)
    t.chat_template = resolve_chat_template("qwen3")
    t.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]}, replace_extra_special_tokens=False)
    return t


def test_reasoning_field(qwen3, cfg):
    "The reasoning reaches the template, and is trained with the template's `</think>` up to the answer."
    msgs = [CONV[0], {"role": "assistant", "content": "4.", "reasoning_content": "2 and 2 make 4"}]
    text = qwen3.apply_chat_template(msgs, tokenize=False)
    assert "<think>\n2 and 2 make 4\n</think>\n\n4.<|im_end|>" in text
    assert trained(qwen3, cfg, {"messages": msgs}) == ["2 and 2 make 4\n</think>\n\n4.<|im_end|>"]
    renamed = [CONV[0], {"role": "assistant", "content": "4.", "thought": "2 and 2 make 4"}]
    assert trained(qwen3, cfg, {"messages": renamed}, field_thinking="thought") == ["2 and 2 make 4\n</think>\n\n4.<|im_end|>"]
    # a template that reads the reasoning under another name
    own = qwen3.chat_template.replace("reasoning_content", "thinking")
    t = copy.deepcopy(qwen3); t.chat_template = own
    assert trained(t, cfg, {"messages": renamed}, field_thinking="thought", template_thinking_key="thinking") == [
        "2 and 2 make 4\n</think>\n\n4.<|im_end|>"]


def test_split_thinking(qwen3, cfg):
    msgs = [CONV[0], {"role": "assistant", "content": "<think>2 and 2 make 4</think>\n\n4."}]
    assert trained(qwen3, cfg, {"messages": msgs}, split_thinking=True) == ["2 and 2 make 4\n</think>\n\n4.<|im_end|>"]
    with_parts = [CONV[0], {"role": "assistant", "content": "4.",
                            "reasoning_content": [{"type": "text", "text": "2 and 2 make 5.", "train": False},
                                                  {"type": "text", "text": " No: 4.", "train": True}]}]
    assert trained(qwen3, cfg, {"messages": with_parts}) == [" No: 4.", "4.<|im_end|>"]


# ---- the system column, and roles ----

def test_system_column(tok, cfg):
    ex, _ = run(tok, cfg, {"system": "Be brief.", "messages": CONV})
    assert tok.decode(ex["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert stretches(tok, ex) == ["4.<|im_end|>", "6.<|im_end|>"]
    ex, _ = run(tok, cfg, {"sys": "Be kind.", "messages": CONV}, field_system="sys")
    assert tok.decode(ex["input_ids"]).startswith("<|im_start|>system\nBe kind.<|im_end|>")
    ex, _ = run(tok, cfg, {"system": "Unused.", "messages": [{"role": "system", "content": "Own."}] + CONV})
    assert "Unused." not in tok.decode(ex["input_ids"])     # the conversation's own system message is kept


def test_roles_to_train_reads_role_names(tok, cfg):
    "`roles_to_train` names roles as the data does or as the template does; both mean the same turns."
    rows = [{"role": {"user": "human", "assistant": "gpt"}[m["role"]], "content": m["content"]} for m in CONV]
    assert trained(tok, cfg, {"messages": rows}, roles_to_train=["gpt"]) == trained(tok, cfg, {"messages": CONV}) \
        == ["4.<|im_end|>", "6.<|im_end|>"]
    assert trained(tok, cfg, {"messages": rows}, roles_to_train=[]) == []


def test_unknown_role_is_said(make_cfg):
    from ftlab import Run
    rows = [{"messages": CONV}, {"messages": [CONV[0], {"role": "robot", "content": "Beep."}, *CONV[1:]]}]
    run = Run(make_cfg(datasets="  - path: '@rows'\n    type: chat_template\n"), namespace={"rows": rows})
    prepared = run.prepare()
    (w,) = [w for w in prepared.warnings() if "roles the chat template does not know" in w]
    assert "@rows#1 (robot)" in w and "roles: {assistant: [robot]}" in w
    ex = [e for e in prepared.train if e["row"] == 1][0]
    assert stretches(run.tokenizer, ex) == ["4.<|im_end|>", "6.<|im_end|>"]    # rendered, not trained
    mapped = Run(make_cfg(datasets="  - path: '@rows'\n    type: chat_template\n    roles: {assistant: [robot]}\n"),
                 namespace={"rows": rows}).prepare()
    assert not any("does not know" in w for w in mapped.warnings())
