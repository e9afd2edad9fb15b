#!/usr/bin/env python
"""Write the small datasets embedded in ftlab for preference tuning (DPO/IPO/ORPO/SimPO, KTO, reward models, PRMs)
and online RL (GRPO).

    python scripts/build_preference_data.py     # writes ftlab/assets/data/{preference,kto,stepwise,counting}.jsonl

Fixed seed, nothing downloaded, a second or two. The questions come from the same generators as `ftlab:tiny`'s
pre-training corpus (`scripts/build_tiny.py`), so the model can read them:

- `preference.jsonl` (TRL's conversational pair layout: `prompt`, `chosen`, `rejected` as message lists): the
  chosen answer is short and right ("3 plus 4 is 7."); the rejected one is either evasive ("I am not sure.",
  "Let me think about it later.") or gives a wrong number. Evasive answers are easy to tell apart, wrong numbers
  are hard for a model this small: a reward model's held-out accuracy lands between the two.
- `kto.jsonl`: the same kind of answers unpaired, `prompt` + `completion` (text) + boolean `label`.
- `stepwise.jsonl` (TRL's stepwise-supervised layout): a sum of three numbers worked in steps, `labels` true per
  correct step. A quarter of the rows get the second sum wrong (it and the answer after it are labelled false), a
  quarter state an answer that does not repeat the worked result (only the answer is false). The second kind can
  be checked by comparing two numbers in the text, which even a very small model can learn.
- `counting.jsonl` (GRPO prompts): "Count from 4 to 11." as a user message, with the expected `answer`
  ("4, 5, 6, 7, 8, 9, 10, 11."). `ftlab:tiny` learned counting in pre-training but often stops early on spans of
  six to nine numbers: about half its sampled answers are right, which gives GRPO differences to learn from.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from build_tiny import arithmetic, math_question, qa_pair  # noqa: E402

SEED = 4321
EVASIVE = ["I am not sure.", "Let me think about it later.", "I don't know.", "Maybe. It depends.",
           "That is hard to say.", "Ask me another time."]


def wrong(r: int, rng: random.Random) -> int:
    return r + rng.choice([-3, -2, -1, 1, 2, 3]) if r > 3 else r + rng.randint(1, 4)


def answer_pair(rng: random.Random) -> tuple[str, str, str]:
    "(question, good answer, bad answer)"
    if rng.random() < 0.6:
        op, a, b, r = arithmetic(rng)
        q, good = math_question(rng, op, a, b), f"{a} {op} {b} is {r}."
        bad = rng.choice(EVASIVE) if rng.random() < 0.5 else f"{a} {op} {b} is {wrong(r, rng)}."
        return q, good, bad
    q, good = qa_pair(rng)
    return q, good, rng.choice(EVASIVE)


def preference_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        q, good, bad = answer_pair(rng)
        rows.append({"prompt": [{"role": "user", "content": q}],
                     "chosen": [{"role": "assistant", "content": good}],
                     "rejected": [{"role": "assistant", "content": bad}]})
    return rows


def kto_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        q, good, bad = answer_pair(rng)
        label = rng.random() < 0.5
        rows.append({"prompt": q, "completion": good if label else bad, "label": label})
    return rows


def stepwise_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
        s1, s2 = a + b, a + b + c
        steps = [f"{a} plus {b} is {s1}.", f"{s1} plus {c} is {s2}.", f"The answer is {s2}."]
        labels = [True, True, True]
        mode = rng.random()
        if mode < 0.25:     # a wrong sum in the second step; it and the answer built on it are wrong
            w = wrong(s2, rng)
            steps[1:] = [f"{s1} plus {c} is {w}.", f"The answer is {w}."]
            labels = [True, False, False]
        elif mode < 0.5:    # right working, but the answer does not repeat the result
            steps[2] = f"The answer is {wrong(s2, rng)}."
            labels = [True, True, False]
        rows.append({"prompt": f"What is {a} plus {b} plus {c}?", "completions": steps, "labels": labels})
    return rows


def counting_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        a = rng.randint(1, 12)
        b = a + rng.randint(5, 8)
        rows.append({"prompt": [{"role": "user", "content": f"Count from {a} to {b}."}],
                     "answer": ", ".join(str(i) for i in range(a, b + 1)) + "."})
    return rows


def main() -> None:
    rng = random.Random(SEED)
    out = ROOT / "ftlab" / "assets" / "data"
    for name, rows in (("preference", preference_rows(rng, 400)), ("kto", kto_rows(rng, 300)),
                       ("stepwise", stepwise_rows(rng, 300)), ("counting", counting_rows(rng, 400))):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {path.relative_to(ROOT)} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
