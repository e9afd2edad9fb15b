"""Training on the tiny model: metrics, saving, resume, interrupt, NaN, and each adapter mode."""
import json, os, signal, math
import pytest
from ftlab.run import Run
from ftlab.events import read_metrics
from ftlab.errors import RunError, FtlabError

from run_helpers import LORA, logs


def test_lora_run_learns_and_writes_metrics(make_cfg):
    run = Run(make_cfg(LORA + "max_steps: 30\nlogging_steps: 1\nsave_steps: 100\n"))
    run.train()
    recs = logs(run)
    assert run.state == "finished" and [r["step"] for r in recs] == list(range(1, 31))
    first, last = recs[0]["loss"], sum(r["loss"] for r in recs[-5:]) / 5
    assert last < 0.85 * first, (first, last)
    assert all(r["tokens_per_second"] > 0 for r in recs[1:])
    out = run.output_dir
    assert (out / "config.yaml").exists() and (out / "adapter_model.safetensors").exists()
    assert (out / "tokenizer.json").exists()
    events = [r["event"] for r in read_metrics(out) if r["event"] != "phase"]   # phases: what loads, before the start
    assert events[0] == "start" and events[-1] == "end"
    assert list(run.history["step"]) == list(range(1, 31))


def test_resume_continues_steps_and_metrics(make_cfg):
    cfg = make_cfg(LORA + "max_steps: 4\nsave_steps: 2\n")
    Run(cfg).train()
    run = Run(cfg.model_copy(update={"max_steps": 6}))
    run.train(resume=True)
    recs = read_metrics(run.output_dir)
    starts = [r for r in recs if r["event"] == "start"]
    assert [s["step"] for s in starts] == [0, 4]
    assert [r["step"] for r in recs if r["event"] == "log"] == [1, 2, 3, 4, 5, 6]


def test_resume_without_checkpoint_is_a_clear_error(make_cfg):
    with pytest.raises(RunError) as e:
        Run(make_cfg(LORA + "max_steps: 2\n")).train(resume=True)
    assert "no complete checkpoint" in str(e.value)


def test_interrupt_saves_checkpoint_and_resumes(make_cfg):
    """SIGINT (the notebook's stop button) mid-run: checkpoint at that step, an `interrupted` event, resumable."""
    from transformers import TrainerCallback

    class StopButton(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3: os.kill(os.getpid(), signal.SIGINT)

    cfg = make_cfg(LORA + "max_steps: 8\nsave_steps: 100\n")
    run = Run(cfg)
    run.train(callbacks=[StopButton()])
    assert run.state == "interrupted" and run.stopped_at == 3
    assert (run.output_dir / "checkpoint-3").exists()
    inter = [r for r in read_metrics(run.output_dir) if r["event"] == "interrupted"]
    assert inter and "resume" in inter[0]["message"].lower()
    run2 = Run(cfg)
    run2.train(resume=True)
    assert run2.state == "finished"
    assert [r["step"] for r in logs(run2)] == list(range(1, 9))


def test_nan_loss_stops_with_step(make_cfg, monkeypatch):
    import torch, ftlab.run as runmod, ftlab.model as modelmod
    orig = modelmod.load_model
    def poisoned(cfg, tok=None, head=None):
        m = orig(cfg, tok, head)
        calls = {"n": 0}
        def hook(mod, args, out):
            calls["n"] += 1
            return out * float("nan") if calls["n"] > 2 else out
        m.get_input_embeddings().register_forward_hook(hook)
        return m
    monkeypatch.setattr(modelmod, "load_model", poisoned)
    run = Run(make_cfg(LORA + "max_steps: 10\n"))
    with pytest.raises(RunError) as e:
        run.train()
    assert "became NaN at step 3" in str(e.value) and "learning rate" in str(e.value)
    assert [r["step"] for r in logs(run)] == [1, 2, 3]


def test_qlora_runs_on_cpu(make_cfg):
    run = Run(make_cfg("adapter: qlora\nload_in_4bit: true\nlora_target_linear: true\nmax_steps: 3\nmicro_batch_size: 4\n"))
    run.train()
    assert run.state == "finished"
    import bitsandbytes as bnb
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in run.trainer.model.modules())
    # 4-bit weights count as the parameters they hold: the same totals as the plan built on the meta device.
    from ftlab.model import count_parameters
    from ftlab.plan import count_params
    trainable, total, _ = count_params(run.cfg)
    assert count_parameters(run.trainer.model) == (trainable, total)
    assert all(math.isfinite(r["loss"]) for r in logs(run))


@pytest.mark.parametrize("extra", ["peft_use_dora: true\nadapter: lora\nlora_target_linear: true\n",
                                   "learning_rate: 0.0001\n",
                                   "adapter: lora\nload_in_8bit: true\nlora_target_linear: true\n"])
def test_other_modes_run(make_cfg, extra):
    run = Run(make_cfg(extra + "max_steps: 2\nmicro_batch_size: 4\n"))
    run.train()
    assert run.state == "finished" and len(logs(run)) == 2


def test_local_model_folder_and_missing_model(make_cfg, tmp_path):
    import shutil
    from ftlab.assets import embedded_path
    local = tmp_path / "my-model"
    shutil.copytree(embedded_path("ftlab:tiny"), local)
    cfg = make_cfg("max_steps: 1\nmicro_batch_size: 2\n").model_copy(update={"base_model": str(local)})
    run = Run(cfg)
    run.train()
    assert run.state == "finished" and (run.output_dir / "model.safetensors").exists()
    bad = cfg.model_copy(update={"base_model": str(tmp_path / "nothing-here")})
    with pytest.raises(FtlabError) as e:
        Run(bad).train()
    assert "nothing-here" in str(e.value) and "base_model" in str(e.value)


def test_fused_lora_kernels_train_like_peft(make_cfg):
    """The kernel keys switch on ftlab's fused LoRA projections; the losses match PEFT's own forward."""
    base = make_cfg(LORA + "max_steps: 5\nsave_steps: 100\nuse_liger_kernel: false\n")
    plain = Run(base.model_copy(update={"lora_qkv_kernel": False, "lora_o_kernel": False, "lora_mlp_kernel": False}))
    plain.train()   # (explicitly off: on a GPU they are on by default)
    fused = Run(base.model_copy(update={"output_dir": str(base.output_dir) + "-fused", "lora_qkv_kernel": True,
                                        "lora_o_kernel": True, "lora_mlp_kernel": True}))
    fused.train()
    notes = [r["message"] for r in fused.records if r["event"] == "note"]
    assert notes == ["fused LoRA kernels on 28 projections (qkv, o, mlp; the SwiGLU inside the down projection in 4 MLPs)"]
    a, b = [r["loss"] for r in logs(plain)], [r["loss"] for r in logs(fused)]
    from ftlab.model import training_dtype
    # float32 (a CPU): equal to 1e-4; bfloat16 on a GPU rounds differently in a fused matmul: 0.1% of the loss
    close = (lambda x, y: abs(x - y) < 1e-4) if training_dtype(base) == "float32" else (lambda x, y: abs(x - y) < 1e-3 * abs(x))
    assert len(a) == len(b) == 5 and all(close(x, y) for x, y in zip(a, b)), (a, b)


def test_history_has_one_row_per_step_with_eval_beside_train(make_cfg):
    run = Run(make_cfg(LORA + "max_steps: 4\neval_steps: 2\nval_set_size: 0.1\n"))
    run.train()
    h = run.history
    assert list(h["step"]) == [1, 2, 3, 4] and h["loss"].notna().all()
    assert list(h["eval_loss"].notna()) == [False, True, False, True]


def test_lora_targets_that_match_no_layer_name_the_key_and_the_layers(make_cfg):
    "PEFT's NoMatchingPeftModuleError from inside the trainer becomes one message with the model's layer names."
    cfg = make_cfg("adapter: lora\nlora_target_modules: [qproj, vproj]\nmax_steps: 1\n")
    with pytest.raises(FtlabError) as e:
        Run(cfg).train()
    msg = str(e.value)
    assert "`lora_target_modules` names no layer of this model (qproj, vproj)" in msg and "q_proj" in msg
    assert e.value.problems[0].key == "lora_target_modules" and "NoMatchingPeftModuleError" not in msg
