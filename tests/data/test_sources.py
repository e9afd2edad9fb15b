"""Dataset sources: files of each format, folders, notebook objects, slices, and clear errors."""
import json
import pytest
from ftlab.sources import load_source, source_fingerprint
from ftlab.errors import DataError

ROWS = [{"instruction": f"Say {i}", "input": "", "output": str(i)} for i in range(10)]


def ds_cfg(make_cfg, path, extra=""):
    return make_cfg(datasets=f"  - path: '{path}'\n    type: alpaca\n{extra}").datasets[0]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_local_files(make_cfg, tmp_path, fmt):
    import pandas as pd
    p = tmp_path / f"rows.{fmt}"
    df = pd.DataFrame(ROWS)
    if fmt == "jsonl": p.write_text("\n".join(json.dumps(r) for r in ROWS))
    if fmt == "json": p.write_text(json.dumps(ROWS))
    if fmt == "csv": df.to_csv(p, index=False)
    if fmt == "parquet": df.to_parquet(p)
    ds = load_source(ds_cfg(make_cfg, p))
    assert len(ds) == 10 and str(ds[3]["output"]) == "3"


def test_folder_of_files_and_slice(make_cfg, tmp_path):
    d = tmp_path / "folder"; d.mkdir()
    for k in range(2):
        (d / f"part{k}.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[k * 5:(k + 1) * 5]))
    assert len(load_source(ds_cfg(make_cfg, d))) == 10
    assert len(load_source(ds_cfg(make_cfg, d, "    split: train[:30%]\n"))) == 3


def test_saved_dataset_folder(make_cfg, tmp_path):
    import datasets
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    assert len(load_source(ds_cfg(make_cfg, tmp_path / "saved"))) == 10


def test_notebook_objects(make_cfg):
    import pandas as pd, datasets
    cfg = ds_cfg(make_cfg, "@rows")
    for obj in (ROWS, pd.DataFrame(ROWS), datasets.Dataset.from_list(ROWS)):
        ds = load_source(cfg, {"rows": obj})
        assert len(ds) == 10 and ds[0]["instruction"] == "Say 0"


def test_missing_file_is_named(make_cfg, tmp_path):
    with pytest.raises(DataError) as e:
        load_source(ds_cfg(make_cfg, tmp_path / "nope.jsonl"))
    assert "nope.jsonl" in str(e.value) and "no such file" in str(e.value)


def test_hub_id_without_network_is_one_message(make_cfg):
    with pytest.raises(DataError) as e:
        load_source(ds_cfg(make_cfg, "someone/some-dataset-that-is-not-cached"))
    assert "someone/some-dataset-that-is-not-cached" in str(e.value) and "network" in str(e.value)


def test_fingerprint_follows_content(make_cfg):
    cfg = ds_cfg(make_cfg, "@rows")
    a = source_fingerprint(load_source(cfg, {"rows": ROWS}))
    assert a == source_fingerprint(load_source(cfg, {"rows": [dict(r) for r in ROWS]}))
    changed = [dict(r) for r in ROWS]; changed[9]["output"] = "nine"
    assert a != source_fingerprint(load_source(cfg, {"rows": changed}))


@pytest.mark.parametrize("content, expect", [
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', "line 2 is not valid JSON"),
    (b"", "the file is empty"),
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n', "line 2 is not UTF-8 text (byte 0xe9)"),
    (b'{"instruction": "a", "output": "b"}\n[1, 2]\n', "line 2 is a JSON list, not an object"),
])
def test_broken_data_files_name_the_line(make_cfg, tmp_path, content, expect):
    "What `datasets` reports as 'An error occurred while generating the dataset' or StopIteration, with the line."
    f = tmp_path / "rows.jsonl"; f.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_source(ds_cfg(make_cfg, f))
    assert expect in str(e.value) and "rows.jsonl" in str(e.value)
    assert "An error occurred" not in str(e.value) and "StopIteration" not in str(e.value)


def test_no_network_is_said_at_once_before_any_library_retries(make_cfg, monkeypatch):
    "HF_HUB_OFFLINE unset, the Hub unreachable, the model not cached: one message naming the key, no download tried."
    import socket, transformers, ftlab.hub
    from ftlab.run import Run
    from ftlab.errors import FtlabError
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(ftlab.hub, "_REACHABLE", {})
    def refused(*a, **k): raise OSError("network is unreachable")
    monkeypatch.setattr(socket, "create_connection", refused)
    def no_download(*a, **k): raise AssertionError("a library was asked to download")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_download)
    cfg = make_cfg().model_copy(update={"base_model": "someone/model-not-in-any-cache"})
    with pytest.raises(FtlabError) as e:
        Run(cfg).prepare()
    assert "someone/model-not-in-any-cache" in str(e.value) and "cannot be reached (no network)" in str(e.value)
    assert e.value.problems[0].key == "base_model"


def test_a_folder_without_data_files_says_what_it_holds(make_cfg, tmp_path):
    d = tmp_path / "task"; d.mkdir()
    (d / "task.toml").write_text("[a]\n"); (d / "notes.md").write_text("x\n")
    with pytest.raises(DataError) as e:
        load_source(ds_cfg(make_cfg, d))
    assert "holds no data files" in str(e.value) and "notes.md, task.toml" in str(e.value)
    assert "instruction.md" not in str(e.value)
