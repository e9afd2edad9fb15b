"""axolotl's instruction formats with a prompt style (`type: alpaca:chat`, `alpaca:phi`, `jeopardy:chatml`, ...), token by
token: the prompt is written as axolotl's prompters write it, and only the response and one eos are trained."""
import pytest
from ftlab.errors import ConfigError
from ftlab.strategies import STRATEGIES, StrategyContext, IGNORE, ALPACA_SYSTEM

SYS, SYS_NO_INPUT = ALPACA_SYSTEM
ROW = {"instruction": "Greet me", "input": "politely", "output": "Hello!"}
# axolotl's AlpacaPrompter, style by style, with and without an input
WANT = {
    "alpaca": (f"{SYS}\n\n### Instruction:\nGreet me\n\n### Input:\npolitely\n\n### Response:\n",
               f"{SYS_NO_INPUT}\n\n### Instruction:\nGreet me\n\n### Response:\n"),
    "alpaca:instruct": (f"{SYS}\n\n### Instruction:\nGreet me\n\n### Input:\npolitely\n\n### Response:\n",
                        f"{SYS_NO_INPUT}\n\n### Instruction:\nGreet me\n\n### Response:\n"),
    "alpaca:chat": (f"SYSTEM: {SYS}\nUSER: Greet me\npolitely\nASSISTANT:", f"SYSTEM: {SYS_NO_INPUT}\nUSER: Greet me\nASSISTANT:"),
    "alpaca_chat": (f"SYSTEM: {SYS}\nUSER: Greet me\npolitely\nASSISTANT:", f"SYSTEM: {SYS_NO_INPUT}\nUSER: Greet me\nASSISTANT:"),
    "alpaca:chatml": (f"<|im_start|>system\n{SYS}<|im_end|>\n<|im_start|>user\nGreet me\npolitely<|im_end|>\n<|im_start|>assistant\n",
                      f"<|im_start|>system\n{SYS_NO_INPUT}<|im_end|>\n<|im_start|>user\nGreet me<|im_end|>\n<|im_start|>assistant\n"),
    "alpaca:phi": (f"<|system|>\n{SYS}<|end|>\n<|user|>\nGreet me<|end|>politely<|assistant|>",
                   f"<|system|>\n{SYS_NO_INPUT}<|end|>\n<|user|>\nGreet me<|end|>\n<|assistant|>\n"),
}


@pytest.fixture(scope="module")
def ctx(tok):
    from ftlab.config import load_config
    cfg = load_config("base_model: ftlab:tiny\nsequence_len: 256\ndatasets: [{path: ftlab:data/alpaca.jsonl, type: alpaca}]")
    return StrategyContext(tok, cfg.datasets[0], cfg)


@pytest.mark.parametrize("t", sorted(WANT))
def test_alpaca_styles(tok, ctx, t):
    for row, prompt in ((ROW, WANT[t][0]), ({**ROW, "input": ""}, WANT[t][1])):
        (ex,) = STRATEGIES[t](row, ctx)
        p = tok(prompt, add_special_tokens=True)["input_ids"]
        r = tok("Hello!", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ex["input_ids"] == p + r
        assert ex["labels"] == [IGNORE] * len(p) + r


@pytest.mark.parametrize("t, row, prompt, response", [
    ("jeopardy:chat", {"question": "It moos", "category": "Animals", "answer": "a cow"},
     f"SYSTEM: {SYS}\nUSER: It moos\nAnimals\nASSISTANT:", "what is a cow"),
    ("oasst:chatml", {"INSTRUCTION": "Hi", "RESPONSE": "Hello"},
     f"<|im_start|>system\n{SYS_NO_INPUT}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "Hello"),
    ("gpteacher:phi", {"instruction": "Hi", "response": "Hello"},
     f"<|system|>\n{SYS_NO_INPUT}<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n", "Hello"),
    ("explainchoice:chat", {"question": "2+2?", "choices": ["3", "4"], "solution": "4"},
     "SYSTEM: Choose the answer that best answers the question. Explain your reasoning.\n\nUSER: 2+2?\n- \"3\"\n- \"4\"\nASSISTANT:", "4"),
    ("concisechoice:phi", {"question": "2+2?", "choices": ["4"], "explanation": "It is 4"},   # always the chat style
     "Choose the answer that best answers the question. Be concise in your response.\n\nUSER: 2+2?\n- \"4\"\nASSISTANT:", "It is 4"),
    ("summarizetldr", {"article": "Cows moo.", "summary": "Moo."},
     "USER: Summarize the following article as a TL;DR.\nCows moo.\nASSISTANT:", "Moo."),
])
def test_other_formats(tok, ctx, t, row, prompt, response):
    (ex,) = STRATEGIES[t](row, ctx)
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["input_ids"] == p + r and ex["labels"] == [IGNORE] * len(p) + r


def test_styles_in_a_config(make_cfg):
    cfg = make_cfg(datasets="  - path: ftlab:data/alpaca.jsonl\n    type: alpaca:chat\n")
    assert cfg.datasets[0].type == "alpaca:chat"
    with pytest.raises(ConfigError, match="(?s)`type: alpaca:shout`: `shout` is not a prompt style of `alpaca`.*alpaca:chatml"):
        make_cfg(datasets="  - path: ftlab:data/alpaca.jsonl\n    type: alpaca:shout\n")
    from ftlab import Run
    run = Run(cfg)
    ex = run.prepare().train[0]
    assert "ASSISTANT:" in run.tokenizer.decode(ex["input_ids"])
