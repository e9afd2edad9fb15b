#!/usr/bin/env python
"""Build `ftlab:tiny`, the small model embedded in ftlab, plus the example datasets.

Everything is generated here from a fixed seed; nothing is downloaded.

    python scripts/build_tiny.py            # writes ftlab/assets/tiny and ftlab/assets/data

Steps:
 1. generate a synthetic corpus of simple chats (greetings, small facts, arithmetic,
    counting, word tasks; single- and multi-turn, some with a system prompt) and plain text;
 2. train a ~1k byte-level BPE tokenizer on it and wrap it as a transformers tokenizer
    with a ChatML chat template whose assistant turns are marked for loss masking;
 3. pre-train a 4-layer Llama (~0.9M parameters) on the corpus for a few CPU minutes;
 4. write the example datasets (chat, alpaca, input/output, completion, sharegpt).
    `chat.jsonl` teaches two things the model never saw in pre-training: answering
    arithmetic as "= 7" and reversing the order of words.

Runs in about 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

SEED = 1234
ROOT = Path(__file__).resolve().parent.parent

# Special tokens, in id order (they get ids 0..3).
ENDOFTEXT = "<|endoftext|>"  # bos/eos of plain text, document separator in pre-training
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # end of a chat turn; the tokenizer's eos, so generation stops here
PAD = "<|pad|>"  # padding only, distinct from every eos
SPECIALS = [ENDOFTEXT, IM_START, IM_END, PAD]
VOCAB_SIZE = 1024

# ChatML. Only the assistant's content and its <|im_end|> are inside
# {% generation %}: the "\n" that follows <|im_end|> is deliberately OUTSIDE the block,
# so <|im_end|> is the last token the model is trained to produce in a turn (generation
# stops there) and the "\n" is just part of the template, like the role header.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def render_chat(messages: list[dict]) -> str:
    """Plain-Python rendering identical to CHAT_TEMPLATE (used to build the pre-training stream)."""
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)


# ---------------------------------------------------------------------------
# 1. Synthetic world: facts the model learns in pre-training
# ---------------------------------------------------------------------------

COLOURS = [
    ("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("the sun", "yellow"),
    ("a banana", "yellow"), ("an apple", "red"), ("a strawberry", "red"), ("an orange", "orange"),
    ("coal", "black"), ("a lemon", "yellow"), ("a frog", "green"), ("milk", "white"),
    ("the sea", "blue"), ("a carrot", "orange"), ("chocolate", "brown"), ("a tomato", "red"),
    ("a crow", "black"), ("a leaf", "green"), ("a cloud", "white"), ("a pumpkin", "orange"),
]
SOUNDS = [
    ("cow", "moo"), ("dog", "woof"), ("cat", "meow"), ("duck", "quack"), ("sheep", "baa"),
    ("pig", "oink"), ("horse", "neigh"), ("owl", "hoot"), ("lion", "roar"), ("frog", "ribbit"),
    ("bee", "buzz"), ("snake", "hiss"), ("mouse", "squeak"), ("crow", "caw"), ("goat", "maa"),
]
CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Germany", "Berlin"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Peru", "Lima"),
    ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Greece", "Athens"), ("China", "Beijing"),
    # invented countries
    ("Zorbia", "Zorbaville"), ("Velmora", "Brightwater"), ("Kaldor", "Stonehelm"),
    ("Quillon", "Port Quill"), ("Mirevia", "Lumen"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"), ("fast", "slow"),
    ("happy", "sad"), ("open", "closed"), ("light", "dark"), ("tall", "short"), ("wet", "dry"),
    ("old", "new"), ("full", "empty"), ("loud", "quiet"), ("hard", "soft"), ("early", "late"),
    ("left", "right"), ("in", "out"), ("good", "bad"), ("yes", "no"), ("first", "last"),
]
LEGS = [("dog", 4), ("cat", 4), ("cow", 4), ("horse", 4), ("bird", 2), ("duck", 2),
        ("spider", 8), ("ant", 6), ("bee", 6), ("person", 2), ("snake", 0), ("fish", 0)]
NOUNS = ["cat", "dog", "bird", "tree", "book", "car", "apple", "house", "cup", "star",
         "boat", "hat", "ball", "door", "pen", "lamp", "frog", "egg", "bed", "chair",
         "flower", "river", "cake", "shoe", "key", "duck", "sock", "bell", "ring", "coin"]
WORDS = sorted(set(NOUNS + [a for a, _ in OPPOSITES] + [b for _, b in OPPOSITES]
                   + ["red", "blue", "green", "sun", "moon", "fish", "milk", "snow", "rain"]))
NAMES = ["Tom", "Ana", "Sam", "Mia", "Leo", "Zoe", "Max", "Ivy", "Ben", "Eva"]
SIMPLE_FACTS = [
    ("How many days are in a week?", "There are 7 days in a week."),
    ("How many months are in a year?", "There are 12 months in a year."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour."),
    ("What do bees make?", "Bees make honey."),
    ("What do cows give us?", "Cows give us milk."),
    ("What do we use to see?", "We use our eyes to see."),
    ("What do we use to hear?", "We use our ears to hear."),
    ("Is ice hot or cold?", "Ice is cold."),
    ("Is fire hot or cold?", "Fire is hot."),
    ("What falls from clouds?", "Rain falls from clouds."),
    ("When do we see the stars?", "We see the stars at night."),
    ("What shines in the day?", "The sun shines in the day."),
    ("Where do fish live?", "Fish live in water."),
    ("What do plants need to grow?", "Plants need water and light to grow."),
]
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are Tiny, a small and friendly assistant.",
    "You are a helpful assistant. Answer briefly.",
    "You are a patient math helper.",
    "Be kind and helpful.",
]


def cap(s: str) -> str:
    return s[0].upper() + s[1:]


def plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "sh", "ch", "x")) else "s")


def a_n(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def arithmetic(rng: random.Random) -> tuple[str, int, int, int]:
    """Returns (operator word, a, b, result) for a small exercise."""
    op = rng.choice(["plus", "plus", "minus", "times"])
    if op == "plus":
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        return op, a, b, a + b
    if op == "minus":
        b = rng.randint(0, 10)
        a = b + rng.randint(0, 10)
        return op, a, b, a - b
    a, b = rng.randint(0, 6), rng.randint(0, 6)
    return op, a, b, a * b


def math_question(rng: random.Random, op: str, a: int, b: int) -> str:
    forms = [f"What is {a} {op} {b}?", f"What's {a} {op} {b}?", f"How much is {a} {op} {b}?",
             f"Can you tell me what {a} {op} {b} is?", f"{a} {op} {b}?"]
    if op == "plus":
        forms.append(f"Can you add {a} and {b}?")
    return rng.choice(forms)


def qa_pair(rng: random.Random) -> tuple[str, str]:
    """One pre-training style (question, answer) pair."""
    kind = rng.choices(
        ["math", "colour", "sound", "capital", "opposite", "count", "next", "compare",
         "legs", "plural", "repeat", "first_last", "nwords", "fact", "small_talk"],
        weights=[14, 6, 5, 6, 5, 5, 4, 4, 3, 4, 5, 4, 3, 4, 8],
    )[0]
    if kind == "math":
        op, a, b, r = arithmetic(rng)
        return math_question(rng, op, a, b), f"{a} {op} {b} is {r}."
    if kind == "colour":
        thing, colour = rng.choice(COLOURS)
        q = rng.choice([f"What colour is {thing}?", f"What is the colour of {thing}?"])
        return q, f"{cap(thing)} is {colour}."
    if kind == "sound":
        animal, sound = rng.choice(SOUNDS)
        q = rng.choice([f"What sound does {a_n(animal)} make?", f"What does {a_n(animal)} say?"])
        return q, f"{cap(a_n(animal))} says {sound}."
    if kind == "capital":
        country, city = rng.choice(CAPITALS)
        if rng.random() < 0.7:
            q = rng.choice([f"What is the capital of {country}?", f"Which city is the capital of {country}?"])
            return q, f"The capital of {country} is {city}."
        return f"{city} is the capital of which country?", f"{city} is the capital of {country}."
    if kind == "opposite":
        x, y = rng.choice(OPPOSITES)
        if rng.random() < 0.5:
            x, y = y, x
        return f"What is the opposite of {x}?", f"The opposite of {x} is {y}."
    if kind == "count":
        start = rng.choice([1, 1, 1] + list(range(0, 15)))
        end = start + rng.randint(2, 7)
        nums = ", ".join(str(i) for i in range(start, end + 1))
        q = f"Count to {end}." if start == 1 else f"Count from {start} to {end}."
        return q, f"{nums}."
    if kind == "next":
        n = rng.randint(1, 30)
        if rng.random() < 0.5:
            return f"What number comes after {n}?", f"{n + 1} comes after {n}."
        return f"What number comes before {n}?", f"{n - 1} comes before {n}."
    if kind == "compare":
        a, b = rng.sample(range(0, 30), 2)
        if rng.random() < 0.5:
            return f"Which is bigger, {a} or {b}?", f"{max(a, b)} is bigger than {min(a, b)}."
        return f"Which is smaller, {a} or {b}?", f"{min(a, b)} is smaller than {max(a, b)}."
    if kind == "legs":
        animal, n = rng.choice(LEGS)
        legs = "no legs" if n == 0 else f"{n} legs"
        return f"How many legs does {a_n(animal)} have?", f"{cap(a_n(animal))} has {legs}."
    if kind == "plural":
        w = rng.choice(NOUNS)
        return f"What is the plural of {w}?", f"The plural of {w} is {plural(w)}."
    if kind == "repeat":
        ws = " ".join(rng.choices(WORDS, k=rng.randint(2, 5)))
        return rng.choice([f"Repeat after me: {ws}", f"Say this again: {ws}"]), ws
    if kind == "first_last":
        ws = rng.sample(WORDS, rng.randint(2, 5))
        which = rng.choice(["first", "last"])
        word = ws[0] if which == "first" else ws[-1]
        return f"What is the {which} word in: {' '.join(ws)}?", f"The {which} word is {word}."
    if kind == "nwords":
        n = rng.randint(1, 6)
        ws = " ".join(rng.sample(WORDS, n))
        return f"How many words are in: {ws}?", f"There {'is 1 word' if n == 1 else f'are {n} words'}."
    if kind == "fact":
        return rng.choice(SIMPLE_FACTS)
    return rng.choice([
        ("Hello!", "Hello! How can I help you today?"),
        ("Hi!", "Hi! What can I do for you?"),
        ("Hi there!", "Hi there! How can I help?"),
        ("Good morning!", "Good morning! How can I help you today?"),
        ("Good evening!", "Good evening! What can I do for you?"),
        ("How are you?", "I am doing well, thank you! How can I help you?"),
        ("What is your name?", "My name is Tiny. I am a small assistant."),
        ("Who are you?", "I am Tiny, a small assistant made with ftlab."),
        ("Who made you?", "I was made with ftlab."),
        ("Can you help me?", "Of course! What do you need?"),
        ("Thank you!", "You are welcome!"),
        ("Thanks!", "You are welcome! Happy to help."),
        ("Goodbye!", "Goodbye! Have a nice day!"),
        ("Bye!", "Bye! Have a nice day!"),
    ])


def follow_up(rng: random.Random, prev_a: str) -> tuple[str, str]:
    """Either a fresh question or a short follow-up like 'And 5 plus 2?'."""
    if prev_a.split(" ")[1:2] in (["plus"], ["minus"], ["times"]) and rng.random() < 0.5:
        op, a, b, r = arithmetic(rng)
        return rng.choice([f"And {a} {op} {b}?", f"What about {a} {op} {b}?"]), f"{a} {op} {b} is {r}."
    if prev_a.startswith("The capital of") and rng.random() < 0.5:
        country, city = rng.choice(CAPITALS)
        return f"And the capital of {country}?", f"The capital of {country} is {city}."
    return qa_pair(rng)


def pretrain_chat(rng: random.Random) -> list[dict]:
    msgs = []
    if rng.random() < 0.4:
        msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    n_turns = rng.choices([1, 2, 3, 4], weights=[5, 3, 2, 1])[0]
    if n_turns > 1 and rng.random() < 0.3:  # open with a greeting
        g, r = rng.choice([("Hello!", "Hello! How can I help you today?"), ("Hi!", "Hi! What can I do for you?")])
        msgs += [{"role": "user", "content": g}, {"role": "assistant", "content": r}]
        n_turns -= 1
    q, a = qa_pair(rng)
    msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    for _ in range(n_turns - 1):
        q, a = follow_up(rng, a)
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if len(msgs) > 3 and rng.random() < 0.3:
        msgs += [{"role": "user", "content": "Thank you!"}, {"role": "assistant", "content": "You are welcome!"}]
    return msgs


def fact_sentence(rng: random.Random) -> str:
    kind = rng.choice(["colour", "sound", "capital", "opposite", "math", "legs", "fact"])
    if kind == "colour":
        thing, colour = rng.choice(COLOURS)
        return f"{cap(thing)} is {colour}."
    if kind == "sound":
        animal, sound = rng.choice(SOUNDS)
        return f"{cap(a_n(animal))} says {sound}."
    if kind == "capital":
        country, city = rng.choice(CAPITALS)
        return f"The capital of {country} is {city}."
    if kind == "opposite":
        x, y = rng.choice(OPPOSITES)
        return f"The opposite of {x} is {y}."
    if kind == "math":
        op, a, b, r = arithmetic(rng)
        return f"{a} {op} {b} is {r}."
    if kind == "legs":
        animal, n = rng.choice(LEGS)
        return f"{cap(a_n(animal))} has {'no legs' if n == 0 else f'{n} legs'}."
    return rng.choice(SIMPLE_FACTS)[1]


def story(rng: random.Random) -> str:
    """A tiny story with arithmetic, e.g. 'Tom has 3 apples. He gets 4 more. Now Tom has 7 apples.'"""
    name = rng.choice(NAMES)
    pron = "He" if name in ("Tom", "Sam", "Leo", "Max", "Ben") else "She"
    thing = rng.choice(["apple", "book", "cup", "ball", "hat", "coin", "egg", "flower", "key", "sock"])
    a = rng.randint(2, 9)
    if rng.random() < 0.5:
        b = rng.randint(1, 9)
        return (f"{name} has {a} {plural(thing)}. {pron} gets {b} more. "
                f"Now {name} has {a + b} {plural(thing)}.")
    b = rng.randint(1, a)
    left = a - b
    return (f"{name} has {a} {plural(thing)}. {pron} gives {b} to a friend. "
            f"Now {name} has {left} {thing if left == 1 else plural(thing)}.")


def plain_text(rng: random.Random, n_sentences: int) -> str:
    parts = [story(rng) if rng.random() < 0.3 else fact_sentence(rng) for _ in range(n_sentences)]
    # mostly one paragraph, sometimes several lines
    out = ""
    for i, p in enumerate(parts):
        out += p if i == 0 else ("\n" if rng.random() < 0.2 else " ") + p
    return out


# ---------------------------------------------------------------------------
# 2. Tokenizer
# ---------------------------------------------------------------------------


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    # GPT-2 style byte-level pre-tokenization: lossless for any text (digits, newlines,
    # unicode); no prefix space is added so decode(encode(s)) == s.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,  # ids 0..3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes
        min_frequency=2,
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)

    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=ENDOFTEXT,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=None,
        extra_special_tokens=[ENDOFTEXT, IM_START, IM_END],
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
        padding_side="right",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def check_tokenizer(tok, sample_chats: list[list[dict]]) -> None:
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    assert list(ids.values()) == [0, 1, 2, 3], ids
    assert tok.eos_token == IM_END and tok.pad_token == PAD and tok.bos_token == ENDOFTEXT
    assert set(SPECIALS) <= set(tok.all_special_tokens), tok.all_special_tokens
    for s in ["Hello world!\n  3 plus 14 is 17.\n\n", "x = 1234567890;\ttabs\r\nand ünïcödé ✓",
              " leading space", "a , b", f"{ENDOFTEXT}raw{IM_END}"]:
        enc = tok.encode(s, add_special_tokens=True)
        assert tok.decode(enc) == s, (s, tok.decode(enc))
    for msgs in sample_chats:
        out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids_full, mask = out["input_ids"], out["assistant_masks"]
        assert tok.decode(ids_full) == render_chat(msgs)
        # expected mask: 1 on each assistant turn's content tokens + its <|im_end|>, 0 elsewhere
        expected = []
        for m in msgs:
            header = tok.encode(f"{IM_START}{m['role']}\n", add_special_tokens=False)
            body = tok.encode(m["content"], add_special_tokens=False) + [ids[IM_END]]
            newline = tok.encode("\n", add_special_tokens=False)
            flag = 1 if m["role"] == "assistant" else 0
            expected += [0] * len(header) + [flag] * len(body) + [0] * len(newline)
        assert mask == expected, (msgs, mask, expected)
        # every conversation prefix (with and without generation prompt) is a token prefix
        for k in range(1, len(msgs)):
            for gen in (False, True):
                if gen and msgs[k]["role"] != "assistant":
                    continue
                pre = tok.apply_chat_template(msgs[:k], tokenize=True, return_dict=True,
                                              add_generation_prompt=gen)["input_ids"]
                assert ids_full[: len(pre)] == pre, (msgs[:k], gen)
    gp = tok.apply_chat_template([{"role": "user", "content": "Hi!"}], tokenize=False, add_generation_prompt=True)
    assert gp == f"{IM_START}user\nHi!{IM_END}\n{IM_START}assistant\n", gp


def make_tokenizer_config_portable(path: Path) -> None:
    """transformers 5 writes `tokenizer_class: TokenizersBackend` and a list-valued
    `extra_special_tokens`, which transformers 4.x (still used by e.g. vLLM) cannot load.
    The older spellings below load identically in transformers 5."""
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["additional_special_tokens"] = cfg.pop("extra_special_tokens")
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------
# 3. Model
# ---------------------------------------------------------------------------


def build_model(tok) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        initializer_range=0.02,
        bos_token_id=tok.convert_tokens_to_ids(ENDOFTEXT),
        eos_token_id=tok.convert_tokens_to_ids(IM_END),
        pad_token_id=tok.convert_tokens_to_ids(PAD),
        torch_dtype="float32",
    )
    return LlamaForCausalLM(config)


def pack_stream(tok, docs: list[str], seq_len: int) -> torch.Tensor:
    """Tokenize documents, join them with <|endoftext|>, cut into rows of seq_len + 1 tokens."""
    eot = tok.convert_tokens_to_ids(ENDOFTEXT)
    stream: list[int] = []
    for ids in tok(docs, add_special_tokens=False)["input_ids"]:
        stream += ids + [eot]
    n = len(stream) // (seq_len + 1)
    return torch.tensor(stream[: n * (seq_len + 1)]).view(n, seq_len + 1)


def train(model, data: torch.Tensor, steps: int, batch_size: int, lr: float, warmup: int) -> None:
    gen = torch.Generator().manual_seed(SEED)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    order = torch.randperm(len(data), generator=gen)
    t0, running = time.time(), None
    for step in range(steps):
        idx = order[(torch.arange(batch_size) + step * batch_size) % len(data)]
        batch = data[idx]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss  # HF shifts labels
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step == 0:
            print(f"  step    0  loss {loss.item():.3f}")
        if (step + 1) % 50 == 0 or step + 1 == steps:
            print(f"  step {step + 1:4d}  loss {loss.item():.3f}  (avg {running:.3f})  "
                  f"lr {lr_at(step):.2e}  {time.time() - t0:.0f}s", flush=True)
    model.eval()


@torch.no_grad()
def assistant_loss(model, tok, chats: list[list[dict]]) -> float:
    """Mean cross-entropy over assistant tokens (content + <|im_end|>) of the given chats."""
    total, count = 0.0, 0
    for msgs in chats:
        out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids = torch.tensor([out["input_ids"]])
        labels = ids.clone()
        labels[0, torch.tensor(out["assistant_masks"]) == 0] = -100
        logits = model(input_ids=ids).logits[0, :-1]
        tgt = labels[0, 1:]
        loss = torch.nn.functional.cross_entropy(logits, tgt, ignore_index=-100, reduction="sum")
        total += loss.item()
        count += int((tgt != -100).sum())
    return total / count


@torch.no_grad()
def exact_match(model, tok, rng: random.Random, n: int) -> float:
    """Share of fresh single-turn pre-training questions answered exactly right (greedy)."""
    hits = 0
    for _ in range(n):
        q, a = qa_pair(rng)
        hits += chat_generate(model, tok, [{"role": "user", "content": q}]) == a + IM_END
    return hits / n


@torch.no_grad()
def chat_generate(model, tok, msgs: list[dict], max_new_tokens: int = 40) -> str:
    enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, add_generation_prompt=True,
                                  return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=False)


# ---------------------------------------------------------------------------
# 4. Example datasets
# ---------------------------------------------------------------------------


def new_skill_chat(rng: random.Random) -> list[dict]:
    """chat.jsonl rows: arithmetic answered as '= 7' and word reversal (both unseen in pre-training)."""

    def math_turn():
        op, a, b, r = arithmetic(rng)
        return math_question(rng, op, a, b), f"= {r}"

    def reverse_turn():
        ws = rng.sample(WORDS, rng.randint(2, 5))
        q = rng.choice([f"Reverse the words: {' '.join(ws)}", f"Say these words backwards: {' '.join(ws)}",
                        f"Reverse: {' '.join(ws)}"])
        return q, " ".join(reversed(ws))

    msgs = []
    if rng.random() < 0.3:
        msgs.append({"role": "system", "content": rng.choice(
            ["You are Tiny. Give short answers.", "You are a helpful assistant.",
             "Answer in the short style.", "You are a calculator and word reverser."])})
    n_turns = rng.choices([1, 2, 3], weights=[7, 2, 1])[0]
    for _ in range(n_turns):
        q, a = math_turn() if rng.random() < 0.55 else reverse_turn()
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs


ALPACA_TASKS = [
    ("Add the two numbers.", "add"), ("Give the opposite of the word.", "opposite"),
    ("Say what colour this is.", "colour"), ("Name the capital city of the country.", "capital"),
    ("Write the plural of the word.", "plural"), ("Say what sound this animal makes.", "sound"),
    ("Count from 1 to 5.", "count5"), ("Say hello.", "hello"), ("Tell me a fact.", "fact"),
    ("Write a short story about a number.", "story"),
]


def alpaca_row(rng: random.Random) -> dict:
    instruction, kind = rng.choice(ALPACA_TASKS)
    if kind == "add":
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        return {"instruction": instruction, "input": f"{a} and {b}", "output": f"{a} plus {b} is {a + b}."}
    if kind == "opposite":
        x, y = rng.choice(OPPOSITES)
        return {"instruction": instruction, "input": x, "output": f"The opposite of {x} is {y}."}
    if kind == "colour":
        thing, colour = rng.choice(COLOURS)
        return {"instruction": instruction, "input": thing, "output": f"{cap(thing)} is {colour}."}
    if kind == "capital":
        country, city = rng.choice(CAPITALS)
        return {"instruction": instruction, "input": country, "output": f"The capital of {country} is {city}."}
    if kind == "plural":
        w = rng.choice(NOUNS)
        return {"instruction": instruction, "input": w, "output": plural(w)}
    if kind == "sound":
        animal, sound = rng.choice(SOUNDS)
        return {"instruction": instruction, "input": animal, "output": f"{cap(a_n(animal))} says {sound}."}
    if kind == "count5":
        return {"instruction": instruction, "input": "", "output": "1, 2, 3, 4, 5."}
    if kind == "hello":
        return {"instruction": instruction, "input": "", "output": "Hello! How can I help you today?"}
    if kind == "fact":
        return {"instruction": instruction, "input": "", "output": fact_sentence(rng)}
    return {"instruction": instruction, "input": "", "output": story(rng)}


def input_output_row(rng: random.Random) -> dict:
    """Template-free rows: prompt text is not trained on (label false), answers are (label true)."""
    segments = []
    for i in range(rng.choices([1, 2, 3], weights=[6, 3, 1])[0]):
        q, a = qa_pair(rng)
        segments.append({"text": ("" if i == 0 else "\n") + f"Question: {q}\nAnswer: ", "label": False})
        segments.append({"text": a, "label": True})
    return {"segments": segments}


def sharegpt_row(rng: random.Random) -> dict:
    role_map = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": role_map[m["role"]], "value": m["content"]} for m in pretrain_chat(rng)]}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "ftlab" / "assets")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()

    t_start = time.time()
    random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    tiny_dir, data_dir = args.out_dir / "tiny", args.out_dir / "data"

    # 1. corpus -------------------------------------------------------------
    rng = random.Random(f"{SEED}-pretrain")
    n_docs = args.steps * args.batch_size * args.seq_len // 40 + 1000  # ~40 tokens per document
    chats, texts = [], []
    for _ in range(n_docs):
        if rng.random() < 0.85:
            chats.append(pretrain_chat(rng))
        else:
            texts.append(plain_text(rng, rng.randint(2, 8)))
    docs = [render_chat(c) for c in chats] + texts
    random.Random(f"{SEED}-shuffle").shuffle(docs)
    print(f"[1/4] corpus: {len(chats)} chats + {len(texts)} texts")

    # 2. tokenizer ----------------------------------------------------------
    tok_texts = [m["content"] for c in chats[:20000] for m in c] + texts[:5000]
    tok_texts += [f"{r}\n" for r in ("system", "user", "assistant")] * 1000
    tok = build_tokenizer(tok_texts)
    eval_rng = random.Random(f"{SEED}-eval")
    held_out = [pretrain_chat(eval_rng) for _ in range(200)]
    check_tokenizer(tok, held_out)
    print(f"[2/4] tokenizer: {len(tok)} tokens; specials "
          + ", ".join(f"{t}={tok.convert_tokens_to_ids(t)}" for t in SPECIALS))

    # 4a. datasets (written before training so the new-skill loss can be measured) ---
    data_dir.mkdir(parents=True, exist_ok=True)
    r = random.Random(f"{SEED}-chat")
    chat_rows = [{"messages": new_skill_chat(r)} for _ in range(300)]
    write_jsonl(data_dir / "chat.jsonl", chat_rows)
    r = random.Random(f"{SEED}-alpaca")
    write_jsonl(data_dir / "alpaca.jsonl", [alpaca_row(r) for _ in range(100)])
    r = random.Random(f"{SEED}-input-output")
    write_jsonl(data_dir / "input_output.jsonl", [input_output_row(r) for _ in range(100)])
    r = random.Random(f"{SEED}-completion")
    completion = [{"text": plain_text(r, r.randint(40, 80) if i % 3 == 0 else r.randint(3, 12))} for i in range(50)]
    write_jsonl(data_dir / "completion.jsonl", completion)
    r = random.Random(f"{SEED}-sharegpt")
    write_jsonl(data_dir / "sharegpt.jsonl", [sharegpt_row(r) for _ in range(50)])
    check_tokenizer(tok, [row["messages"] for row in chat_rows])
    n_long = sum(len(tok(c["text"])["input_ids"]) > 256 for c in completion)
    print(f"      datasets written to {data_dir} ({n_long} completion rows longer than 256 tokens)")

    # 3. model --------------------------------------------------------------
    data = pack_stream(tok, docs, args.seq_len)
    model = build_model(tok)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[3/4] model: {n_params / 1e6:.2f}M parameters; training on {data.numel() / 1e6:.2f}M tokens "
          f"({args.steps} steps x {args.batch_size} x {args.seq_len})")
    train(model, data, args.steps, args.batch_size, args.lr, warmup=30)

    pre_loss = assistant_loss(model, tok, held_out)
    new_loss = assistant_loss(model, tok, [row["messages"] for row in chat_rows])
    print(f"      assistant-token loss: held-out pre-training chats {pre_loss:.3f}, chat.jsonl {new_loss:.3f}")
    print(f"      exact-match on 100 held-out questions: {exact_match(model, tok, eval_rng, 100):.0%}")
    for msgs in ([{"role": "user", "content": "Hello!"}],
                 [{"role": "user", "content": "What is 3 plus 4?"}],
                 [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "What is the capital of France?"}],
                 [{"role": "user", "content": "What sound does a cow make?"}],
                 [{"role": "user", "content": "Count from 4 to 9."}],
                 [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hi! What can I do for you?"},
                  {"role": "user", "content": "What is the opposite of fast?"}],
                 [{"role": "user", "content": "Reverse the words: red cat sun"}]):
        print(f"      {msgs[-1]['content']!r:45} -> {chat_generate(model, tok, msgs)!r}")

    # 4b. save --------------------------------------------------------------
    if tiny_dir.exists():
        shutil.rmtree(tiny_dir)
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    model.save_pretrained(tiny_dir, safe_serialization=True)
    tok.save_pretrained(tiny_dir)
    make_tokenizer_config_portable(tiny_dir / "tokenizer_config.json")
    size = sum(f.stat().st_size for f in tiny_dir.iterdir())
    print(f"[4/4] saved {tiny_dir} ({size / 1e6:.2f} MB): {sorted(f.name for f in tiny_dir.iterdir())}")
    print(f"done in {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
