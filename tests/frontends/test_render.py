"""scripts/render_notebook.py: execute a notebook in a real kernel and write one self-contained HTML page."""
import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from browser_helpers import (LOSS_FINAL, LR_VALUES, MASK_COLOURS, N_MASK_VIEWS, N_TRAINED_PER_VIEW, ROOT,
                             write_synthetic_notebook)

RENDER = ROOT / "scripts" / "render_notebook.py"


def render(nb: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RENDER), str(nb), *args], capture_output=True, text=True,
                          timeout=timeout)


def values(v):
    """A plotly array as a list: plain JSON lists, or plotly's base64 typed arrays {"dtype", "bdata"}."""
    if isinstance(v, dict) and "bdata" in v:
        import numpy as np
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"])).tolist()
    return list(v)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    d = tmp_path_factory.mktemp("render")
    nb = write_synthetic_notebook(d / "nbs" / "synthetic.ipynb")
    out, executed = d / "site" / "synthetic.html", d / "executed.ipynb"
    r = render(nb, "--out", str(out), "--executed", str(executed), "--timeout", "120")
    assert r.returncode == 0, r.stdout + r.stderr
    assert str(out) in r.stdout
    return {"html": out.read_text(encoding="utf-8"), "executed": executed, "out": out}


def figures(page: str) -> list[dict]:
    pattern = r'<script type="application/json" id="plotly-[0-9a-f]+-fig">(.*?)</script>'
    return [json.loads(m) for m in re.findall(pattern, page, re.S)]


def test_plotlyjs_inlined_exactly_once(rendered):
    from plotly.offline import get_plotlyjs
    page = rendered["html"]
    assert page.count(get_plotlyjs()) == 1
    assert len(re.findall(r"\* plotly\.js v\d", page)) == 1  # the library's banner


def test_one_newplot_per_chart_with_the_updated_figure(rendered):
    page = rendered["html"]
    assert page.count("Plotly.newPlot(") == 2
    loss, lr = figures(page)
    assert loss["layout"]["title"]["text"] == "train loss (step 8)"
    assert values(loss["data"][0]["y"]) == pytest.approx(LOSS_FINAL)
    assert values(loss["data"][0]["x"]) == list(range(1, len(LOSS_FINAL) + 1))
    assert values(lr["data"][0]["y"]) == pytest.approx(LR_VALUES)
    # The first version of the updated chart is gone, and the bundles' HTML fallbacks are not what is shown.
    assert [f["layout"]["title"]["text"] for f in figures(page)] == ["train loss (step 8)", "learning rate"]
    assert "<div class='ftlab-chart-fallback'>" not in page
    # Each newPlot draws into its own div, which exists
    for div_id in re.findall(r'Plotly\.newPlot\("(plotly-[0-9a-f]+)"', page):
        assert f'<div id="{div_id}" class="plotly-graph-div"' in page


def test_mask_spans_are_kept_as_they_are(rendered):
    page = rendered["html"]
    trained = re.findall(r'<span class="ftlab-tok ftlab-trained" style="([^"]*)"', page)
    assert len(trained) == N_TRAINED_PER_VIEW * N_MASK_VIEWS
    assert all(f"background:{MASK_COLOURS['trained']}" in style for style in trained)
    assert page.count('class="ftlab-tok ftlab-masked"') > 0 and page.count('class="ftlab-tok ftlab-special"') > 0
    assert "<details open><summary>sample 2" in page


def test_page_is_a_single_file(rendered):
    page = rendered["html"]
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"<script[^>]*\ssrc=", page, re.I)
    assert not re.search(r"<link\b", page, re.I)
    assert not re.search(r"""\ssrc=["']?(?!data:)""", page, re.I)
    assert not re.search(r"@import|url\(\s*['\"]?https?:", page, re.I)
    # markdown, code and stream output are there too
    assert "<strong>live chart</strong>" in page and "<table>" in page
    assert 'class="highlight"' in page and "trained 8 steps" in page


def test_executed_notebook_holds_the_last_figure(rendered):
    import nbformat
    nb = nbformat.read(str(rendered["executed"]), as_version=4)
    bundles = [o["data"]["application/vnd.plotly.v1+json"] for c in nb.cells if c.cell_type == "code"
               for o in c.outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(bundles) == 2
    assert values(bundles[0]["data"][0]["y"]) == pytest.approx(LOSS_FINAL)
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code")


def test_kernel_is_this_python_in_the_notebook_folder_and_directives_apply(tmp_path):
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
    folder = tmp_path / "lesson"
    folder.mkdir()
    (folder / "data.txt").write_text("local file")
    nb = new_notebook(cells=[
        new_markdown_cell("# Where am I"),
        new_code_cell("import os, sys\nprint('CWD=' + os.getcwd())\nprint('PREFIX=' + sys.prefix)\n"
                      "print(open('data.txt').read())"),
        new_code_cell("#| hide\nprint('HIDDEN-CELL')"),
        new_code_cell("#| echo: false\nprint('SHOWN-' + 'OUTPUT')"),
        new_code_cell("#| output: false\nprint('HIDDEN-' + 'OUTPUT')"),
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, str(folder / "where.ipynb"))
    r = render(folder / "where.ipynb")
    assert r.returncode == 0, r.stdout + r.stderr
    page = (folder / "where.html").read_text()  # default output: next to the notebook
    assert f"CWD={folder.resolve()}" in page
    assert f"PREFIX={sys.prefix}" in page
    assert "local file" in page
    assert "HIDDEN-CELL" not in page
    assert "SHOWN-OUTPUT" in page and "#| echo" not in page and "SHOWN-&#x27; + &#x27;OUTPUT" not in page
    assert "HIDDEN-OUTPUT" not in page
    assert "Plotly" not in page  # no chart: no plotly.js


def test_failing_cell_prints_the_notebooks_own_error_and_exits_1(tmp_path):
    nb = write_synthetic_notebook(tmp_path / "broken.ipynb", failing=True)
    executed = tmp_path / "broken.executed.ipynb"
    r = render(nb, "--executed", str(executed))
    assert r.returncode == 1
    err = r.stderr
    assert "cell 7 of 8 failed" in err
    assert "load_rows(3)" in err  # the cell's source
    assert "NameError: name 'rows' is not defined" in err
    assert "Cell In[" in err  # IPython's traceback of the cell
    for internal in ("nbclient", "CellExecutionError", "site-packages", "\x1b["):
        assert internal not in err, internal
    import nbformat
    after = nbformat.read(str(executed), as_version=4).cells[-1]  # the cell after the failing one did not run
    assert after.source == "print('never runs')" and after.outputs == [] and not after.execution_count
    page = (tmp_path / "broken.html").read_text()
    assert "NameError" in page and "train loss (step 8)" in page


def test_missing_notebook_is_a_usage_error(tmp_path):
    r = render(tmp_path / "nope.ipynb")
    assert r.returncode == 2 and "no such notebook" in r.stderr


def test_cell_past_the_timeout_is_reported(tmp_path):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook
    nbformat.write(new_notebook(cells=[new_code_cell("import time\ntime.sleep(60)")],
                                metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}}),
                   str(tmp_path / "slow.ipynb"))
    r = render(tmp_path / "slow.ipynb", "--timeout", "2")
    assert r.returncode == 1
    assert "cell 1 of 1 failed" in r.stderr and "ran longer than --timeout 2 s" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_reply_streamed_token_by_token_is_one_block(tmp_path):
    "`print(token, end='', flush=True)` per token (how `Run.chat` streams) reads as one reply, not a line per token."
    import nbformat
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import time, sys\nfor t in ['= ', '7', ' and', ' done']:\n    print(t, end='', flush=True); time.sleep(0.2)\n"
        "print(' (stderr)', file=sys.stderr)")])
    path = tmp_path / "stream.ipynb"; nbformat.write(nb, path)
    out, executed = tmp_path / "stream.html", tmp_path / "stream.executed.ipynb"
    r = render(path, "--out", str(out), "--executed", str(executed))
    assert r.returncode == 0, r.stdout + r.stderr
    streams = [o for o in nbformat.read(executed, 4).cells[0].outputs if o.get("name") == "stdout"]
    assert len(streams) > 1                                         # the kernel did send the tokens one by one
    page = out.read_text()
    assert '<pre class="stdout">= 7 and done</pre>' in page and page.count('<pre class="stdout">') == 1
