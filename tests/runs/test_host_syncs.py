"""bench/host_syncs.py: the calls that make the host wait for the GPU, counted by call site; and an SFT step on the tiny
model through bench/sft_bench.py, where the waits are the libraries' and none is ftlab's own."""
import importlib.util, json, sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def bench_module(name):
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_call_site_is_named_as_imported_from_site_packages_a_target_folder_or_the_repository(tmp_path, monkeypatch):
    "A package installed with `pip install --target DIR` (DIR on sys.path) is named like one in site-packages."
    hs = bench_module("host_syncs")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert hs.import_name(tmp_path / "site" / "trl" / "trainer" / "sft_trainer.py") == "trl/trainer/sft_trainer.py"
    assert hs.import_name(Path("/x/lib/python3.12/site-packages/transformers/trainer.py")) == "transformers/trainer.py"
    assert hs.import_name(ROOT / "bench" / "sft_bench.py") == "bench/sft_bench.py"       # not `sft_bench.py` from bench/
    assert hs.import_name(Path("/elsewhere/a/b.py")) == "a/b.py"
    # PyTorch's own frames are passed over on the way to the call site; a library in a virtual environment that has
    # `torch` in its path (`/opt/torch/.venv/...`) is not PyTorch
    torch_file = str(Path(torch.__file__).parent / "nn" / "modules" / "module.py")
    assert hs.in_torch(torch_file) and hs.torch_part(torch_file) == "nn/modules/module.py"
    assert not hs.in_torch("/opt/torch/.venv/lib/python3.12/site-packages/transformers/trainer.py")


def test_the_counter_sees_what_reads_a_value_or_a_data_dependent_shape_and_nothing_else():
    hs = bench_module("host_syncs")
    t = torch.arange(-3.0, 5.0)
    with hs.sync_counter() as mode:
        t + 1; t.sum(); t.view(2, 4); torch.where(t > 0, t, 0)          # noqa: B018 - queued work, no wait
        mode.counting = True
        t + 1; t.sum(); t.view(2, 4); torch.where(t > 0, t, 0)          # noqa: B018
        value = t.sum().item()
        positive = bool((t > 0).any())
        picked = t[t > 0]
        where_ = torch.nonzero(t)
        t.repeat_interleave(2)                                           # int repeats: the size is known
        spread = t.repeat_interleave(torch.full((8,), 2))                # tensor repeats: their sum is read
        mode.counting = False
        t.sum().item()                                                   # not counted any more
    assert (value, positive, picked.numel(), where_.numel(), spread.numel()) == (4.0, True, 4, 7, 16)
    assert sum(mode.calls.values()) == 5, mode.calls     # each once: `.item()` and `bool()` are one operator each
    assert sorted(k for (_, site, k) in mode.calls if site.startswith("tests/runs/test_host_syncs.py")) == \
        ["scalar", "scalar", "shape", "shape", "shape"], mode.calls
    summary = hs.summarize(mode, n_steps=2)
    assert summary["per_step"] == 2.5 and summary["sites"][0]["per_step"] == 0.5


def test_an_sft_step_waits_only_where_the_libraries_do(tmp_path):
    """Two measured LoRA steps of the tiny model, logging every step: TRL's per-step metrics and transformers' logging
    are there, and no call site is in ftlab or its kernels (the hot loop adds no wait of its own)."""
    sb = bench_module("sft_bench")
    out = tmp_path / "rows.jsonl"
    code = sb.main(["--model", "tiny", "--mode", "lora", "--impl", "ftlab", "--seq", "128", "--data", "packed",
                    "--device", "cpu", "--warmup", "1", "--steps", "3", "--cache", str(tmp_path / "cache"),
                    "--count-syncs", str(tmp_path / "syncs"), "--out", str(out)])
    row = json.loads(out.read_text())
    assert code == 0 and row["status"] == "ok", row.get("error")
    (md,) = (tmp_path / "syncs").glob("syncs-*.md")
    table = md.read_text()
    assert "trl/trainer/sft_trainer.py" in table and "_maybe_log_save_evaluate" in table, table
    assert row["host_syncs_per_step"] > 0 and set(row["host_syncs_by_source"]) <= {"trl", "transformers", "bench meter"}, table
    assert "ftlab/" not in table and "kernels/" not in table, table
