"""Every chat template name axolotl's configs use, on the tiny tokenizer: its turn markers, its generation prompt, and
ftlab's label mask, token by token, against a mask built from the markers alone (and, where the template has
`{% generation %}` blocks, against the template's own assistant mask).

The tiny tokenizer knows ChatML's markers only; each template's other markers (`<|eot_id|>`, `[INST]`, ...) are added
as special tokens first, as a model of that family has them.
"""
import copy
import pytest
from ftlab.chat_templates import axolotl_template_names, resolve_chat_template, template_markers, split_markers
from ftlab.errors import FtlabError
from ftlab.strategies import STRATEGIES, StrategyContext, IGNORE

EOS = "<|im_end|>"   # the tiny tokenizer's eos, which templates that write `eos_token` end their turns with
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 plus 3?"},
        {"role": "assistant", "content": "6."}]
COHERE = ("<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>", "<|END_OF_TURN_TOKEN|>")
COMMAND_A = ("<|CHATBOT_TOKEN|><|START_RESPONSE|>", "<|END_RESPONSE|>")
CHATML = ("<|im_start|>assistant\n", "<|im_end|>")
GEMMA = ("<start_of_turn>model\n", "<end_of_turn>")
LLAMA3 = ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>")
PHI3 = ("<|assistant|>\n", "<|end|>")
# name: (what the template writes right before an assistant's content, the end-of-turn token after it; None: none)
TURNS = {
    "alpaca": ("### Response:\n", EOS), "aya": COHERE, "cohere": COHERE, "chatml": CHATML,
    "command_a": COMMAND_A, "command_a_rag": COMMAND_A, "command_a_tool_use": COMMAND_A,
    "deepseek_v2": ("<｜Assistant｜>", EOS), "deepseek_v3": ("<｜Assistant｜>", "<｜end▁of▁sentence｜>"),
    "exaone": ("[|assistant|]", "[|endofturn|]"), "exaone4": ("[|assistant|]\n<think>\n\n</think>\n\n", "[|endofturn|]"),
    "falcon_h1": CHATML, "gemma": GEMMA, "gemma3": GEMMA, "gemma3n": GEMMA,
    "gemma4": ("<|turn>model\n", "<turn|>"), "gemma4_unified": ("<|turn>model\n", "<turn|>"),
    "jamba": ("<|bom|><|assistant|> ", "<|eom|>"), "llama3": LLAMA3, "llama3_2_vision": LLAMA3,
    "llama4": ("<|header_start|>assistant<|header_end|>\n\n", "<|eot|>"), "llava": ("ASSISTANT: ", None),
    "metharme": ("<|model|>", None), "mistral_v1": (" [/INST] ", EOS), "mistral_v2v3": ("[/INST] ", EOS),
    "mistral_v3_tekken": ("[/INST]", EOS), "mistral_v7_tekken": ("[/INST]", EOS), "pixtral": ("[/INST]", EOS),
    "nemotron_h": CHATML, "phi_3": PHI3, "phi_35": PHI3, "phi_4": ("<|im_start|>assistant<|im_sep|>", "<|im_end|>"),
    "qwen2_vl": CHATML, "qwen3": CHATML, "qwen3_5": CHATML, "qwen_25": CHATML,
}
# what `add_generation_prompt` ends with, where it is not the header above
GENERATION = {"command_a_rag": "<|CHATBOT_TOKEN|>", "command_a_tool_use": "<|CHATBOT_TOKEN|>",
              "gemma4": "<|turn>model\n<|channel>thought\n<channel|>", "gemma4_unified": "<|turn>model\n<|channel>thought\n<channel|>",
              "mistral_v1": " [/INST]", "mistral_v2v3": "[/INST]", "qwen3": "<|im_start|>assistant\n<think>\n\n",
              "qwen3_5": "<|im_start|>assistant\n<think>\n\n"}
NO_SYSTEM = {"gemma"}                    # refuses a system message
LAST_END = {"metharme": EOS}             # ends only the conversation, after its last turn


def test_every_axolotl_name_is_covered():
    assert set(axolotl_template_names()) == set(TURNS)


@pytest.fixture(scope="module")
def cfg():
    from ftlab.config import load_config
    return load_config("base_model: ftlab:tiny\nsequence_len: 4096\ndatasets: [{path: ftlab:data/chat.jsonl, type: chat_template}]")


def family(tok, name):
    "The tiny tokenizer with template `name` and that template's markers as special tokens."
    text = resolve_chat_template(name)
    t = copy.deepcopy(tok)
    t.chat_template = text
    t.add_special_tokens({"additional_special_tokens": template_markers(text)}, replace_extra_special_tokens=False)
    assert split_markers(t, text) == {}
    return t


def expected_mask(tok, text, ids, offsets, name):
    "Trained tokens from the markers alone: those overlapping each answer, and the end token right after it."
    header, end = TURNS[name]
    last = LAST_END.get(name, end)
    want = [0] * len(ids)
    spans = [(text.index(header + "4.") + len(header), end), (text.rindex("6." + (last or "")), last)]
    for a, close in spans:
        for t, (s, e) in enumerate(offsets):
            if e > a and s < a + 2: want[t] = 1
            if close and s == a + 2 and text[s:e] == close: want[t] = 1
    return want


@pytest.mark.parametrize("name", sorted(TURNS))
def test_template(tok, cfg, name):
    t = family(tok, name)
    conv = CONV[1:] if name in NO_SYSTEM else CONV
    text = t.apply_chat_template(conv, tokenize=False)
    header, end = TURNS[name]
    assert header + "4." + (end or "") in text and "6." + (LAST_END.get(name, end) or "") in text
    prompt = t.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(GENERATION.get(name, header.rstrip(" ") if name in ("jamba", "llava") else header))
    (ex,) = STRATEGIES["chat_template"]({"messages": conv}, StrategyContext(t, cfg.datasets[0], cfg))
    enc = t(text, add_special_tokens=False, return_offsets_mapping=True)
    assert ex["input_ids"] == enc["input_ids"]
    got = [int(l != IGNORE) for l in ex["labels"]]
    assert got == expected_mask(t, text, enc["input_ids"], enc["offset_mapping"], name)
    assert ex["eot_trained"] is (LAST_END.get(name, end) is not None)


@pytest.mark.parametrize("name", ["chatml", "phi_4", "llava"])
def test_generation_blocks(tok, cfg, name):
    "Templates with `{% generation %}`: ftlab's mask is the template's own, except llava's, whose block holds the space after the answer."
    t = family(tok, name)
    ref = t.apply_chat_template(CONV, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    (ex,) = STRATEGIES["chat_template"]({"messages": CONV}, StrategyContext(t, cfg.datasets[0], cfg))
    got = [int(l != IGNORE) for l in ex["labels"]]
    assert ex["input_ids"] == ref["input_ids"]
    if name != "llava":
        assert got == ref["assistant_masks"]
    else:   # the template's block also marks the token holding the space it writes after the answer; ftlab does not
        extra = [i for i, (g, r) in enumerate(zip(got, ref["assistant_masks"])) if g != r]
        assert all(ref["assistant_masks"][i] and not got[i] for i in extra) and len(extra) <= 2
        assert all(t.decode([ex["input_ids"][i]]).startswith(" ") for i in extra)


def test_template_that_refuses_a_role_says_so(tok, cfg):
    t = family(tok, "gemma")
    with pytest.raises(FtlabError, match="refused this conversation.*System role not supported") as e:
        STRATEGIES["chat_template"]({"messages": CONV}, StrategyContext(t, cfg.datasets[0], cfg))
    assert "drop_system_message" in str(e.value)
    ds = cfg.datasets[0].model_copy(update={"drop_system_message": True})
    (ex,) = STRATEGIES["chat_template"]({"messages": CONV}, StrategyContext(t, ds, cfg))
    assert t.decode([i for i, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE]) == "4.<end_of_turn>6.<end_of_turn>"


def test_config_names_and_files(make_cfg, tmp_path):
    from ftlab.tokenizer import load_tokenizer
    assert "<|eot_id|>" in load_tokenizer(make_cfg("chat_template: llama3\n")).chat_template
    # the tiny tokenizer has a template of its own: the fallback keeps it
    own = load_tokenizer(make_cfg()).chat_template
    assert load_tokenizer(make_cfg("chat_template: tokenizer_default_fallback_llama4\n")).chat_template == own
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert load_tokenizer(make_cfg(f"chat_template: jinja\nchat_template_jinja: {f}\n")).chat_template == f.read_text()
    assert load_tokenizer(make_cfg(f"chat_template_jinja: {f}\n")).chat_template == f.read_text()
    with pytest.raises(FtlabError, match="does not exist"):
        load_tokenizer(make_cfg("chat_template: jinja\nchat_template_jinja: nowhere/t.jinja\n"))
    with pytest.raises(FtlabError, match="(?s)unknown chat template `lama3`.*did you mean llama3"):
        load_tokenizer(make_cfg("chat_template: lama3\n"))


def test_markers_the_vocabulary_lacks_are_said(make_cfg):
    "On the tiny tokenizer Llama 3's markers are plain text: the plan warns, naming them, and no turn's end is trained."
    from ftlab import Run
    prepared = Run(make_cfg("chat_template: llama3\n")).prepare()
    text = " ".join(prepared.warnings())
    assert "`chat_template: llama3` writes markers that are not tokens of this tokenizer" in text
    assert "`<|eot_id|>`" in text and "will not learn to stop" in text


def test_dataset_template(make_cfg, tok):
    "A dataset's own `chat_template` renders its rows; the tokenizer's template is left as it was."
    from ftlab import Run
    ds = "  - path: ftlab:data/chat.jsonl\n    type: chat_template\n    chat_template: alpaca\n"
    run = Run(make_cfg(datasets=ds))
    ex = run.prepare().train[0]
    assert "### Response:" in run.tokenizer.decode(ex["input_ids"]) and run.tokenizer.chat_template == tok.chat_template


def test_dataset_template_checked_with_the_config():
    from ftlab.config import load_config
    from ftlab.errors import ConfigError
    with pytest.raises(ConfigError, match="(?s)datasets\\[0\\].chat_template.*unknown chat template `lama3`"):
        load_config("base_model: ftlab:tiny\ndatasets:\n  - path: ftlab:data/chat.jsonl\n    type: chat_template\n"
                    "    chat_template: lama3\n")
    with pytest.raises(ConfigError, match="(?s)chat_template_jinja.*does not exist"):
        load_config("base_model: ftlab:tiny\ndatasets:\n  - path: ftlab:data/chat.jsonl\n    type: chat_template\n"
                    "    chat_template: jinja\n    chat_template_jinja: nowhere.jinja\n")
