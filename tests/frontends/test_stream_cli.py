"""The streamed example config (axolotl's examples/streaming/pretrain.yaml, made local) through the `ftlab` command:
validate, preprocess (nothing to cache; the packed rows with --debug) and train."""
import json, re
from ftlab.cli import main

CONFIG = "ftlab:configs/tiny-pretrain.yaml"


def test_validate_and_preprocess_say_what_a_stream_is(capsys):
    assert main(["validate", CONFIG]) == 0
    assert "streamed from 1 source(s), effective batch 4" in capsys.readouterr().out
    assert main(["preprocess", CONFIG, "--debug", "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("nothing to cache: `pretraining_dataset` is streamed, tokenized and packed while training") == 1
    assert "packed rows of 128 tokens, each document attending only to itself" in out
    samples = out.split("\n── ")[1:]
    assert [s.split(" · ")[0] for s in samples] == ["stream#0", "stream#1"]
    for s in samples:      # each document after the first starts after a ‖, outside the trained brackets
        head, body = s.split("\n", 1)
        n = int(re.search(r"(\d+) documents \(‖ where each starts\)", head).group(1))
        assert n > 1 and body.count("]‖") == n - 1, s


def test_train_streams_the_example_config(tmp_path, capsys):
    assert main(["train", CONFIG, "--max-steps", "3", "--set", f"output_dir={tmp_path / 'out'}"]) == 0
    out = capsys.readouterr().out
    order = ["· opening the stream (1 source)", "· data: streamed from `ftlab:data/completion.jsonl`",
             "no row count: `max_steps` ends it", "effective 4 · 3 steps · 512 tokens per step, 1,536 in all",
             "training: 3 steps", "step 1 · loss", "saved checkpoint-3", "done:"]
    at = [out.index(s) for s in order]
    assert at == sorted(at), out
    saved = json.loads((tmp_path / "out" / "checkpoint-3" / "stream_position.json").read_text())
    assert saved["positions"][0]["rows"] == 3 * 2 * 2                     # steps x accumulation x micro-batch
