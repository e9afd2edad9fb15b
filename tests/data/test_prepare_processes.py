"""`dataset_processes`: the strategy step in worker processes gives what one process gives (rows, their order, the mask
report, the notes), a bad row still names its own index, and the prepared data is cached whatever the count."""
import json
import pytest
from ftlab.config import load_config
from ftlab.errors import DataError
from ftlab.prepare import MIN_CHUNK, prepare_datasets, run_strategy

DATASETS = """datasets:
  - path: ftlab:data/chat.jsonl
    type: chat_template
  - path: ftlab:data/alpaca.jsonl
    type: alpaca
  - path: "@rows"
    type: chat_template
"""
# rows with a role the chat template does not know: the report names them, by their row numbers
ODD = [{"messages": [{"role": "robot" if i % 5 == 0 else "user", "content": f"hi {i}"},
                     {"role": "assistant", "content": f"hello {i}"}]} for i in range(3 * MIN_CHUNK)]


def cfg_with(tmp_path, extra=""):
    return load_config(f"base_model: ftlab:tiny\nsequence_len: 96\ndataset_prepared_path: {tmp_path / 'cache'}\n"
                       f"val_set_size: 0.1\n{DATASETS}{extra}")


def test_worker_processes_prepare_exactly_what_one_process_does(tmp_path, tok):
    ns = {"rows": ODD}
    one = prepare_datasets(cfg_with(tmp_path), tok, ns, use_cache=False)
    two = prepare_datasets(cfg_with(tmp_path, "dataset_processes: 2\n"), tok, ns, use_cache=False)
    assert one.train.to_list() == two.train.to_list() and one.eval.to_list() == two.eval.to_list()   # rows, order, split
    assert one.report.to_dict() == two.report.to_dict()                     # counts, troubled rows, notes
    assert len(one.report.unknown_roles) == len(range(0, len(ODD), 5)) and one.report.unknown_roles[1].startswith("@rows#5 ")
    assert one.warnings() and one.warnings() == two.warnings()


def pid_of(row, ctx):
    "A strategy that says which process ran it."
    import os
    return [{"pid": os.getpid()}]


def test_the_work_is_done_in_other_processes(tok):
    import os
    cfg = load_config("base_model: ftlab:tiny\ndatasets: [{path: '@rows', type: chat_template}]")
    got, _, _ = run_strategy(pid_of, ODD, cfg.datasets[0], cfg, tok, "@rows", processes=2)
    pids = {ex["pid"] for _, exs in got for ex in exs}
    assert [i for i, _ in got] == list(range(len(ODD))) and 1 <= len(pids) <= 2 and os.getpid() not in pids
    got, _, _ = run_strategy(pid_of, ODD[:MIN_CHUNK], cfg.datasets[0], cfg, tok, "@rows", processes=2)
    assert {ex["pid"] for _, exs in got for ex in exs} == {os.getpid()}     # too few rows to pay for a process


def test_a_bad_row_in_a_worker_names_its_own_index(tmp_path, tok):
    rows = [{"instruction": f"say {i}", "output": str(i)} for i in range(3 * MIN_CHUNK)]
    rows[77] = {"instruction": "say nothing"}
    cfg = load_config("base_model: ftlab:tiny\ndataset_processes: 2\ndatasets: [{path: '@rows', type: alpaca}]")
    with pytest.raises(DataError) as e: prepare_datasets(cfg, tok, {"rows": rows}, use_cache=False)
    assert e.value.problems[0].message.startswith("row 77: no `output` value") and e.value.problems[0].source == "@rows"


def test_the_cache_is_reused_whatever_the_number_of_processes(tmp_path, tok):
    ns = {"rows": ODD}
    first = prepare_datasets(cfg_with(tmp_path, "dataset_processes: 2\n"), tok, ns)
    again = prepare_datasets(cfg_with(tmp_path), tok, ns)
    assert not first.cached and again.cached and again.path == first.path
    assert again.train.to_list() == first.train.to_list() and again.report.to_dict() == first.report.to_dict()
