"""The tutorials are documentation that runs: each executes in a real Jupyter kernel and shows what it promises."""
import pathlib, shutil
import nbformat, pytest
from nbclient import NotebookClient

TUTORIALS = pathlib.Path(__file__).parent.parent / "nbs" / "tutorials"


def execute(name, tmp_path):
    src = TUTORIALS / f"{name}.ipynb"
    work = tmp_path / name; work.mkdir()
    nb = nbformat.read(src, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
    return nb, work


def outputs(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def html(nb):
    return "\n".join(o.get("data", {}).get("text/html", "") for o in outputs(nb))


def text(nb):
    return "".join(o.get("text", "") for o in outputs(nb) if o.get("output_type") == "stream")


def test_quickstart(tmp_path):
    nb, work = execute("quickstart", tmp_path)
    charts = [o["data"]["application/vnd.plotly.v1+json"] for o in outputs(nb)
              if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(charts) >= 2  # the live dashboard (final state) and Run.load(...).plot()
    loss = next(t for t in charts[0]["data"] if t["name"] == "loss: train")
    assert loss["x"][-1] == 60 and loss["y"][-1] < loss["y"][0]
    h = html(nb)
    assert "ftlab-plan" in h and "ftlab-tok ftlab-trained" in h and "finished at step 60" in h
    assert (work / "outputs" / "quickstart" / "metrics.jsonl").exists()
    t = text(nb)
    assert "= 7" in t  # r.chat answers in the format it was fine-tuned on
    assert "Warning" not in t and "Failed to load" not in t  # library noise stays out of the cells


def test_label_masks(tmp_path):
    nb, _ = execute("label_masks", tmp_path)
    h = html(nb)
    assert h.count("ftlab-plan") == 5 and "ftlab-tok ftlab-trained" in h and "ftlab-tok ftlab-special" in h
    assert "will not learn to stop" in h
