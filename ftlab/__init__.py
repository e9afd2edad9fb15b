"""ftlab: fine-tune LLMs from a notebook cell.

Importing ftlab is cheap: torch, transformers and TRL load only when a run needs them, and `%load_ext ftlab`
registers the magics without loading them either.
"""
__version__ = "0.1.0"

# Public names, imported on first use so that `import ftlab` stays fast.
_LAZY = {"Run": "ftlab.run", "load_config": "ftlab.config", "Config": "ftlab.config",
         "ConfigEditor": "ftlab.editor", "FtlabError": "ftlab.errors"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ftlab' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


def _map_source_kernels():
    "Run from a source checkout that is not installed (the repo on PYTHONPATH), `kernels/` is `ftlab.kernels` too."
    import importlib.util, os, sys
    name = f"{__name__}.kernels"
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels", "__init__.py")
    if name in sys.modules or not os.path.exists(src) or importlib.util.find_spec(name) is not None: return
    spec = importlib.util.spec_from_file_location(name, src, submodule_search_locations=[os.path.dirname(src)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module  # what the import system does for a submodule it found itself


_map_source_kernels()


def load_ipython_extension(ip):
    "`%load_ext ftlab`: registers `%%finetune` and `%ftlab`."
    from ftlab.magics import load_ipython_extension as load
    load(ip)
