"""The notebook's label-mask viewer: HTML spans agree token by token with the labels the strategies produce."""
import html as htmllib, subprocess, sys
from html.parser import HTMLParser
import pytest
from ftlab.strategies import STRATEGIES, StrategyContext, IGNORE
from ftlab.errors import FtlabError, Problem
from ftlab.maskview import STYLE, mask_view, masks_for, sample_html, sample_from, MaskView


class Spans(HTMLParser):
    "Token spans (class, style, title, text, inside <details>?), <details> summaries and warning texts of a view."
    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.tokens, self.summaries, self.warnings, self.other_styles = [], [], [], []
        self._stack, self._depth_details, self._cur, self._summary, self._warn = [], 0, None, None, None
        self.feed(text); self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = a.get("class", "") or ""
        self._stack.append(tag)
        if tag == "details": self._depth_details += 1
        if tag == "summary": self._summary = ""
        if tag == "div" and "ftlab-warning" in cls.split(): self._warn = ["", len(self._stack)]
        if tag == "span" and "ftlab-tok" in cls.split():
            self._cur = dict(cls=cls.split(), style=a.get("style"), title=a.get("title"), text="",
                             hidden=self._depth_details > 0)
        elif a.get("style"): self.other_styles.append((tag, cls, a["style"]))

    def handle_endtag(self, tag):
        if tag == "span" and self._cur is not None:
            self.tokens.append(self._cur); self._cur = None
        if tag == "summary": self.summaries.append(self._summary); self._summary = None
        if tag == "details": self._depth_details -= 1
        if tag == "div" and self._warn and self._warn[1] == len(self._stack):
            self.warnings.append(self._warn[0]); self._warn = None
        self._stack.pop()

    def handle_data(self, data):
        if self._cur is not None: self._cur["text"] += data
        if self._summary is not None: self._summary += data
        if self._warn is not None: self._warn[0] += data


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
