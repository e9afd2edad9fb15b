"""Real-browser checks: headless Chromium opens an executed notebook in JupyterLab (and the offline page from
scripts/render_notebook.py) and confirms that the plotly charts are drawn and the label-mask token spans are coloured.

Needs Debian's chromium (scripts/ensure_browser.sh installs it) and jupyterlab. Without them the tests skip, unless
FTLAB_REQUIRE_BROWSER=1, where they fail. Screenshots and reports go to $FTLAB_ARTIFACTS (default tests/artifacts/).
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from browser_helpers import (ARTIFACTS, JUPYTERLAB_SCOPE, JUPYTERLAB_SCROLLER, LOSS_FINAL, LR_VALUES, MASK_COLOURS,
                             N_MASK_VIEWS, N_TRAINED_PER_VIEW, ROOT, Chromium, check_page, find_chromium,
                             serve_notebook, write_synthetic_notebook)

REQUIRED = os.environ.get("FTLAB_REQUIRE_BROWSER") == "1"
N_TRAINED = N_TRAINED_PER_VIEW * N_MASK_VIEWS
TRAINED_RGB = "rgb({}, {}, {})".format(*(int(MASK_COLOURS["trained"][i:i + 2], 16) for i in (1, 3, 5)))


def _missing(what: str):
    msg = f"{what}; run `bash scripts/ensure_browser.sh` and install the dev extra"
    if REQUIRED:
        pytest.fail(f"FTLAB_REQUIRE_BROWSER=1 but {msg}", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    exe = find_chromium()
    if not exe:
        _missing("no Chromium at /usr/bin/chromium (or $FTLAB_CHROMIUM)")
    b = Chromium(exe, tmp_path_factory.mktemp("chromium"))
    yield b
    b.close()  # Browser.close, then the process group and every descendant


@pytest.fixture(scope="module")
def lab(executed, tmp_path_factory):
    """JupyterLab serving the executed notebook; yields the notebook's URL."""
    if importlib.util.find_spec("jupyterlab") is None:
        _missing("jupyterlab is not installed")
    server, url = serve_notebook(executed["notebook"], tmp_path_factory.mktemp("jupyterlab"))
    yield url
    server.stop()  # /api/shutdown (kernels too), then the process group and every descendant


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The synthetic notebook (plus a cell probing the HTML sanitizer), executed and rendered by the script."""
    d = tmp_path_factory.mktemp("browser-nb")
    nb = write_synthetic_notebook(d / "synthetic.ipynb", sanitizer_probe=True)
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "render_notebook.py"), str(nb), "--out",
                        str(d / "synthetic.html"), "--executed", str(d / "synthetic.executed.ipynb")],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    return {"notebook": d / "synthetic.executed.ipynb", "page": d / "synthetic.html"}


def _save(report: dict, name: str):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / name).write_text(json.dumps(report, indent=1))


def _check_plots(report: dict):
    plots = report["plots"]
    assert len(plots) == 2, plots
    for p in plots:
        assert p["svg"] and p["traces"] >= 1 and p["lines"] >= 1, p
        assert p["width"] > 200 and p["height"] > 200, p
    loss, lr = plots
    assert loss["title"] == "train loss (step 8)"  # the figure as last updated through its display_id
    assert loss["points"] == len(LOSS_FINAL)
    assert loss["data"][0]["y"] == pytest.approx(LOSS_FINAL)
    assert lr["data"][0]["y"] == pytest.approx(LR_VALUES)


def _check_spans(report: dict):
    trained = report["trained"]
    assert len(trained) == N_TRAINED
    assert all(s["coloured"] and s["background"] == TRAINED_RGB for s in trained), trained
    assert report["masked"] and all(s["coloured"] for s in report["masked"])
    assert report["special"] and all(s["coloured"] for s in report["special"])


def test_jupyterlab_renders_chart_and_mask_view(browser, lab):
    shot = ARTIFACTS / "jupyterlab-synthetic.png"
    report = check_page(browser, lab, shot, n_plots=2, n_trained=N_TRAINED, timeout=45, scroller=JUPYTERLAB_SCROLLER,
                        scope=JUPYTERLAB_SCOPE)
    _save(report, "jupyterlab-synthetic.json")
    assert shot.is_file() and shot.stat().st_size > 10_000
    _check_plots(report)
    assert report["fallback_divs"] == 0  # plotly's renderer was used, not the bundle's text/html fallback
    _check_spans(report)

    # The notebook was opened untrusted (as one from disk is): its HTML went through the sanitizer, which
    # dropped <style> and <script> and kept the inline colours that the mask view relies on.
    probes = report["probes"]
    assert report["style_tags_in_outputs"] == 0 and probes["style-tag"]["background"] == "rgba(0, 0, 0, 0)"
    assert report["document_title"] != "probe-script-ran"
    for name in ("background-shorthand-hex", "background-color-hex", "full-token-style"):
        assert probes[name]["background"] == TRAINED_RGB, (name, probes[name])
    assert probes["full-token-style"]["style"].count(";") == 4  # all five declarations kept


def test_offline_page_renders_chart_and_mask_view(browser, executed):
    shot = ARTIFACTS / "static-synthetic.png"
    report = check_page(browser, executed["page"].resolve().as_uri(), shot, n_plots=2, n_trained=N_TRAINED, timeout=30)
    _save(report, "static-synthetic.json")
    assert shot.is_file() and shot.stat().st_size > 10_000
    assert not report["page_errors"], report["page_errors"]
    _check_plots(report)
    _check_spans(report)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The quickstart tutorial, executed in a real kernel by render_notebook.py (in a copy, so outputs/ stays out of nbs/)."""
    import shutil
    d = tmp_path_factory.mktemp("quickstart")
    shutil.copy(ROOT / "nbs" / "tutorials" / "quickstart.ipynb", d / "quickstart.ipynb")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "render_notebook.py"), str(d / "quickstart.ipynb"),
                        "--out", str(d / "quickstart.html"), "--executed", str(d / "quickstart.executed.ipynb")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return {"notebook": d / "quickstart.executed.ipynb", "page": d / "quickstart.html"}


def test_quickstart_tutorial_renders_in_jupyterlab(browser, quickstart, tmp_path_factory):
    """The executed quickstart, opened in JupyterLab: the live dashboard's chart and Run.load's chart are drawn,
    and the plan's label-mask preview shows coloured trained tokens."""
    import nbformat
    if importlib.util.find_spec("jupyterlab") is None:
        _missing("jupyterlab is not installed")
    nb = nbformat.read(quickstart["notebook"], as_version=4)
    html = "".join(o.get("data", {}).get("text/html", "") for c in nb.cells for o in c.get("outputs", []))
    n_trained = html.count("ftlab-tok ftlab-trained")
    assert n_trained > 0
    server, url = serve_notebook(quickstart["notebook"], tmp_path_factory.mktemp("jupyterlab-quickstart"))
    try:
        shot = ARTIFACTS / "jupyterlab-quickstart.png"
        report = check_page(browser, url, shot, n_plots=2, n_trained=n_trained, timeout=60,
                            scroller=JUPYTERLAB_SCROLLER, scope=JUPYTERLAB_SCOPE)
    finally:
        server.stop()
    _save(report, "jupyterlab-quickstart.json")
    assert shot.is_file() and shot.stat().st_size > 10_000
    assert len(report["plots"]) == 2 and all(p["svg"] and p["traces"] >= 4 for p in report["plots"]), report["plots"]
    assert report["fallback_divs"] == 0
    assert len(report["trained"]) == n_trained and all(s["coloured"] for s in report["trained"])
