"""The README's own examples, run as written: the notebook cells in a real kernel, the Python block as a script."""
import pathlib, re, subprocess, sys
import nbformat
from nbclient import NotebookClient

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def blocks(section: str) -> list[tuple[str, str]]:
    "The fenced code blocks (language, code) of one `## section` of the README."
    text = README.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w*)\n(.*?)```", body, re.S)


def test_the_notebook_example_answers_as_the_readme_says(tmp_path):
    cells = [code for lang, code in blocks("In a notebook") if lang in ("python", "yaml")]
    assert cells[0].startswith("%load_ext ftlab") and cells[1].startswith("%%finetune") and "r.chat(" in cells[2]
    claim = re.search(r'r\.chat\("([^"]+)"\)\s+# the fine-tuned adapter answers "([^"]+)"', cells[2])
    assert claim, "the README's chat line and its claimed answer"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c.strip()) for c in cells])
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    chat_out = "".join(o.get("text", "") for o in nb.cells[2].outputs if o.get("output_type") == "stream")
    assert claim.group(2) in chat_out, chat_out                       # e.g. "= 7" for "What is 3 plus 4?"
    merged = re.search(r'r\.merge\("([^"]+)"\)', cells[2]).group(1)
    assert (tmp_path / merged / "config.json").exists() and not (tmp_path / merged / "adapter_config.json").exists()


def test_the_python_example_runs_as_a_script(tmp_path):
    (code,) = [c for lang, c in blocks("From Python") if lang == "python"]
    script = tmp_path / "example.py"
    script.write_text(code + "\nassert run.state == 'finished', run.state\nprint('steps', len(run.history))\n")
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    steps = int(re.search(r"max_steps: (\d+)", code).group(1))
    assert f"steps {steps}" in r.stdout
