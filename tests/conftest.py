"""Shared fixtures: everything runs offline on the embedded tiny model."""
import os, sys

# No network in tests, and prepared-data caches under a throwaway folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


def pytest_collection_modifyitems(config, items):
    "Tests marked `gpu` run where CUDA is (the GPU machine) and are skipped, saying so, everywhere else."
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu: return
    import torch
    if torch.cuda.is_available(): return
    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA GPU")
    for item in gpu: item.add_marker(skip)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FTLAB_CACHE", str(tmp_path_factory.getbasetemp() / "ftlab-cache"))


@pytest.fixture(scope="session")
def tok():
    from ftlab.config import load_config
    from ftlab.tokenizer import load_tokenizer
    return load_tokenizer(load_config("base_model: ftlab:tiny\ndatasets: [{path: ftlab:data/chat.jsonl}]"))


@pytest.fixture
def make_cfg(tmp_path):
    """A config on the tiny model from YAML fragments; output under tmp_path."""
    from ftlab.config import load_config

    def make(extra: str = "", datasets: str = "  - path: ftlab:data/chat.jsonl\n    type: chat_template\n", **kw):
        text = (f"base_model: ftlab:tiny\noutput_dir: {tmp_path / 'out'}\nsequence_len: 256\n"
                f"datasets:\n{datasets}{extra}")
        return load_config(text, **kw)
    return make
