"""The tutorials are documentation that runs: each executes in a real Jupyter kernel and shows what it promises."""
import pathlib, re, shutil
import nbformat, pytest
from nbclient import NotebookClient

TUTORIALS = pathlib.Path(__file__).resolve().parents[2] / "nbs" / "tutorials"


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
    assert loss["x"][-1] == 200 and loss["y"][-1] < loss["y"][0]
    h = html(nb)
    assert "ftlab-plan" in h and "ftlab-tok ftlab-trained" in h and "finished at step 200" in h
    assert (work / "outputs" / "quickstart" / "metrics.jsonl").exists()
    t = text(nb)
    assert "= 7" in t and "sun cat red" in t  # r.chat answers in the format it was fine-tuned on, and reverses words
    assert "Warning" not in t and "Failed to load" not in t  # library noise stays out of the cells


def test_label_masks(tmp_path):
    nb, _ = execute("label_masks", tmp_path)
    h = html(nb)
    assert h.count("ftlab-plan") == 5 and "ftlab-tok ftlab-trained" in h and "ftlab-tok ftlab-special" in h
    assert "will not learn to stop" in h


def charts_of(nb):
    return [o["data"]["application/vnd.plotly.v1+json"] for o in outputs(nb)
            if "application/vnd.plotly.v1+json" in o.get("data", {})]


def series(chart, name):
    return next(t for t in chart["data"] if t["name"] == name)


def test_dpo(tmp_path):
    nb, work = execute("dpo", tmp_path)
    h, t = html(nb), text(nb)
    assert "ftlab-plan" in h and "finished at step 40" in h
    assert "chosen" in h and "rejected" in h and "ftlab-tok ftlab-trained" in h      # the pair view
    margin = series(charts_of(nb)[-1], "reward margin: train")
    assert margin["x"][-1] == 40 and sum(margin["y"][-5:]) / 5 > sum(margin["y"][:5]) / 5 + 1
    acc = series(charts_of(nb)[-1], "reward accuracy: eval")
    assert acc["y"][-1] > 0.6                                                          # held-out pairs, chance 0.5
    assert "held-out accuracy" in t and "8" in t                                       # the chat answers "6 plus 2 is 8."
    assert (work / "outputs" / "dpo" / "adapter_model.safetensors").exists()
    assert "Warning" not in t and "Failed to load" not in t


def test_reward_model(tmp_path):
    nb, work = execute("reward_model", tmp_path)
    h, t = html(nb), text(nb)
    acc = series(charts_of(nb)[0], "pair accuracy (chosen scored higher): eval")
    assert acc["y"][-1] > 0.7
    assert "eval_accuracy" in t and "finished at step 40" in h
    assert "ftlab-plan" in h and "correct" in h and "incorrect" in h                   # the PRM dry run's step labels
    assert not (work / "outputs" / "prm").exists() or not any((work / "outputs" / "prm").iterdir())


def test_grpo(tmp_path):
    nb, work = execute("grpo", tmp_path)
    h, t = html(nb), text(nb)
    # the broken reward function is stopped before training, with the column it wanted and the fix
    assert "reads column &#x27;solution&#x27;" in h or "reads column 'solution'" in h
    assert not (work / "outputs" / "grpo-broken" / "metrics.jsonl").exists() or \
        not any('"event": "log"' in l for l in open(work / "outputs" / "grpo-broken" / "metrics.jsonl"))
    chart = charts_of(nb)[-1]
    reward = series(chart, "reward (total): mean")
    assert reward["x"][-1] == 150
    first, last = sum(reward["y"][:25]) / 25, sum(reward["y"][-25:]) / 25
    assert last > first + 0.2, (first, last)                         # the accuracy reward visibly rises
    assert any(s["name"] == "reward per function: exact_count mean" for s in chart["data"])
    assert "ftlab-completions" in h and "exact_count" in h and "advantage" in h   # the completions view
    assert "── step 1" in t and "Count from" in t                      # the first step is kept for comparison
    assert "Warning" not in t and "Failed to load" not in t


def test_ebft(tmp_path):
    nb, work = execute("ebft", tmp_path)
    h, t = html(nb), text(nb)
    assert "ftlab-plan" in h and "finished at step 40" in h and "finished at step 4" in h
    m = re.search(r"held-out answers: (\d+)% → (\d+)% exact, token overlap ([\d.]+) → ([\d.]+)", t)
    assert m and int(m[2]) > int(m[1]) and float(m[4]) > float(m[3])      # measured on prompts it did not train on
    assert "alignment" in h and "diversity" in h and "reference" in h       # the completions views
    assert 'class="ftlab-anchor"' in h                                      # the strided mask view
    assert (work / "outputs" / "ebft" / "adapter_model.safetensors").exists()
    assert (work / "outputs" / "ebft-strided" / "completions.jsonl").exists()
    assert "Warning" not in t and "Failed to load" not in t


def test_pretraining(tmp_path):
    nb, work = execute("pretraining", tmp_path)
    h, t = html(nb), text(nb)
    m = re.search(r"training loss ([\d.]+) → ([\d.]+) .*; held-out loss ([\d.]+) → ([\d.]+)", t)
    assert m and float(m[2]) < float(m[1]) and float(m[4]) < float(m[3])     # measured on logs it did not train on
    assert "ftlab-plan" in h and "finished at step 40" in h and "streamed from" in h and "tokens per step" in h
    assert 'class="ftlab-doc"' in h and "documents (‖ where each starts)" in h     # the packed rows, their boundaries
    assert "the stream goes on where checkpoint-40 left it (160 rows in" in t
    assert (work / "outputs" / "pretrain" / "checkpoint-50" / "stream_position.json").exists()
    assert "Warning" not in t and "Failed to load" not in t
