"""The `ftlab` command: exit codes, one-line messages, preprocess --debug, a short train."""
import pathlib, subprocess, sys, re
import pytest
from ftlab.cli import main

CONFIGS = pathlib.Path(__file__).parent / "configs"
BAD = sorted(CONFIGS.glob("bad_*.yaml"))


def expectations(path):
    "The `# expect: KEY @ LINE ~ TEXT` header lines of a fixture."
    return [m.groups() for m in re.finditer(r"^# expect: (\S+) @ (\d+|-)", path.read_text(), re.M)]


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_validate_bad_config_exits_2_with_key_and_line(path, capsys):
    code = main(["validate", str(path)])
    out = capsys.readouterr()
    assert code == 2 and out.out == ""
    assert "Traceback" not in out.err and out.err.startswith("error: ")
    for key, line in expectations(path):
        if key != "-": assert f"key `{key}`" in out.err, (key, out.err)
        if line != "-": assert f"line {line}" in out.err, (line, out.err)


def test_at_least_fifteen_malformed_configs():
    assert len([p for p in BAD if expectations(p)]) >= 15


def test_console_script_exit_codes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base_model: ftlab:tiny\nlearning_rate: -1\ndatasets:\n  - path: ftlab:data/chat.jsonl\n")
    exe = pathlib.Path(sys.executable).parent / "ftlab"
    r = subprocess.run([str(exe), "validate", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "line 2" in r.stderr and "learning_rate" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([str(exe), "validate", "ftlab:configs/tiny-lora.yaml"], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0 and r.stdout.startswith("ok:")


def test_preprocess_debug_shows_trained_tokens(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base_model: ftlab:tiny\nsequence_len: 256\noutput_dir: {tmp_path}/out\n"
                   "datasets:\n  - path: ftlab:data/chat.jsonl\n    type: chat_template\n    split: train[:20]\n")
    assert main(["preprocess", str(cfg), "--debug", "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "20 rows" in out and out.count("── sample") == 2
    # Not a terminal: trained tokens are shown in brackets, and each sample ends on a trained <|im_end|>.
    assert "<|im_end|>]" in out and "tokens trained" in out


def test_train_prints_first_and_last_loss(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base_model: ftlab:tiny\nadapter: lora\nlora_target_linear: true\nsequence_len: 256\n"
                   f"micro_batch_size: 4\nlearning_rate: 0.002\noutput_dir: {tmp_path}/out\n"
                   "datasets:\n  - path: ftlab:data/chat.jsonl\n    type: chat_template\n")
    assert main(["train", str(cfg), "--max-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "step 3 · loss" in out and re.search(r"done: .* loss \d+\.\d+ → \d+\.\d+", out)


def test_missing_config_file_is_one_message(capsys):
    assert main(["validate", "nope/does-not-exist.yaml"]) == 2
    err = capsys.readouterr().err
    assert "does-not-exist.yaml" in err and "Traceback" not in err
