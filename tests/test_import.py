"""Importing ftlab (and what `validate` needs) stays fast: no torch, transformers or TRL."""
import subprocess, sys, textwrap


def _modules_after(code: str) -> set:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code) + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_ftlab_does_not_import_torch():
    mods = _modules_after("import ftlab")
    assert "torch" not in mods and "transformers" not in mods and "trl" not in mods


def test_config_and_cli_do_not_import_torch():
    mods = _modules_after("import ftlab.config, ftlab.errors, ftlab.cli")
    assert "torch" not in mods and "datasets" not in mods


def test_the_engine_loads_no_notebook_package():
    """The engine runs where the notebook packages are not installed (the GPU machine, a scheduler job): importing it,
    every method family included, loads none of them."""
    mods = _modules_after("import ftlab.run, ftlab.methods, ftlab.inference, ftlab.prepare, ftlab.model, ftlab.cli")
    assert "ftlab.methods.grpo" in mods and not mods & {"IPython", "ipywidgets", "plotly"}


def test_kernels_ship_as_subpackage():
    mods = _modules_after("import ftlab.kernels")
    assert "ftlab.kernels" in mods and "kernels" not in mods


def test_kernels_import_from_an_uninstalled_source_checkout():
    """With the repo on PYTHONPATH and nothing installed (as on a bare GPU machine), ftlab.kernels still imports."""
    import pathlib
    repo = pathlib.Path(__file__).resolve().parent.parent
    code = (f"import sys; sys.path.insert(0, {str(repo)!r}); import ftlab.kernels; "
            "print(ftlab.kernels.__file__); print('kernels' in sys.modules)")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True, cwd="/")
    path, top = out.stdout.split()
    assert path == str(repo / "kernels" / "__init__.py") and top == "False"
