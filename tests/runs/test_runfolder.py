"""What survives what: kills and full disks during a save, two runs on one folder, reused folders, signals."""
import errno, os, signal, subprocess, sys, textwrap, time
from pathlib import Path
import pytest
from ftlab.run import Run
from ftlab.events import read_metrics
from ftlab.errors import FtlabError, RunError
from ftlab.runfolder import LOCK_FILE, SAVING_DIR

from run_helpers import LORA, ROOT, checkout_env, logs




def steps(run): return [r["step"] for r in logs(run)]
def notes(run): return [r["message"] for r in read_metrics(run.output_dir) if r["event"] == "note"]


def python(code: str, **kw):
    "Run `code` in a fresh Python process (the tests' environment: offline, ftlab from this checkout)."
    env = checkout_env()
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def test_a_kill_during_a_save_leaves_the_last_complete_checkpoint(make_cfg, tmp_path):
    """`kill -9` while checkpoint-4 is half written (weights on disk, optimizer and trainer state not yet): no folder
    named checkpoint-4 appears, and `--resume` continues from checkpoint-2, saying what it skipped."""
    cfg = make_cfg(LORA + "max_steps: 6\nsave_steps: 2\n")
    (tmp_path / "cfg.yaml").write_text(cfg.to_yaml())
    proc = python(f"""
        import os, signal, transformers
        from ftlab.config import load_config
        from ftlab.run import Run
        save = transformers.Trainer._save_optimizer_and_scheduler
        def killed_at_4(self, output_dir):
            if self.state.global_step == 4: os.kill(os.getpid(), signal.SIGKILL)   # weights written, the rest not
            return save(self, output_dir)
        transformers.Trainer._save_optimizer_and_scheduler = killed_at_4
        Run(load_config({str(tmp_path / 'cfg.yaml')!r})).train()
    """)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out
    folder = Path(cfg.output_dir)
    assert (folder / "checkpoint-2").exists() and not (folder / "checkpoint-4").exists()
    assert (folder / SAVING_DIR / "checkpoint-4" / "adapter_model.safetensors").exists()   # the cut-off save
    run = Run(cfg)
    run.train(resume=True)
    assert run.state == "finished" and steps(run)[-3:] == [4, 5, 6]
    assert "skipped checkpoint-4: its save was cut off before it completed" in notes(run)
    assert not (folder / SAVING_DIR).exists()


def test_half_written_checkpoints_from_elsewhere_are_skipped(make_cfg):
    "Folders named checkpoint-N without their trainer state, or with an empty file, are never resumed from."
    cfg = make_cfg(LORA + "max_steps: 4\nsave_steps: 2\n")
    Run(cfg).train()
    folder = Path(cfg.output_dir)
    (folder / "checkpoint-4" / "trainer_state.json").unlink()
    (folder / "checkpoint-5").mkdir()
    run = Run(cfg.model_copy(update={"max_steps": 6}))
    run.train(resume=True)
    assert run.state == "finished" and steps(run)[-4:] == [3, 4, 5, 6]
    said = " | ".join(notes(run))
    assert "skipped checkpoint-4: it has no trainer_state.json" in said and "skipped checkpoint-5" in said


@pytest.mark.parametrize("failure", ["errno", "torch"])
def test_a_full_disk_while_saving_is_one_message(make_cfg, monkeypatch, failure):
    """ENOSPC (or torch's zip writer failing on a disk with no space left) while checkpoint-4 is written: one
    message with the folder, the space a checkpoint takes and the last complete checkpoint; nothing half written."""
    import shutil, transformers, ftlab.runfolder as rf
    cfg = make_cfg(LORA + "max_steps: 6\nsave_steps: 2\n")
    save = transformers.Trainer._save_optimizer_and_scheduler
    def full_at_4(self, output_dir):
        if self.state.global_step == 4:
            if failure == "errno": raise OSError(errno.ENOSPC, "No space left on device")
            real = shutil.disk_usage
            monkeypatch.setattr(rf.shutil, "disk_usage", lambda p: real(p)._replace(free=2**20))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return save(self, output_dir)
    monkeypatch.setattr(transformers.Trainer, "_save_optimizer_and_scheduler", full_at_4)
    with pytest.raises(RunError) as e:
        Run(cfg).train()
    msg = str(e.value)
    assert "the disk is full" in msg and "checkpoint-4" in msg and cfg.output_dir in msg
    assert "the last complete checkpoint is checkpoint-2" in msg and "MB" in msg and "Traceback" not in msg
    folder = Path(cfg.output_dir)
    assert not (folder / "checkpoint-4").exists() and not (folder / SAVING_DIR).exists()
    assert read_metrics(folder)[-1]["status"] == "failed"
    monkeypatch.undo()                   # space freed: the run resumes from the checkpoint the message named
    run = Run(cfg)
    run.train(resume=True)
    assert run.state == "finished" and steps(run)[-3:] == [4, 5, 6]


def test_a_second_run_on_a_folder_in_use_is_refused_until_the_first_dies(make_cfg):
    cfg = make_cfg(LORA + "max_steps: 2\n")
    holder = python(f"""
        from ftlab.runfolder import RunLock
        import time
        lock = RunLock({cfg.output_dir!r}).acquire()
        print("held", flush=True)
        time.sleep(120)
    """)
    assert holder.stdout.readline().strip() == "held"
    try:
        with pytest.raises(RunError) as e:
            Run(cfg).train()
        assert f"in use by another run (process {holder.pid} on" in str(e.value)
        assert not (Path(cfg.output_dir) / "metrics.jsonl").exists()     # the refused run wrote nothing
    finally:
        holder.kill(); holder.wait()
    run = Run(cfg)                       # killed, not cleaned up: the operating system released its lock
    run.train()
    assert run.state == "finished" and (Path(cfg.output_dir) / LOCK_FILE).exists()


def test_a_failing_config_leaves_a_finished_run_as_it_was(make_cfg):
    cfg = make_cfg(LORA + "max_steps: 2\n")
    Run(cfg).train()
    folder = Path(cfg.output_dir)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    broken = make_cfg(LORA + "max_steps: 2\n", datasets="  - path: /no/such/data.jsonl\n    type: chat_template\n",
                      require_datasets=False)
    with pytest.raises(FtlabError):
        Run(broken).train()
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    assert Run.load(folder).state == "finished" and list(Run.load(folder).history["step"]) == [1, 2]


def test_a_new_run_never_buries_an_old_one(make_cfg):
    cfg = make_cfg(LORA + "max_steps: 4\nsave_steps: 2\n")
    Run(cfg).train()
    folder = Path(cfg.output_dir)
    with pytest.raises(RunError) as e:
        Run(cfg).train()
    msg = str(e.value)
    assert "already holds a finished run at step 4, 2 checkpoints up to checkpoint-4" in msg
    assert "--resume" in msg and "--overwrite" in msg and "another `output_dir`" in msg
    assert (folder / "checkpoint-4").exists() and steps(Run.load(folder)) == [1, 2, 3, 4]
    run = Run(cfg.model_copy(update={"max_steps": 1, "save_steps": None}))
    run.train(overwrite=True)
    assert run.state == "finished" and steps(run) == [1]
    assert not (folder / "checkpoint-4").exists() and not list(folder.glob("metrics.*.jsonl"))
    # a later resume sees only the new run (finished at step 1), never the old run's checkpoints
    again = Run(cfg.model_copy(update={"max_steps": 1}))
    again.train(resume=True)
    assert again.state == "finished" and steps(again) == [1] and not (folder / "checkpoint-5").exists()


def test_resuming_a_finished_run_says_it_is_complete(make_cfg):
    cfg = make_cfg(LORA + "max_steps: 4\nsave_steps: 2\n")
    Run(cfg).train()
    seen = []
    run = Run(cfg, observers=[seen.append])
    run.train(resume=True)
    assert run.state == "finished" and steps(run) == [1, 2, 3, 4]          # no step 5, no checkpoint-5
    assert any("is complete (step 4): nothing to resume" in r.get("message", "") for r in seen)
    assert not (Path(cfg.output_dir) / "checkpoint-5").exists()
    longer = Run(cfg.model_copy(update={"max_steps": 6}))
    longer.train(resume=True)
    assert steps(longer)[-2:] == [5, 6]
    assert any("planned for 4 steps" in m and "learning-rate schedule" in m for m in
               [r["message"] for r in read_metrics(cfg.output_dir) if r["event"] == "warning" or r["event"] == "note"])


def test_sigterm_saves_a_checkpoint_like_ctrl_c(make_cfg):
    from transformers import TrainerCallback

    class Scheduler(TrainerCallback):      # what a scheduler or `docker stop` sends
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2: os.kill(os.getpid(), signal.SIGTERM)

    cfg = make_cfg(LORA + "max_steps: 6\nsave_steps: 100\n")
    run = Run(cfg)
    run.train(callbacks=[Scheduler()])
    assert run.state == "interrupted" and run.stopped_at == 2
    assert (Path(cfg.output_dir) / "checkpoint-2" / "trainer_state.json").exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL        # the handler is not left behind
    again = Run(cfg)
    again.train(resume=True)
    assert again.state == "finished" and steps(again)[-4:] == [3, 4, 5, 6]


def test_an_interrupt_during_the_model_load_is_not_lost(make_cfg, monkeypatch):
    """Ctrl-C while the model loads, raised inside a destructor that swallows it (Python prints `Exception ignored
    in ... __del__`): the run stops before training instead of training to the end."""
    import ftlab.model
    load = ftlab.model.load_model
    class Group:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)              # the KeyboardInterrupt is raised here, inside __del__, and swallowed
    def load_with_interrupt(*a, **kw):
        Group()                           # collected at once: its __del__ runs now
        return load(*a, **kw)
    monkeypatch.setattr(ftlab.model, "load_model", load_with_interrupt)
    cfg = make_cfg(LORA + "max_steps: 4\n")
    seen = []
    run = Run(cfg, observers=[seen.append])
    run.train()
    assert run.state == "interrupted" and steps(run) == []
    assert seen[-1]["event"] == "interrupted" and "before training started" in seen[-1]["message"]


def test_output_dir_that_is_a_file_or_unwritable(make_cfg, tmp_path, monkeypatch):
    f = tmp_path / "a-file"; f.write_text("x")
    with pytest.raises(RunError, match="is a file, not a folder") as e:
        Run(make_cfg(LORA + "max_steps: 1\n").model_copy(update={"output_dir": str(f)})).train()
    assert e.value.problems[0].key == "output_dir"
    import ftlab.runfolder as rf
    real_open = os.open
    def read_only(path, *a, **kw):
        if str(path).endswith(LOCK_FILE): raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, *a, **kw)
    monkeypatch.setattr(rf.os, "open", read_only)
    with pytest.raises(RunError, match="cannot write in `output_dir`.*Read-only file system"):
        Run(make_cfg(LORA + "max_steps: 1\n").model_copy(update={"output_dir": str(tmp_path / "ro")})).train()
