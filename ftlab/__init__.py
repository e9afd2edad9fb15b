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


def load_ipython_extension(ip):
    "`%load_ext ftlab`: registers `%%finetune` and `%ftlab`."
    from ftlab.magics import load_ipython_extension as load
    load(ip)
