"""DeepSpeed ZeRO through `ftlab train --num-processes 2` on the CPU (gloo, DeepSpeed's CPU accelerator).

deepspeed is not a dependency of ftlab, so these tests run where `bash scripts/test_deepspeed.sh` installed it (in a
folder of its own, put on PYTHONPATH); the main suite leaves this folder out. The first run compiles DeepSpeed's
shared-memory communication op (and, with optimizer offload, CPU-Adam): minutes once, cached afterwards."""
import math, shlex, subprocess, sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed", reason="deepspeed is not installed here: run `bash scripts/test_deepspeed.sh`")

from ftlab.events import read_metrics
from ftlab.runfolder import checkpoints
from run_helpers import RUN_CONFIG

EXE = Path(sys.executable).parent / "ftlab"
BASE = RUN_CONFIG.replace("save_steps: 1000", "save_steps: 3")


def config(folder: Path, name: str, extra: str = "", base: str = BASE) -> Path:
    p = folder / f"{name}.yaml"
    p.write_text(base.format(out=folder / name) + extra)
    return p


def ftlab(*args, timeout=900):
    r = subprocess.run([str(EXE), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    print(f"$ ftlab {shlex.join(map(str, args))}\n{r.stdout[-2500:]}{r.stderr[-2500:]}")
    return r


def logs(folder): return [r for r in read_metrics(folder) if r["event"] == "log"]
def starts(folder): return [r for r in read_metrics(folder) if r["event"] == "start"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    "ZeRO-2 and ZeRO-3 LoRA runs on two processes, and one process with the same batch by accumulation, 3 steps each."
    d = tmp_path_factory.mktemp("zero")
    out = {}
    for name, extra, n in (("zero2", "deepspeed: zero2_no_offload\n", 2), ("zero3", "deepspeed: zero3\n", 2),
                           ("one", "gradient_accumulation_steps: 2\n", 1)):
        r = ftlab("train", config(d, name, extra), "--num-processes", n, "--max-steps", 3)
        assert r.returncode == 0, r.stdout + r.stderr
        out[name] = (d / name, r)
    return d, out


@pytest.mark.parametrize("name, words", [("zero2", "DeepSpeed ZeRO-2"), ("zero3", "DeepSpeed ZeRO-3")])
def test_zero_trains_on_two_processes_like_one_with_accumulation(runs, name, words):
    _, out = runs
    folder, r = out[name]
    (start,) = starts(folder)
    assert start["world_size"] == 2 and start["strategy"] == words
    assert f"parallel  {words}" in r.stdout and f"training: 3 steps on 2 processes · {words}" in r.stdout
    ours, one = [x["loss"] for x in logs(folder)], [x["loss"] for x in logs(out["one"][0])]
    assert len(ours) == 3 and all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(ours, one)), (ours, one)
    assert (folder / "adapter_model.safetensors").stat().st_size > 0 and r.stdout.count("done:") == 1
    good, skipped = checkpoints(folder)
    assert [p.name for p in good] == ["checkpoint-3"] and not skipped
    shards = sorted(p.name for p in (good[0] / "global_step3").iterdir())   # DeepSpeed's own state, a file per rank
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in shards and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in shards


def test_zero3_resumes_on_both_ranks(runs):
    d, out = runs
    folder, _ = out["zero3"]
    r = ftlab("train", d / "zero3.yaml", "--num-processes", 2, "--max-steps", 5, "--resume")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [(s["step"], s["world_size"], s["strategy"]) for s in starts(folder)] == [(0, 2, "DeepSpeed ZeRO-3"), (3, 2, "DeepSpeed ZeRO-3")]
    assert [x["step"] for x in logs(folder)] == [1, 2, 3, 4, 5] and "training: 5 steps (from step 3)" in r.stdout


def test_axolotls_zero2_path_offloads_the_optimizer(tmp_path):
    "axolotl's `deepspeed_configs/zero2.json` (the optimizer state in CPU memory: DeepSpeed's CPU-Adam) from a pasted config."
    r = ftlab("train", config(tmp_path, "offload", "deepspeed: deepspeed_configs/zero2.json\n"), "--num-processes", 2,
              "--max-steps", 2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "is read as ftlab's preset `zero2`, the same file" in r.stdout
    assert starts(tmp_path / "offload")[0]["strategy"] == "DeepSpeed ZeRO-2 (optimizer state offloaded to CPU)"
    assert len(logs(tmp_path / "offload")) == 2


def test_dpo_full_fine_tune_with_its_reference_copy_under_zero3(tmp_path):
    "The frozen reference of a full fine-tune is partitioned by its own DeepSpeed engine (TRL's `prepare_deepspeed`)."
    base = BASE.replace("adapter: lora\nlora_r: 8\nlora_alpha: 16\nlora_target_linear: true\n", "").replace(
        "ftlab:data/chat.jsonl", "ftlab:data/preference.jsonl").replace("learning_rate: 0.002", "learning_rate: 0.00005")
    r = ftlab("train", config(tmp_path, "dpo", "rl: dpo\ndeepspeed: zero3\n", base), "--num-processes", 2, "--max-steps", 2)
    assert r.returncode == 0, r.stdout + r.stderr
    (start,) = starts(tmp_path / "dpo")
    assert start["strategy"] == "DeepSpeed ZeRO-3" and start["world_size"] == 2
    first = logs(tmp_path / "dpo")[0]
    assert math.isclose(first["loss"], math.log(2), rel_tol=1e-3)    # the policy starts as its reference: margin 0
    assert (tmp_path / "dpo" / "model.safetensors").exists()         # ZeRO-3 gathered the weights for the final save


def test_the_mistakes_are_one_message_before_any_worker(tmp_path):
    r = ftlab("train", config(tmp_path, "py", "deepspeed: zero3\n"), "--launcher", "python", "--max-steps", 1)
    assert r.returncode == 2 and "error: key `deepspeed`: DeepSpeed runs in processes started by a launcher" in r.stderr
    r = ftlab("train", config(tmp_path, "bf16", "deepspeed: zero3_bf16\nbf16: false\n"), "--num-processes", 2, "--max-steps", 1)
    assert r.returncode == 2 and "preset `zero3_bf16` sets `bf16.enabled: true` but this run trains in float32" in r.stderr
    assert "training:" not in r.stdout and "Traceback" not in r.stderr
