"""%%finetune and %ftlab through a real IPython InteractiveShell."""
import os, signal, subprocess, sys
import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output


@pytest.fixture(scope="module")
def shell():
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "ftlab")
    return ip


def cell(shell, line, body):
    with capture_output() as cap:
        result = shell.run_cell_magic("finetune", line, body)
    return cap, result


def html_of(cap):
    return "\n".join(o.data.get("text/html", "") for o in cap.outputs)


def yaml(tmp_path, extra=""):
    return (f"base_model: ftlab:tiny\nadapter: lora\nlora_target_linear: true\nlearning_rate: 0.002\n"
            f"micro_batch_size: 4\nsequence_len: 256\noutput_dir: {tmp_path}/out\n"
            f"datasets:\n  - path: ftlab:data/chat.jsonl\n    type: chat_template\n{extra}")


def test_load_ext_is_fast_and_does_not_import_torch():
    code = ("from IPython.core.interactiveshell import InteractiveShell; ip = InteractiveShell.instance();"
            "ip.run_line_magic('load_ext', 'ftlab'); import sys;"
            "assert 'finetune' in ip.magics_manager.magics['cell'] and 'ftlab' in ip.magics_manager.magics['line'];"
            "print('torch' in sys.modules, 'plotly' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_bad_config_shows_message_with_yaml_line_not_traceback(shell, tmp_path):
    cap, _ = cell(shell, "", yaml(tmp_path).replace("lora_target_linear: true", "lora_target_lin: true"))
    h = html_of(cap)
    assert "ftlab-error" in h and "did you mean" in h and "lora_target_linear" in h
    assert 'class="ftlab-error-line">   3 │ lora_target_lin: true' in h
    assert "Traceback" not in cap.stdout + cap.stderr + h


def test_bad_flags_are_one_message(shell, tmp_path):
    cap, _ = cell(shell, "--max-steps many", yaml(tmp_path))
    assert "bad %%finetune flags" in html_of(cap) and "usage" in html_of(cap)


def test_dry_run_shows_plan_and_masks_without_training(shell, tmp_path):
    cap, _ = cell(shell, "--dry-run --name plan_only", yaml(tmp_path))
    h = html_of(cap)
    assert "ftlab-plan" in h and "trainable" in h and "memory (est.)" in h
    assert "ftlab-tok" in h  # the label-mask preview
    run = shell.user_ns["plan_only"]
    assert run.state == "prepared" and not (tmp_path / "out" / "metrics.jsonl").exists()


def test_notebook_objects_resolve_by_at_name(shell, tmp_path):
    shell.user_ns["my_rows"] = [{"messages": [{"role": "user", "content": f"hi {i}"},
                                              {"role": "assistant", "content": f"hello {i}"}]} for i in range(8)]
    body = yaml(tmp_path).replace("path: ftlab:data/chat.jsonl", 'path: "@my_rows"')
    cap, _ = cell(shell, "--dry-run --name at_rows", body)
    assert "8 train rows" in html_of(cap)


def test_training_cell_binds_run_and_streams_dashboard(shell, tmp_path, monkeypatch):
    import ftlab.dashboard as dash
    monkeypatch.setattr(dash, "in_notebook", lambda: True)
    cap, _ = cell(shell, "--name r --max-steps 3", yaml(tmp_path))
    r = shell.user_ns["r"]
    assert r.state == "finished" and list(r.history["step"]) == [1, 2, 3]
    bundles = [o.data for o in cap.outputs]
    charts = [b for b in bundles if "application/vnd.plotly.v1+json" in b]
    assert charts and charts[-1]["application/vnd.plotly.v1+json"]["data"][0]["x"] == [1, 2, 3]
    assert "finished at step 3" in html_of(cap) and "final loss" in html_of(cap)


def test_stop_button_then_resume(shell, tmp_path, monkeypatch):
    from transformers import TrainerCallback
    from ftlab.run import Run

    class StopButton(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2: os.kill(os.getpid(), signal.SIGINT)

    orig = Run.train
    monkeypatch.setattr(Run, "train", lambda self, **kw: orig(self, callbacks=[StopButton()], **kw))
    import ftlab.dashboard as dash
    monkeypatch.setattr(dash, "in_notebook", lambda: True)
    cap, _ = cell(shell, "--name stopped --max-steps 4", yaml(tmp_path, "save_steps: 100\n"))
    assert shell.user_ns["stopped"].state == "interrupted" and "interrupted at step 2" in html_of(cap)
    monkeypatch.setattr(Run, "train", orig)
    cap, _ = cell(shell, "--name resumed --max-steps 4 --resume", yaml(tmp_path, "save_steps: 100\n"))
    r = shell.user_ns["resumed"]
    assert r.state == "finished" and list(r.history["step"]) == [1, 2, 3, 4]
    chart = [o.data for o in cap.outputs if "application/vnd.plotly.v1+json" in o.data][-1]
    assert chart["application/vnd.plotly.v1+json"]["data"][0]["x"] == [1, 2, 3, 4]  # history before the stop kept


def test_line_magics(shell, tmp_path):
    cell(shell, "--name lm --max-steps 2", yaml(tmp_path))
    with capture_output() as cap:
        shell.run_line_magic("ftlab", "runs")
    assert "lm" in cap.outputs[-1].data["text/plain"] and "finished" in cap.outputs[-1].data["text/plain"]
    with capture_output() as cap:
        shell.run_line_magic("ftlab", "masks lm 2")
    assert "ftlab-tok" in cap.outputs[-1].data["text/html"]
    with capture_output() as cap:
        shell.run_line_magic("ftlab", f"show {tmp_path}/out")
    assert "loss" in cap.outputs[-1].data["text/plain"]
    shell.user_ns["cfg_text"] = yaml(tmp_path)
    with capture_output() as cap:
        shell.run_line_magic("ftlab", "validate cfg_text")
    assert "valid" in cap.outputs[-1].data["text/plain"]
    with capture_output() as cap:
        shell.run_line_magic("ftlab", "show nobody")
    assert "no run called `nobody`" in cap.outputs[-1].data["text/html"]


def test_chat_after_run(shell, tmp_path):
    cell(shell, "--name talk --max-steps 2", yaml(tmp_path))
    with capture_output() as cap:
        reply = shell.user_ns["talk"].chat("What is 2 plus 3?", max_new_tokens=8)
    assert reply and reply in cap.stdout


def test_gpus_and_num_processes_flags():
    from ftlab.errors import FtlabError
    from ftlab.magics import parse_flags
    a = parse_flags("--gpus 2")
    assert (a.processes, a.gpu_ids) == (2, None)                 # a count of GPUs
    a = parse_flags("--gpus 0,3")
    assert (a.processes, a.gpu_ids) == (2, "0,3")                # these GPUs
    assert parse_flags("--num-processes 3").processes == 3 and parse_flags("").processes is None
    for bad in ("--gpus two", "--gpus 0,x", "--num-processes 0"):
        with pytest.raises(FtlabError, match="--gpus|--num-processes"): parse_flags(bad)


def test_workers_cannot_see_notebook_objects(shell, tmp_path):
    shell.user_ns["rows"] = [{"text": "hello"}]
    body = yaml(tmp_path).replace("path: ftlab:data/chat.jsonl\n    type: chat_template", 'path: "@rows"\n    type: completion')
    cap, _ = cell(shell, "--num-processes 2 --max-steps 2", body)
    page = html_of(cap)
    assert "`@rows` names notebook objects" in page and "worker processes cannot see" in page
    assert not (tmp_path / "out" / "config.yaml").exists()       # refused before anything was written


def test_num_processes_trains_in_workers_and_the_stop_saves_one_checkpoint(shell, tmp_path, monkeypatch):
    """`%%finetune --num-processes 2` (`--gpus 2` on a GPU machine): two worker processes train, the cell's dashboard
    follows their metrics.jsonl; the notebook's stop (SIGINT to the kernel) stops both at one step with a checkpoint,
    and `--resume` goes on in two processes."""
    import threading, time
    import ftlab.dashboard as dash
    from ftlab.events import read_metrics
    monkeypatch.setattr(dash, "in_notebook", lambda: True)
    out = tmp_path / "out"
    def stop_after_step_2():
        while True:
            time.sleep(0.2)
            try: logs = [r for r in read_metrics(out) if r["event"] == "log"]
            except Exception: continue
            if logs and logs[-1]["step"] >= 2:
                os.kill(os.getpid(), signal.SIGINT); return
    threading.Thread(target=stop_after_step_2, daemon=True).start()
    body = yaml(tmp_path, "save_steps: 100\nmicro_batch_size: 2\n").replace("micro_batch_size: 4\n", "")
    # 100 steps: far more than the few the stop takes to arrive, however fast this machine runs them
    cap, _ = cell(shell, "--name multi --num-processes 2 --max-steps 100", body)
    r = shell.user_ns["multi"]
    assert r.state == "interrupted" and 2 <= r.stopped_at < 100, (r.state, html_of(cap)[-2000:])
    (start,) = [x for x in read_metrics(out) if x["event"] == "start"]
    assert start["world_size"] == 2
    ckpt = out / f"checkpoint-{r.stopped_at}"
    assert sorted(p.name for p in ckpt.glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert "application/vnd.plotly.v1+json" in "".join(str(o.data.keys()) for o in cap.outputs)   # the live chart
    cap, _ = cell(shell, "--name again --num-processes 2 --max-steps 100 --resume", body)
    again = shell.user_ns["again"]
    assert again.state == "finished", html_of(cap)[-2000:]
    steps = [x["step"] for x in read_metrics(out) if x["event"] == "log"]
    assert steps == list(range(1, 101)), steps
    assert [x["world_size"] for x in read_metrics(out) if x["event"] == "start"] == [2, 2]
    assert (out / "adapter_model.safetensors").exists()


def test_a_cell_that_fails_while_workers_train_ends_them_with_a_checkpoint(shell, tmp_path, monkeypatch):
    """Something in the cell itself failing while the workers train (here the dashboard, on the first log record):
    the error reaches the cell, and the workers do not go on alone: they stop as on the stop button, each rank's
    state in one checkpoint, and no worker process is left."""
    import psutil
    import ftlab.dashboard as dash
    from ftlab.runfolder import checkpoints
    def broken(self, record):
        if record.get("event") == "log": raise RuntimeError("the chart broke")
    monkeypatch.setattr(dash.Dashboard, "__call__", broken)
    body = yaml(tmp_path, "save_steps: 1000\nmicro_batch_size: 2\n").replace("micro_batch_size: 4\n", "")
    # 400 steps: on a machine of two slow cores the workers ran 40 before the stop arrived
    with pytest.raises(RuntimeError, match="the chart broke"):
        cell(shell, "--num-processes 2 --max-steps 400", body)
    assert not [p for p in psutil.Process().children(recursive=True) if "ftlab" in " ".join(p.cmdline())]
    good, _ = checkpoints(tmp_path / "out")
    assert len(good) == 1 and int(good[0].name.split("-")[1]) < 400
    assert sorted(p.name for p in good[0].glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]


def test_worker_processes_from_a_real_kernel(tmp_path):
    """The same through a Jupyter kernel (nbclient), the processes asked by the config's `num_processes` this time: the
    cell's output holds the live chart's bundle, the run has two ranks and binds to its name."""
    import nbformat
    from nbclient import NotebookClient
    from ftlab.events import read_metrics
    body = yaml(tmp_path).replace("micro_batch_size: 4\n", "micro_batch_size: 2\nnum_processes: 2\n")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("%load_ext ftlab"),
                                         nbformat.v4.new_code_cell("%%finetune --name r --max-steps 2\n" + body),
                                         nbformat.v4.new_code_cell("print(r.state, list(r.history['step']))")])
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    bundles = [k for o in nb.cells[1].outputs for k in o.get("data", {})]
    assert "application/vnd.plotly.v1+json" in bundles, nb.cells[1].outputs
    assert "finished [1, 2]" in "".join(o.get("text", "") for o in nb.cells[2].outputs)
    assert [r["world_size"] for r in read_metrics(tmp_path / "out") if r["event"] == "start"] == [2]
