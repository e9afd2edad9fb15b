"""The notebook's label-mask viewer: HTML spans agree token by token with the labels the strategies produce."""
import html as htmllib, json, re, subprocess, sys
from html.parser import HTMLParser
import pytest
from ftlab.strategies import STRATEGIES, StrategyContext, IGNORE
from ftlab.errors import FtlabError, Problem
from ftlab.masks import visible
from ftlab.maskview import STYLE, BADGES, mask_view, masks_for, sample_html, sample_from, row_kind, MaskView


PARTS = ("ftlab-prompt", "ftlab-side-chosen", "ftlab-side-rejected", "ftlab-side-completion")
TEXTS = ("ftlab-sample-head", "ftlab-side-head", "ftlab-part-head", "ftlab-summary", "ftlab-badge", "ftlab-step-mark")


class Spans(HTMLParser):
    """Token spans (class, style, title, text, inside <details>?, part of a pair), <details> summaries, warning texts,
    and the texts of headers, badges and step marks (`texts[class]`) of a view."""
    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.tokens, self.summaries, self.warnings, self.other_styles = [], [], [], []
        self.texts = {c: [] for c in TEXTS}
        self._stack, self._depth_details, self._cur, self._summary, self._warn = [], 0, None, None, None
        self._parts, self._open = [], []          # (part class, depth); [class, text, depth] of TEXTS being read
        self.feed(text); self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = a.get("class", "") or ""
        self._stack.append(tag)
        d = len(self._stack)
        if tag == "details": self._depth_details += 1
        if tag == "summary": self._summary = ""
        if tag == "div" and "ftlab-warning" in cls.split(): self._warn = ["", d]
        self._parts += [(c, d) for c in cls.split() if c in PARTS]
        self._open += [[c, "", d] for c in cls.split() if c in TEXTS]
        if tag == "span" and "ftlab-tok" in cls.split():
            self._cur = dict(cls=cls.split(), style=a.get("style"), title=a.get("title"), text="",
                             hidden=self._depth_details > 0, part=self._parts[-1][0] if self._parts else None)
        elif a.get("style"): self.other_styles.append((tag, cls, a["style"]))

    def handle_endtag(self, tag):
        d = len(self._stack)
        if tag == "span" and self._cur is not None:
            self.tokens.append(self._cur); self._cur = None
        if tag == "summary": self.summaries.append(self._summary); self._summary = None
        if tag == "details": self._depth_details -= 1
        if tag == "div" and self._warn and self._warn[1] == d:
            self.warnings.append(self._warn[0]); self._warn = None
        if self._parts and self._parts[-1][1] == d: self._parts.pop()
        for o in [o for o in self._open if o[2] == d]:
            self.texts[o[0]].append(o[1]); self._open.remove(o)
        self._stack.pop()

    def handle_data(self, data):
        if self._cur is not None: self._cur["text"] += data
        if self._summary is not None: self._summary += data
        if self._warn is not None: self._warn[0] += data
        for o in self._open: o[1] += data


CONV = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "5."}, {"role": "user", "content": "Say hello"},
        {"role": "assistant", "content": "hello"}]

CASES = {
    "chat_template": ("  - path: ftlab:data/chat.jsonl\n    type: chat_template\n", {"messages": CONV}),
    "alpaca": ("  - path: ftlab:data/alpaca.jsonl\n    type: alpaca\n",
               {"instruction": "Add the numbers", "input": "2 and\t2", "output": "4\nDone."}),
    "input_output": ("  - path: ftlab:data/input_output.jsonl\n    type: input_output\n",
                     {"segments": [{"text": "Q: 2+2?\n", "label": False}, {"text": "A: 4", "label": True},
                                   {"text": "\n(end)", "label": False}, {"text": "<|im_end|>", "label": True}]}),
}


def build(name, make_cfg, tok, **kw):
    ds, row = CASES[name]
    cfg = make_cfg(datasets=ds, **kw)
    (ex,) = STRATEGIES[name](row, StrategyContext(tok, cfg.datasets[0], cfg))
    return dict(ex, source=f"ftlab:data/{name}.jsonl", row=4)


@pytest.fixture
def examples(make_cfg, tok):
    return {name: build(name, make_cfg, tok) for name in CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_trained_spans_are_exactly_the_trained_labels(name, examples, tok):
    ex = examples[name]
    view = mask_view([ex], tok)
    p = Spans(view.html)
    assert len(p.tokens) == len(ex["input_ids"])
    n_trained = sum(l != IGNORE for l in ex["labels"])
    assert 0 < n_trained < len(ex["labels"])
    for span, i, l in zip(p.tokens, ex["input_ids"], ex["labels"]):
        trained = l != IGNORE
        assert (span["style"] == STYLE["trained"]) is trained, span
        assert ("ftlab-trained" in span["cls"]) is trained
        assert f"id {i} " in span["title"] and f"label {l}" in span["title"]
        if not trained: assert "not trained" in span["title"]
    assert sum(s["style"] == STYLE["trained"] for s in p.tokens) == n_trained == view.samples[0].n_trained
    # Outside the token spans only the legend's "trained" swatch carries the trained style.
    assert [c for _, c, st in p.other_styles if st.startswith(STYLE["trained"])] == ["ftlab-legend-trained"]
    # .samples is the token_view data, position by position.
    assert [t["id"] for t in view.samples[0].tokens] == ex["input_ids"]
    assert [t["label"] for t in view.samples[0].tokens] == ex["labels"]


def test_special_tokens_escaped_visible_and_styled(examples, tok):
    ex = examples["chat_template"]
    view = mask_view([ex], tok)
    h, p = view.html, Spans(view.html)
    end, start = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|im_start|>")
    assert "<|im_end|>" not in h and "&lt;|im_end|&gt;" in h
    for span, i, l in zip(p.tokens, ex["input_ids"], ex["labels"]):
        if i in (end, start): assert span["text"] == tok.convert_ids_to_tokens(i)
        if i == start: assert span["style"] == STYLE["special"] and "ftlab-special" in span["cls"]
    # The system and user turns end with an untrained <|im_end|> (special), the assistant turns with a trained one.
    kinds = [s["cls"][1] for s, i in zip(p.tokens, ex["input_ids"]) if i == end]
    assert kinds == ["ftlab-special", "ftlab-special", "ftlab-trained", "ftlab-special", "ftlab-trained"]


def test_whitespace_is_visible(examples, tok):
    ex = examples["alpaca"]
    view = mask_view([ex], tok)
    p = Spans(view.html)
    texts = [t["text"] for t in view.samples[0].tokens]
    assert any("\n" in t for t in texts) and any("\t" in t for t in texts)
    for span, t in zip(p.tokens, texts):
        assert span["text"].count("↵") == t.count("\n") and span["text"].count("→") == t.count("\t")
        assert "\n" not in span["text"]  # the line break follows the span
    assert view.html.count("↵</span>\n") == sum(t.endswith("\n") for t in texts)
    # A trained newline is a visible, coloured ↵.
    assert any(s["text"].endswith("↵") and s["style"] == STYLE["trained"] for s in p.tokens)
    assert "↵" in view.text() and "→" in view.text()


def test_long_sample_folds_its_middle_without_losing_tokens(tok):
    ids = tok("one two three four five six seven eight nine ten. " * 30, add_special_tokens=False)["input_ids"]
    n = len(ids)
    labels = [IGNORE] * (n // 3) + ids[n // 3:]
    view = mask_view([dict(input_ids=ids, labels=labels)], tok, max_tokens=50)
    p = Spans(view.html)
    assert view.html.count("<details") == 1 and len(p.summaries) == 1
    hidden = [s for s in p.tokens if s["hidden"]]
    first = next(k for k, s in enumerate(p.tokens) if s["hidden"])
    last = len(p.tokens) - first - len(hidden)
    assert (first, len(hidden), last) == (25, n - 50, 25)
    assert first + len(hidden) + last == n == len(p.tokens)
    assert p.summaries[0].startswith(f"… {n - 50} more tokens")
    k = sum(l != IGNORE for l in labels[25:n - 25])
    assert f"({k} trained)" in p.summaries[0]
    assert [int(s["title"].split()[0][1:]) for s in p.tokens] == list(range(n))  # positions in order
    assert [s["title"].split()[2] for s in p.tokens] == [str(i) for i in ids]
    assert f"… {n - 50} more tokens" in view.text()
    # Short enough: no fold.
    assert "<details" not in mask_view([dict(input_ids=ids, labels=labels)], tok, max_tokens=n).html
    assert "<details" not in mask_view([dict(input_ids=ids, labels=labels)], tok, max_tokens=None).html


def test_warnings_and_badges(make_cfg, tok):
    from ftlab.prepare import prepare_datasets
    cfg = make_cfg().model_copy(update={"sequence_len": 40})
    prep = prepare_datasets(cfg, tok, use_cache=False)
    warnings = prep.warnings()
    # Rows dropped (no trained token), rows whose end of turn was cut away, and the truncated rows themselves.
    assert len(warnings) == 3 and "will not learn to stop" in warnings[1] and "sequence_len" in warnings[2]
    truncated = [r for r in range(len(prep.train)) if prep.train[r]["truncated"]][:2]
    assert all(prep.train[r]["eot_trained"] is False for r in truncated)
    view = masks_for(prep, tok, n=1, start=truncated[0])
    p = Spans(view.html)
    assert p.warnings == [f"⚠ {w}".replace("`", "") for w in warnings]  # `key` shows as <code>key</code>
    assert view.html.index("ftlab-warning") < view.html.index("ftlab-sample")
    assert "<code" in view.html and "sequence_len" in view.html
    assert "truncated" in view.samples[0].badges() and 'class="ftlab-badge"' in view.html
    assert all(f"⚠ {w}" in view.text() for w in warnings)
    # Badges of a sample with no trained token and an untrained end of turn.
    bad = mask_view([dict(input_ids=[1, 5, 2], labels=[IGNORE] * 3, eot_trained=False)], tok)
    assert bad.samples[0].badges() == ["no trained tokens", "end of turn not trained"]
    assert "no trained tokens" in bad.html and "end of turn not trained" in bad.html
    # A Problem works as a warning too: message and fix.
    pv = mask_view([], tok, warnings=[Problem("no assistant-turn markers", fix="use a template with {% generation %}")])
    assert Spans(pv.html).warnings == ["⚠ no assistant-turn markers. Fix: use a template with {% generation %}"]


def test_view_api(examples, tok):
    exs = list(examples.values())
    view = mask_view(exs, tok, title="Three <strategies>")
    assert isinstance(view, MaskView) and view._repr_html_() == view.html
    assert repr(view) == str(view) == view.text() and "\x1b[" not in view.text() and "\x1b[" in view.text(color=True)
    assert "Three &lt;strategies&gt;" in view.html
    n, k = sum(len(e["input_ids"]) for e in exs), sum(l != IGNORE for e in exs for l in e["labels"])
    assert view.summary().startswith(f"3 samples shown · {n} tokens · {k} trained")
    assert view.summary() in view.html and view.summary() in view.text()
    heads = [line for line in view.text().splitlines() if line.startswith("── ftlab:data/")]
    assert len(heads) == 3 and heads[0] == (f"── ftlab:data/chat_template.jsonl#4 · "
                                    f"{sum(l != IGNORE for l in exs[0]['labels'])}/{len(exs[0]['labels'])} tokens trained")
    assert "row 4" in view.html
    t = view.text()
    assert "[5.<|im_end|>]" in t and "[hello<|im_end|>]" in t and "[A: 4]" in t
    # A column slice and a single example work too.
    cols = {k: [e[k] for e in exs] for k in ("input_ids", "labels")}
    assert [s.n_tokens for s in mask_view(cols, tok).samples] == [len(e["input_ids"]) for e in exs]
    assert len(mask_view(exs[0], tok).samples) == 1
    with pytest.raises(FtlabError, match="labels"):
        mask_view([dict(input_ids=[1, 2], labels=[IGNORE])], tok)
    with pytest.raises(FtlabError, match="no `input_ids`/`labels`"):
        mask_view([dict(text="hi")], tok)


def test_html_size_is_small(tok):
    ids = tok("Hi there.\nHow are you?", add_special_tokens=False)["input_ids"]
    ex = dict(input_ids=[1] + ids[:8] + [2], labels=[IGNORE] * 5 + ids[4:8] + [2], source="demo.jsonl", row=3)
    s = sample_from(ex, tok)
    assert s.n_tokens == 10
    assert len(sample_html(s)) < 2500 and len(mask_view([ex], tok).html) < 3500


def test_masks_for_splits_and_ranges(make_cfg, tok):
    from ftlab.prepare import prepare_datasets
    prep = prepare_datasets(make_cfg(extra="val_set_size: 0.1\n"), tok, use_cache=False)
    view = masks_for(prep, tok, n=2, start=3)
    assert [s.row for s in view.samples] == prep.train.select([3, 4])["row"]
    assert all(s.source == "ftlab:data/chat.jsonl" for s in view.samples)
    assert view.title.startswith(f"Label masks · train rows 3–4 of {len(prep.train)}")
    ev = masks_for(prep, tok, n=100, split="eval")
    assert len(ev.samples) == len(prep.eval) and "eval" in ev.title
    with pytest.raises(FtlabError, match="out of range"):
        masks_for(prep, tok, start=len(prep.train))
    with pytest.raises(FtlabError, match="split"):
        masks_for(prep, tok, split="test")
    no_eval = prepare_datasets(make_cfg(), tok, use_cache=False)
    with pytest.raises(FtlabError, match="no eval split"):
        masks_for(no_eval, tok, split="eval")


def test_import_stays_off_the_notebook_stack():
    code = "import ftlab.maskview, sys; print(' '.join(sys.modules))"
    mods = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert "ftlab.maskview" in mods
    assert not {"IPython", "ipywidgets", "plotly", "torch", "transformers"} & mods


# Preference data: pairs, KTO rows and stepwise rows, prepared from the embedded datasets.

PREF = {
    "pairs": "rl: dpo\ndatasets:\n  - path: ftlab:data/preference.jsonl\n    type: chat_template\n",
    "unpaired": "rl: kto\ndatasets:\n  - path: ftlab:data/kto.jsonl\n    type: chat_template\n",
    "stepwise": "process_reward_model: true\ndatasets:\n  - path: ftlab:data/stepwise.jsonl\n    type: stepwise_supervised\n",
}


@pytest.fixture(scope="module")
def prepared(tok, tmp_path_factory):
    "Prepared train splits of each preference kind, cached under the test's temporary folder."
    from ftlab.config import load_config
    from ftlab.prepare import prepare_datasets
    out = {}
    for kind, body in PREF.items():
        tmp = tmp_path_factory.mktemp(kind)
        cfg = load_config(f"base_model: ftlab:tiny\nsequence_len: 256\noutput_dir: {tmp / 'out'}\n"
                          f"dataset_prepared_path: {tmp / 'prepared'}\n{body}")
        out[kind] = prepare_datasets(cfg, tok)
    return out


def source_row(ex) -> dict:
    "The line of the embedded data file a prepared row came from."
    from ftlab.assets import embedded_path
    return json.loads(embedded_path(ex["source"]).read_text().splitlines()[ex["row"]])


def shown(text: str) -> str:
    "Text as the HTML spans show it, line breaks left out."
    return visible(text).replace("\n", "")


def test_pair_shows_its_prompt_once_then_chosen_and_rejected(prepared, tok):
    ex = prepared["pairs"].train[0]
    P, C, R = ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]
    assert row_kind(ex) == "pairs" and P and C and R and C != R
    view = mask_view([ex], tok)
    p = Spans(view.html)
    # Every token once, in order: the prompt, then chosen, then rejected, each in its own block.
    assert [int(s["title"].split()[2]) for s in p.tokens] == P + C + R
    assert [s["part"] for s in p.tokens] == (["ftlab-prompt"] * len(P) + ["ftlab-side-chosen"] * len(C)
                                             + ["ftlab-side-rejected"] * len(R))
    part = lambda name: "".join(s["text"] for s in p.tokens if s["part"] == name)
    prompt, chosen, rejected = tok.decode(P), tok.decode(C), tok.decode(R)
    assert part("ftlab-prompt") == shown(prompt)
    assert part("ftlab-side-chosen") == shown(chosen) and part("ftlab-side-rejected") == shown(rejected)
    # The prompt is shown once, not once per side: its question appears once in the whole view.
    question = source_row(ex)["prompt"][-1]["content"]
    assert question in prompt and htmllib.unescape(re.sub(r"<[^>]+>", "", view.html)).count(question) == 1
    assert "".join(s["text"] for s in p.tokens).count(shown(prompt)) == 1
    # The answers are trained and coloured; the prompt is not.
    for s in p.tokens:
        trained = s["part"] != "ftlab-prompt"
        assert (s["style"] == STYLE["trained"]) is trained and ("ftlab-trained" in s["cls"]) is trained, s
        if not trained: assert "not trained" in s["title"]
    # Positions count from the start of each sequence, so both sides start right after the prompt.
    pos = [int(s["title"].split()[0][1:]) for s in p.tokens]
    assert pos == list(range(len(P))) + list(range(len(P), len(P) + len(C))) + list(range(len(P), len(P) + len(R)))
    # Side by side, wrapping when narrow; each side headed with its name and counts.
    assert re.search(r'class="ftlab-sides" style="[^"]*display:flex;flex-wrap:wrap', view.html)
    assert p.texts["ftlab-side-head"] == [f"chosen · {len(C)}/{len(C)} tokens trained",
                                          f"rejected · {len(R)}/{len(R)} tokens trained"]
    assert p.texts["ftlab-part-head"] == [f"prompt · {len(P)} tokens, not trained"]
    assert p.texts["ftlab-sample-head"][0] == (f"ftlab:data/preference.jsonl row {ex['row']} · pair · prompt "
                                               f"{len(P)} tokens, chosen {len(C)}, rejected {len(R)}")
    assert p.texts["ftlab-badge"] == []
    s = view.samples[0]
    assert (s.kind, s.n_tokens, s.n_trained, s.badges()) == ("pairs", len(P) + len(C) + len(R), len(C) + len(R), [])
    # Text: the prompt once, then each side under its heading, trained runs in brackets.
    t = view.text()
    assert t.count(visible(prompt).rstrip("\n")) == 1 and t.count("▸ prompt") == 1
    assert (f"▸ chosen · {len(C)}/{len(C)} tokens trained\n[{visible(chosen).rstrip(chr(10))}]\n"
            f"▸ rejected · {len(R)}/{len(R)} tokens trained\n[{visible(rejected).rstrip(chr(10))}]") in t
    assert t.index("▸ prompt") < t.index("▸ chosen") < t.index("▸ rejected")


def test_pair_summary_masks_for_and_slices(prepared, tok):
    prep = prepared["pairs"]
    view = masks_for(prep, tok, n=3)
    rows = [prep.train[i] for i in range(3)]
    avg = lambda k: f"{sum(len(r[k]) for r in rows) / 3:.0f}"
    assert view.summary() == (f"3 pairs shown · prompt {avg('prompt_ids')} tokens avg, "
                              f"chosen {avg('chosen_ids')}, rejected {avg('rejected_ids')}")
    assert Spans(view.html).texts["ftlab-summary"] == [view.summary()] and view.summary() in view.text()
    assert view.title.startswith(f"Label masks · train rows 0–2 of {len(prep.train)}")
    assert view.html.count('class="ftlab-side ftlab-side-chosen"') == 3 == view.text().count("▸ rejected")
    # A column slice of pairs, and a pair next to an SFT row.
    assert [s.kind for s in mask_view(prep.train[:2], tok).samples] == ["pairs", "pairs"]
    sft = dict(input_ids=[1, 5, 2], labels=[IGNORE, 5, 2])
    mixed = mask_view([sft, rows[0]], tok)
    assert mixed.summary().startswith("1 sample shown · 3 tokens · 2 trained") and "; 1 pair shown · prompt" in mixed.summary()
    with pytest.raises(FtlabError, match="without `rejected_ids`"):
        mask_view([dict(prompt_ids=[1], chosen_ids=[2])], tok)
    with pytest.raises(FtlabError, match="row kind"):
        mask_view([rows[0]], tok, kind="grpo")


def test_pair_badges_truncated_and_prompt_too_long(make_cfg, tok):
    from ftlab.preference_data import strategies_for
    fn = strategies_for("pairs")["chat_template"]
    row = {"prompt": "Please repeat after me: one two three four", "chosen": "one two three four five six seven",
           "rejected": "no"}
    full = fn(row, StrategyContext(tok, make_cfg().datasets[0], make_cfg()))[0]
    n = len(full["prompt_ids"])
    cut_cfg = make_cfg().model_copy(update={"sequence_len": n + 3})
    (cut,) = fn(row, StrategyContext(tok, cut_cfg.datasets[0], cut_cfg))
    view = mask_view([dict(cut, source="pairs.jsonl", row=0)], tok)
    assert cut["truncated"] and view.samples[0].badges() == ["truncated"]
    assert Spans(view.html).texts["ftlab-badge"] == ["truncated"] and "· truncated" in view.text()
    assert Spans(view.html).texts["ftlab-side-head"][0] == "chosen · 3/3 tokens trained"
    long_cfg = make_cfg().model_copy(update={"sequence_len": n - 2})
    (long,) = fn(row, StrategyContext(tok, long_cfg.datasets[0], long_cfg))
    view = mask_view([long], tok)
    assert long["prompt_too_long"] and view.samples[0].badges() == ["prompt too long"]
    p = Spans(view.html)
    assert p.texts["ftlab-badge"] == ["prompt too long"] and p.texts["ftlab-side-head"] == [
        "chosen · 0/0 tokens trained", "rejected · 0/0 tokens trained"]
    assert BADGES["prompt too long"][1] in htmllib.unescape(view.html)


def test_kto_rows_show_prompt_completion_and_their_label(prepared, tok):
    train = prepared["unpaired"].train
    good = next(train[i] for i in range(len(train)) if train[i]["label"])
    bad = next(train[i] for i in range(len(train)) if not train[i]["label"])
    assert row_kind(good) == "unpaired" and source_row(good)["label"] is True and source_row(bad)["label"] is False
    view = mask_view([good, bad], tok)
    assert view.summary() == (f"2 completions shown (1 desirable, 1 undesirable) · prompt "
                              f"{(len(good['prompt_ids']) + len(bad['prompt_ids'])) / 2:.0f} tokens avg, completion "
                              f"{(len(good['completion_ids']) + len(bad['completion_ids'])) / 2:.0f}")
    for ex, word in ((good, "desirable"), (bad, "undesirable")):
        v = mask_view([ex], tok)
        p = Spans(v.html)
        assert p.texts["ftlab-badge"] == [word] and BADGES[word][1] in htmllib.unescape(v.html)
        assert v.summary().startswith(f"1 completion shown ({int(word == 'desirable')} desirable, "
                                      f"{int(word == 'undesirable')} undesirable)")
        colour = BADGES[word][0]
        assert f'<b style="color:{colour}">completion</b>' in v.html and f"border-top:3px solid {colour}" in v.html
        P, C = ex["prompt_ids"], ex["completion_ids"]
        assert [s["part"] for s in p.tokens] == ["ftlab-prompt"] * len(P) + ["ftlab-side-completion"] * len(C)
        assert "".join(s["text"] for s in p.tokens if s["part"] == "ftlab-prompt") == shown(tok.decode(P))
        assert "".join(s["text"] for s in p.tokens if s["part"] != "ftlab-prompt") == shown(tok.decode(C))
        assert source_row(ex)["completion"] in tok.decode(C) and source_row(ex)["prompt"] in tok.decode(P)
        assert [s["style"] == STYLE["trained"] for s in p.tokens] == [False] * len(P) + [True] * len(C)
        assert p.texts["ftlab-side-head"] == [f"completion · {len(C)}/{len(C)} tokens trained"]
        head = v.text().splitlines()[2]
        assert head == (f"── ftlab:data/kto.jsonl#{ex['row']} · {word} · prompt {len(P)} tokens, completion {len(C)}")
        assert v.samples[0].badges() == []   # the label is not a problem


def test_stepwise_colours_exactly_the_step_ends(prepared, tok):
    train = prepared["stepwise"].train
    ex = next(train[i] for i in range(len(train)) if 0 in train[i]["labels"] and 1 in train[i]["labels"])
    ids, labels = ex["input_ids"], ex["labels"]
    src = source_row(ex)
    assert row_kind(ex) == "stepwise"
    view = mask_view([ex], tok)
    s, p = view.samples[0], Spans(view.html)
    assert s.kind == "stepwise" and s.steps == [int(b) for b in src["labels"]]
    assert len(p.tokens) == len(ids)                                    # every token shown
    ends = [i for i, l in enumerate(labels) if l != IGNORE]
    assert len(ends) == len(src["completions"])
    for k, i in enumerate(ends):   # each labelled token closes its step
        assert tok.decode(ids[:i + 1]).endswith(src["completions"][k] + "\n")
    for i, (span, l) in enumerate(zip(p.tokens, labels)):
        if l == IGNORE:
            assert span["style"] in (STYLE["masked"], STYLE["special"]) and "not trained" in span["title"]
        else:
            kind = "correct" if l == 1 else "incorrect"
            assert span["style"] == STYLE[kind] and f"ftlab-{kind}" in span["cls"]
            assert span["title"] == f"#{i} id {ids[i]} · label {l} · {kind} step"
    assert STYLE["correct"] != STYLE["incorrect"] and "#8" in STYLE["correct"] and "#f4" in STYLE["incorrect"]
    marks = ["✓" if l == 1 else "✗" for l in s.steps]
    assert p.texts["ftlab-step-mark"] == marks
    c = s.steps.count(1)
    note = f"{len(ends)} steps labelled: {c} correct, {len(ends) - c} incorrect"
    assert p.texts["ftlab-sample-head"][0] == f"ftlab:data/stepwise.jsonl row {ex['row']} · {note} · {len(ids)} tokens"
    assert view.summary() == f"1 sample shown · {note} · {len(ids)} tokens" and "trained" not in view.summary()
    assert "ftlab-legend-correct" in view.html and "ftlab-legend-incorrect" in view.html
    assert "ftlab-legend-trained" not in view.html
    # Text: each step end in brackets followed by its mark; nothing else bracketed.
    t = view.text()
    body = t.split("\n\n", 1)[1].split("\n", 1)[1]
    assert re.findall(r"\[([^\]]*)\]([✓✗])", body) == [(shown(tok.decode([ids[i]])), m) for i, m in zip(ends, marks)]
    assert body.count("[") == len(ends)
    assert body.replace("]✓", "").replace("]✗", "").replace("[", "").replace("\n", "") == shown(tok.decode(ids))
    assert "\x1b[1;30;42m" in view.text(color=True) and "\x1b[1;30;41m" in view.text(color=True)
    # From a Prepared, as `Run.masks()` shows it.
    mv = masks_for(prepared["stepwise"], tok, n=4)
    assert [x.kind for x in mv.samples] == ["stepwise"] * 4 and mv.summary().startswith("4 samples shown · ")
    assert sum(len(x.steps) for x in mv.samples) == sum(l != IGNORE for r in train.select(range(4)) for l in r["labels"])


def test_row_kind_of_sft_rows(examples):
    assert {row_kind(ex) for ex in examples.values()} == {"sft"}
    assert row_kind(dict(input_ids=[1, 0, 1], labels=[IGNORE, 0, 1])) == "sft"   # labels repeat the ids
    assert row_kind(dict(input_ids=[5, 6, 7], labels=[IGNORE, 1, 0])) == "stepwise"
