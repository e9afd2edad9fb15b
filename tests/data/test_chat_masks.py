"""chat_template label masks, token by token, on three template shapes, against the templates' own `{% generation %}` masks.

Each shape is written twice: once with `{% generation %}` around exactly the tokens a setting should train (the
oracle: `apply_chat_template(..., return_assistant_tokens_mask=True)` gives the expected mask), once plain. ftlab's
mask on either must equal the oracle's, token for token: the spans are located the same way with or without
generation markers.
"""
import copy, json
import pytest
from ftlab.strategies import STRATEGIES, StrategyContext, IGNORE
from ftlab.assets import embedded_path

ASSISTANT = "m.role == 'assistant'"
LAST_ASSISTANT = "m.role == 'assistant' and loop.index0 == ns.last"
PRELUDE = ("{%- set ns = namespace(last=-1) %}{%- for m in messages %}{%- if m.role == 'assistant' %}"
           "{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}")


def part(expr: str, cond: str | None) -> str:
    "`expr` written out, inside `{% generation %}` where the Jinja condition `cond` holds."
    if cond is None: return "{{- " + expr + " }}"
    return ("{%- if " + cond + " %}{%- generation %}{{- " + expr + " }}{%- endgeneration %}"
            "{%- else %}{{- " + expr + " }}{%- endif %}")


def chatml(content=ASSISTANT, end=ASSISTANT):
    "ChatML, as the tiny model's own template: every turn closes with <|im_end|>."
    return (PRELUDE + "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' }}" + part("m.content", content)
            + part("'<|im_end|>'", end) + "{{- '\\n' }}{%- endfor %}")


def mistral(content=ASSISTANT, end=ASSISTANT):
    "Mistral / Llama 2: `[INST] question [/INST]answer</s>`; a user turn has no closing token of its own."
    return (PRELUDE + "{{- bos_token }}{%- for m in messages %}{%- if m.role == 'user' %}{{- '[INST] ' }}"
            + part("m.content", content) + "{{- ' [/INST]' }}{%- elif m.role == 'assistant' %}"
            + part("m.content", content) + part("eos_token", end) + "{%- else %}"
            + part("m.content", content) + "{{- '\\n\\n' }}{%- endif %}{%- endfor %}")


def open_turns(content=ASSISTANT, end=ASSISTANT):
    "Turns opened by <|im_start|>, only the assistant's closed by <|im_end|>: after a user turn comes the next opening."
    return (PRELUDE + "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' }}" + part("m.content", content)
            + "{%- if m.role == 'assistant' %}" + part("'<|im_end|>'", end) + "{%- endif %}{{- '\\n' }}{%- endfor %}")


SHAPES = {"chatml": chatml, "mistral": mistral, "open": open_turns}
SHORT = ["d", "e", "n", "m", "i", "_", "|", ">", "<", "end", "im", "im_end"]
SPACES = [" hi ", "\nhi\n", "hi\n\n", "\thi", "  two  spaces  "]
EMPTY = ["", " ", "\n", " \n\t"]


def conv(answer, system=True):
    msgs = [{"role": "system", "content": "Be brief."}] if system else []
    return msgs + [{"role": "user", "content": "Say it"}, {"role": "assistant", "content": answer},
                   {"role": "user", "content": "Again"}, {"role": "assistant", "content": "ok"}]


def with_template(tok, text):
    t = copy.deepcopy(tok)
    t.chat_template = text
    return t


def mask_of(tok, cfg, ds, messages):
    (ex,) = STRATEGIES["chat_template"]({"messages": messages}, StrategyContext(tok, ds, cfg))
    return ex["input_ids"], [int(l != IGNORE) for l in ex["labels"]], ex


def oracle(tok, template, messages):
    ref = with_template(tok, template).apply_chat_template(messages, tokenize=True, return_dict=True,
                                                           return_assistant_tokens_mask=True)
    return ref["input_ids"], ref["assistant_masks"]


def check(tok, cfg, ds, shape, messages, content=ASSISTANT, end=ASSISTANT):
    "ftlab's mask on the plain and on the default-marked template equals the oracle template's mask, token for token."
    ids, want = oracle(tok, shape(content, end), messages)
    for template in (shape(None, None), shape()):
        got_ids, got, ex = mask_of(with_template(tok, template), cfg, ds, messages)
        assert got_ids == ids
        assert got == want, show(tok, ids, got, want)
    return ids, want, ex


def show(tok, ids, got, want):
    return " ".join(f"{'+' if g else '.'}{'!' if g != w else ''}{tok.decode([i])!r}" for i, g, w in zip(ids, got, want))


def trained_pieces(tok, ids, mask):
    return [tok.decode([i]) for i, m in zip(ids, mask) if m]


@pytest.fixture
def cfg(make_cfg):
    return make_cfg().model_copy(update={"sequence_len": 1024})


# ── the answer is found where the template put it ─────────────────────────────────────────────────────────────

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("answer", SHORT)
def test_short_answer_that_occurs_in_the_closing_marker(tok, cfg, shape, answer):
    messages = conv(answer, system=shape != "mistral")
    ids, want, _ = check(tok, cfg, cfg.datasets[0], SHAPES[shape], messages)
    eos = tok.eos_token
    assert "".join(trained_pieces(tok, ids, want)) == answer + eos + "ok" + eos
    # nothing of the next turn's opening is trained
    assert not any(m for i, m in zip(ids, want) if i == tok.convert_tokens_to_ids("<|im_start|>"))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("answer", SPACES)
def test_whitespace_around_the_answer_is_trained_as_written(tok, cfg, shape, answer):
    ids, want, _ = check(tok, cfg, cfg.datasets[0], SHAPES[shape], conv(answer, system=shape != "mistral"))
    assert "".join(trained_pieces(tok, ids, want)) == answer + tok.eos_token + "ok" + tok.eos_token


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("answer", EMPTY)
def test_empty_answer_trains_its_own_end_token_only(tok, cfg, shape, answer):
    messages = conv(answer, system=shape != "mistral")
    ids, want, ex = check(tok, cfg, cfg.datasets[0], SHAPES[shape], messages)
    assert "".join(trained_pieces(tok, ids, want)) == answer + tok.eos_token + "ok" + tok.eos_token
    # the token trained first is the empty answer's own content or end token, never the end of the turn before it
    first = want.index(1)
    before = tok.decode(ids[:first])
    assert before.endswith("[/INST]" if shape == "mistral" else "<|im_start|>assistant\n")
    assert ex["eot_trained"] is True


# ── train_on_inputs, roles_to_train and train_on_eos, as axolotl reads them ───────────────────────────────────

SETTINGS = {  # name: (dataset keys, train_on_inputs, content condition, end condition)
    "default": ({}, False, ASSISTANT, ASSISTANT),
    "eos_turn": ({"train_on_eos": "turn"}, False, ASSISTANT, ASSISTANT),
    "eos_last": ({"train_on_eos": "last"}, False, ASSISTANT, LAST_ASSISTANT),
    "eos_all": ({"train_on_eos": "all"}, False, ASSISTANT, "true"),
    "eos_none": ({"train_on_eos": "none"}, False, ASSISTANT, None),
    "eot_overrides_eos": ({"train_on_eos": "none", "train_on_eot": "last"}, False, ASSISTANT, LAST_ASSISTANT),
    "roles_user": ({"roles_to_train": ["user"]}, False, "m.role == 'user'", "m.role == 'user'"),
    "roles_alias": ({"roles_to_train": ["gpt"]}, False, ASSISTANT, ASSISTANT),
    "roles_none": ({"roles_to_train": [], "train_on_eos": "all"}, False, None, "true"),
    "inputs": ({}, True, "true", "true"),
    "inputs_eos_last": ({"train_on_eos": "last"}, True, "true", "loop.last"),
    "inputs_eos_none": ({"train_on_eos": "none"}, True, "true", None),
}


def rows_for(shape):
    rows = [conv(a, system=shape != "mistral") for a in SHORT[:3] + SPACES[:2] + EMPTY[:2]]
    rows.append([{"role": "user", "content": "assistant"}, {"role": "assistant", "content": "user"}])
    return rows


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("setting", SETTINGS)
def test_settings_train_what_axolotl_trains(tok, cfg, shape, setting):
    keys, inputs, content, end = SETTINGS[setting]
    ds = cfg.datasets[0].model_copy(update=keys)
    c = cfg.model_copy(update={"train_on_inputs": inputs})
    for messages in rows_for(shape):
        check(tok, c, ds, SHAPES[shape], messages, content, end)


def test_train_on_inputs_trains_each_turn_not_the_template(tok, cfg):
    ids, want, ex = check(tok, cfg.model_copy(update={"train_on_inputs": True}), cfg.datasets[0], chatml,
                          conv("5."), "true", "true")
    runs = tok.decode([i if m else tok.pad_token_id for i, m in zip(ids, want)]).split("<|pad|>")
    assert [r for r in runs if r] == ["Be brief.<|im_end|>", "Say it<|im_end|>", "5.<|im_end|>", "Again<|im_end|>",
                                      "ok<|im_end|>"]
    assert ex["eot_trained"] is True


def test_user_turn_without_closing_marker_trains_no_opening_token(tok, cfg):
    ds = cfg.datasets[0].model_copy(update={"roles_to_train": ["user"], "train_on_eos": "all"})
    ids, want, _ = check(tok, cfg, ds, open_turns, conv("5."), "m.role == 'user'", "true")
    assert "".join(trained_pieces(tok, ids, want)) == "Say it<|im_end|>Again<|im_end|>"


# ── agreement with the template's own assistant mask on every embedded row ────────────────────────────────────

@pytest.mark.parametrize("shape", SHAPES)
def test_agrees_with_generation_mask_on_every_embedded_row(tok, cfg, shape):
    rows = [json.loads(l)["messages"] for l in embedded_path("ftlab:data/chat.jsonl").read_text().splitlines()]
    t = with_template(tok, SHAPES[shape]())
    for k, messages in enumerate(rows):
        if shape == "mistral": messages = [m for m in messages if m["role"] != "system"]
        ids, want = oracle(tok, SHAPES[shape](), messages)
        got_ids, got, _ = mask_of(t, cfg, cfg.datasets[0], messages)
        assert (got_ids, got) == (ids, want), k
