"""The terminal dashboard for real: `ftlab train --tui` and `ftlab watch` in a tmux pseudo-terminal, read back from the screen."""
import json, os, pathlib, re, shlex, shutil, subprocess, sys, time
import pytest
from ftlab.cli import main
from ftlab.events import format_record, read_metrics

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux for a real pseudo-terminal")
EXE = pathlib.Path(sys.executable).parent / "ftlab"
ENV = {k: os.environ[k] for k in ("PATH", "PYTHONPATH", "HOME", "HF_HOME", "FTLAB_CACHE") if k in os.environ}


class Terminal:
    "A command in its own tmux server (a private socket) on a 120x50 screen; `screen()` is what a person sees."
    def __init__(self, cmd, cwd):
        self.sock = f"ftlab-test-{os.getpid()}-{time.monotonic_ns()}"
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in {**ENV, "TERM": "xterm-256color", "HF_HUB_OFFLINE": "1",
                                                             "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}.items())
        line = f"cd {shlex.quote(str(cwd))} && env {env} {cmd}; echo EXIT=$?; sleep 600"
        subprocess.run(["tmux", "-L", self.sock, "-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", "120", "-y", "50",
                        line], check=True)

    def screen(self, history=False) -> str:
        return subprocess.run(["tmux", "-L", self.sock, "capture-pane", "-p", "-t", "t"] + (["-S", "-300"] if history else []),
                              capture_output=True, text=True).stdout

    def keys(self, *k): subprocess.run(["tmux", "-L", self.sock, "send-keys", "-t", "t", *k], check=True)

    def wait(self, pattern, timeout=180, history=False) -> str:
        end = time.time() + timeout
        while time.time() < end:
            s = self.screen(history)
            if re.search(pattern, s): return s
            time.sleep(0.3)
        raise AssertionError(f"{pattern!r} never appeared; screen:\n{self.screen(True)}")

    def close(self): subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True)


def config(tmp_path, extra=""):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base_model: ftlab:tiny\nadapter: lora\nlora_target_linear: true\nsequence_len: 256\nmicro_batch_size: 4\n"
                   f"learning_rate: 0.002\nlogging_steps: 1\noutput_dir: {tmp_path}/out\ndataset_prepared_path: {tmp_path}/prep\n"
                   "datasets:\n  - path: ftlab:data/chat.jsonl\n    type: chat_template\n" + extra)
    return cfg


def check_final_screen(screen, out):
    "The last screen agrees with metrics.jsonl: step, total, loss, the end, and the newest log lines word for word."
    records = read_metrics(out)
    logs = [r for r in records if r["event"] == "log"]
    start = [r for r in records if r["event"] == "start"][-1]
    last = logs[-1]
    assert f"step {last['step']}/{start['max_steps']}" in screen and f"loss {last['loss']:.4f}" in screen, screen
    for r in logs[-3:]: assert format_record(r) in screen, (format_record(r), screen)
    return records, last


def test_train_tui_live_and_final_screen(tmp_path):
    cfg = config(tmp_path)
    t = Terminal(f"{EXE} train {cfg} --tui --max-steps 40", tmp_path)
    try:
        early = t.wait(r"· (loading the tokenizer|preparing 1 dataset|data|loading the model)")   # live before training
        assert "step 0" in early or "loss" not in early
        live = t.wait(r"step ([1-9]|[1-3]\d)/40 .*loss \d", timeout=240)          # during the run: the live view shows the step and the loss
        assert "sft · ftlab:tiny" in live and "╭─ loss" in live and "devices cpu" in live
        final = t.wait(r"EXIT=\d+", history=True)
    finally: t.close()
    assert "EXIT=0" in final
    records, last = check_final_screen(final, tmp_path / "out")
    assert f"finished at step 40 · final loss {last['loss']:.4f}" in final


def test_ctrl_c_in_the_tui_saves_a_checkpoint(tmp_path):
    cfg = config(tmp_path, "save_steps: 1000\n")
    t = Terminal(f"{EXE} train {cfg} --tui --max-steps 400", tmp_path)
    try:
        t.wait(r"step [2-9]\d*/400")
        t.keys("C-c")
        final = t.wait(r"EXIT=\d+", history=True)
    finally: t.close()
    records = read_metrics(tmp_path / "out")
    stop = [r for r in records if r["event"] == "interrupted"][-1]
    assert "EXIT=130" in final and (tmp_path / "out" / stop["checkpoint"] / "trainer_state.json").exists()
    assert f"interrupted at step {stop['step']}" in final and "--resume" in final


def test_watch_follows_a_run_started_elsewhere(tmp_path):
    cfg = config(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    train = subprocess.Popen([str(EXE), "train", str(cfg), "--max-steps", "12"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    t = Terminal(f"{EXE} watch {tmp_path}/out", tmp_path)
    try:
        t.wait(r"step \d+/12")
        final = t.wait(r"EXIT=\d+", history=True)
    finally:
        t.close(); train.wait(timeout=300)
    assert "EXIT=0" in final and train.returncode == 0
    check_final_screen(final, tmp_path / "out")
    assert "finished at step 12" in final
    # without a terminal, watch prints the usual lines of the finished run and exits
    r = subprocess.run([str(EXE), "watch", f"{tmp_path}/out"], capture_output=True, text=True, timeout=120, env=env)
    logs = [format_record(x) for x in read_metrics(tmp_path / "out") if x["event"] == "log"]
    assert r.returncode == 0 and all(l in r.stdout for l in logs), r.stdout + r.stderr


def test_tui_without_a_terminal_prints_lines(tmp_path, capsys):
    assert main(["train", str(config(tmp_path)), "--tui", "--max-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "note: `--tui` needs a terminal" in out and "step 2 · loss" in out


def test_watch_of_a_missing_folder_is_one_message(tmp_path, capsys):
    assert main(["watch", str(tmp_path / "no" / "such")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_completions_sit_beside_their_rewards():
    "GRPO and EBFT: the newest step's completions, each with its rewards and advantage (what `Run.completions` reads)."
    from rich.console import Console
    from ftlab.tui import render
    from ftlab.methods.registry import get_method
    from ftlab.config import load_config
    m = get_method(load_config("base_model: ftlab:tiny\nrl: grpo\ndatasets: [{path: ftlab:data/counting.jsonl}]\n"
                               "micro_batch_size: 2\ntrl: {num_generations: 2, reward_funcs: [ftlab.rewards.exact_answer]}\n", check_support=False))
    rows = [{"step": s, "prompt": "count to 3", "completion": c, "rewards": {"exact": r}, "advantage": a}
            for s in (1, 2) for c, r, a in (("1 2 3", 1.0, 0.7), ("1 2", 0.0, -0.7))]
    records = [{"event": "start", "step": 0, "max_steps": 2}, {"event": "log", "step": 2, "loss": 0.1, "reward": 0.5}]
    c = Console(width=120, record=True, color_system=None)
    c.print(render(records, m.panels, {}, m.figures, rows, width=120))
    s = c.export_text()
    assert "completions of step 2" in s and "'1 2 3'" in s and "exact" in s and "-0.7" in s


def test_watch_notices_a_killed_run(tmp_path):
    "kill -9 leaves no end record: watch sees that the process holding the run's lock is gone, says so, exits 1."
    import signal
    cfg = config(tmp_path, "save_steps: 1000\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    train = subprocess.Popen([str(EXE), "train", str(cfg), "--max-steps", "400"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    watch = subprocess.Popen([str(EXE), "watch", f"{tmp_path}/out"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in watch.stdout:
        lines.append(line)
        if line.startswith("step 2 "): train.send_signal(signal.SIGKILL); train.wait(timeout=60)
    watch.wait(timeout=120)
    out = "".join(lines)
    assert watch.returncode == 1 and "the training process is gone" in out, out
