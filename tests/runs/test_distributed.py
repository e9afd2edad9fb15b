"""Several processes through `ftlab train --num-processes 2` (DDP over gloo on the CPU): the same training as one
process with accumulation, one run folder written by rank 0, a stop every rank takes at the same step, and a
worker's mistake said once with its ranks."""
import os, re, shlex, signal, subprocess, sys
from pathlib import Path
import pytest
from ftlab.events import read_metrics
from run_helpers import RUN_CONFIG as CFG

EXE = Path(sys.executable).parent / "ftlab"


def config(tmp_path, name, extra=""):
    p = tmp_path / f"{name}.yaml"
    p.write_text(CFG.format(out=tmp_path / name) + extra)
    return p


def ftlab(*args, timeout=300):
    return subprocess.run([str(EXE), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def logs(folder): return [r for r in read_metrics(folder) if r["event"] == "log"]


def adapter(folder):
    from safetensors.torch import load_file
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def test_two_processes_train_exactly_like_one_with_accumulation(tmp_path):
    two = ftlab("train", config(tmp_path, "ddp"), "--num-processes", 2, "--max-steps", 3)
    assert two.returncode == 0, two.stdout + two.stderr
    one = ftlab("train", config(tmp_path, "accum", "gradient_accumulation_steps: 2\n"), "--max-steps", 3)
    half = ftlab("train", config(tmp_path, "half"), "--max-steps", 3)   # one process, one micro-batch: half the rows
    assert one.returncode == 0 and half.returncode == 0, one.stderr + half.stderr
    ddp, acc, alone = tmp_path / "ddp", tmp_path / "accum", tmp_path / "half"
    (start,) = [r for r in read_metrics(ddp) if r["event"] == "start"]
    assert start["world_size"] == 2 and "training: 3 steps on 2 processes" in two.stdout
    assert "effective 4 (2 processes)" in two.stdout
    assert [r["step"] for r in logs(ddp)] == [1, 2, 3]                 # one log, written once, by rank 0
    assert sorted(p.name for p in ddp.iterdir() if p.name.startswith("metrics")) == ["metrics.jsonl"]
    assert [r["loss"] for r in logs(ddp)] == [r["loss"] for r in logs(acc)]
    a, b = adapter(ddp), adapter(acc)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bit for bit
    # the second rank's rows counted: without them (one process, one micro-batch) the run differs
    assert [r["loss"] for r in logs(alone)] != [r["loss"] for r in logs(ddp)]
    assert two.stdout.count("done:") == 1 and "Traceback" not in two.stderr


def test_ctrl_c_stops_every_rank_at_one_step_and_the_printed_command_resumes(tmp_path):
    cfg = config(tmp_path, "stop")
    proc = subprocess.Popen([str(EXE), "train", str(cfg), "--num-processes", "2", "--set", "max_steps=300"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 2 "): proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    out, err = "".join(lines), proc.stderr.read()
    assert proc.returncode == 130, out + err
    step = int(re.search(r"interrupted at step (\d+)", out).group(1))
    ckpt = tmp_path / "stop" / f"checkpoint-{step}"
    assert (ckpt / "trainer_state.json").exists() and (ckpt / "rng_state_0.pth").exists() and (ckpt / "rng_state_1.pth").exists()
    said = re.search(r"Resume with `([^`]+)`", out).group(1)
    assert said == shlex.join(["ftlab", "train", str(cfg), "--set", "max_steps=300", "--num-processes", "2", "--resume"])
    again = ftlab(*shlex.split(said.replace("max_steps=300", f"max_steps={step + 2}"))[1:])
    assert again.returncode == 0, again.stdout + again.stderr
    starts = [r for r in read_metrics(tmp_path / "stop") if r["event"] == "start"]
    assert [s["step"] for s in starts] == [0, step] and all(s["world_size"] == 2 for s in starts)
    assert [r["step"] for r in logs(tmp_path / "stop")][-2:] == [step + 1, step + 2]


def test_a_mistake_found_by_the_workers_is_one_message_with_the_ranks(tmp_path):
    """GRPO under DDP, with a reward function (importable by every worker) that fails at step 2 on both ranks: one
    message naming the function, the step and the ranks; no traceback, no launcher report."""
    (tmp_path / "flaky_rewards.py").write_text(
        "def flaky(completions, trainer_state=None, **kw):\n"
        "    if trainer_state is not None and trainer_state.global_step == 1: raise KeyError('answer')\n"
        "    return [float(len(c[0]['content']) % 3) for c in completions]\n")
    cfg = tmp_path / "grpo.yaml"
    cfg.write_text(CFG.format(out=tmp_path / "grpo").replace("ftlab:data/chat.jsonl", "ftlab:data/counting.jsonl")
                   .replace("micro_batch_size: 2", "micro_batch_size: 4") + "rl: grpo\ntrl:\n  reward_funcs: [flaky_rewards.flaky]\n  num_generations: 4\n"
                     "  max_completion_length: 8\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([str(EXE), "train", str(cfg), "--num-processes", "2", "--max-steps", "3"], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "error (ranks 0, 1): key `trl.reward_funcs`: reward function `flaky` raised KeyError at step 2" in r.stderr
    assert r.stderr.count("raised KeyError") == 1 and "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr
    assert "training: 3 steps on 2 processes" in r.stdout and "step 1 · loss" in r.stdout


def test_two_processes_stream_their_own_rows_and_save_where_each_stands(tmp_path):
    """`pretraining_dataset` on two processes: each trains rows of its own share of the documents, and the checkpoint
    holds each process's position: the one after exactly the rows that process's stream gives first."""
    import json
    from itertools import islice
    from ftlab.config import load_config
    from ftlab.stream import STATE_FILE, STATE_KEY, Stream
    from ftlab.tokenizer import load_tokenizer
    words = "the cat sat on a mat while rain fell over old hills and quiet rivers".split()
    (tmp_path / "corpus.jsonl").write_text("".join(
        json.dumps({"text": f"Story {i}: " + " ".join(words[(i * 5 + k) % len(words)] for k in range(3 + i % 19))}) + "\n"
        for i in range(60)))
    cfg = tmp_path / "stream.yaml"
    cfg.write_text(f"base_model: ftlab:tiny\nsequence_len: 64\nsample_packing: true\nmicro_batch_size: 2\nmax_steps: 2\n"
                   f"save_steps: 2\nstreaming_multipack_buffer_size: 16\noutput_dir: {tmp_path / 'out'}\n"
                   f"pretraining_dataset:\n  - path: {tmp_path / 'corpus.jsonl'}\n")
    two = ftlab("train", cfg, "--num-processes", 2)
    assert two.returncode == 0, two.stdout + two.stderr
    (start,) = [r for r in read_metrics(tmp_path / "out") if r["event"] == "start"]
    assert start["world_size"] == 2 and "effective 4 (2 processes) · 2 steps · 256 tokens per step" in two.stdout
    saved = json.loads((tmp_path / "out" / "checkpoint-2" / STATE_FILE).read_text())
    assert saved["processes"] == 2
    c = load_config(cfg)
    stream = Stream(c, load_tokenizer(c))
    rows = [list(islice(stream.rows(rank, 2), 4)) for rank in (0, 1)]       # 2 steps x 2 rows on each process
    assert [json.loads(r[-1][STATE_KEY]) for r in rows] == saved["positions"]
    assert not {tuple(x["input_ids"]) for x in rows[0]} & {tuple(x["input_ids"]) for x in rows[1]}


def test_fsdp2_on_a_cpu_says_it_trains_with_ddp(tmp_path):
    """`fsdp_version: 2` on two CPU processes: Accelerate makes a run FSDP only on GPUs, so the same processes train
    with DDP. The plan and the run say so (and the start event records it) rather than pretend to shard."""
    cfg = config(tmp_path, "fsdp", "fsdp_version: 2\nfsdp_config:\n  fsdp_offload_params: true\n  "
                                   "fsdp_state_dict_type: SHARDED_STATE_DICT\n")
    cfg.write_text(cfg.read_text().replace("save_steps: 1000", "save_steps: 2"))
    r = ftlab("train", cfg, "--num-processes", 2, "--max-steps", 2)
    assert r.returncode == 0, r.stdout + r.stderr
    said = "FSDP2 shards across GPUs; on a machine without one Accelerate trains with DDP (gloo): nothing is sharded or offloaded"
    assert f"parallel  DDP — {said}" in r.stdout and f"note: {said}" in r.stdout        # the plan, then the run
    (start,) = [x for x in read_metrics(tmp_path / "fsdp") if x["event"] == "start"]
    assert start["world_size"] == 2 and start["strategy"] == "DDP" and "training: 2 steps on 2 processes · DDP" in r.stdout
    ckpt = tmp_path / "fsdp" / "checkpoint-2"
    assert (ckpt / "rng_state_1.pth").exists() and not list(ckpt.glob("pytorch_model_fsdp*"))   # a DDP checkpoint
    assert [x["step"] for x in logs(tmp_path / "fsdp")] == [1, 2]


def test_deepspeed_needs_its_package_or_runs(tmp_path):
    "Without the deepspeed package a DeepSpeed config is one message before anything starts (scripts/test_deepspeed.sh runs it)."
    from ftlab.config.parallel import deepspeed_installed
    r = ftlab("validate", config(tmp_path, "ds", "deepspeed: zero3\n"))
    if deepspeed_installed():
        assert r.returncode == 0, r.stdout + r.stderr
    else:
        assert r.returncode == 2 and r.stderr.count("\n") <= 3, r.stderr
        assert "key `deepspeed`: `deepspeed` asks for DeepSpeed ZeRO, and the deepspeed package is not installed" in r.stderr
        assert "pip install deepspeed" in r.stderr


@pytest.mark.parametrize("method, data_type, logged", [("rl: dpo", "chat_template.default", "rewards/margins"),
                                                      ("reward_model: true", "bradley_terry.chat_template", "accuracy")])
def test_preference_methods_under_ddp_match_one_process_with_accumulation(tmp_path, method, data_type, logged):
    "DPO and a reward model, LoRA, 2 processes x micro-batch 2 against 1 process x 2 x accumulation 2: the same losses and weights."
    def text(name, extra=""):
        return config(tmp_path, name, extra).read_text().replace("ftlab:data/chat.jsonl", "ftlab:data/preference.jsonl") \
            .replace("type: chat_template", f"type: {data_type}") + method + "\n"
    (tmp_path / "two.yaml").write_text(text("two"))
    (tmp_path / "one.yaml").write_text(text("one", "gradient_accumulation_steps: 2\n"))
    two = ftlab("train", tmp_path / "two.yaml", "--num-processes", 2, "--max-steps", 3)
    one = ftlab("train", tmp_path / "one.yaml", "--max-steps", 3)
    assert two.returncode == 0 and one.returncode == 0, two.stderr[-2000:] + one.stderr[-2000:]
    (start,) = [r for r in read_metrics(tmp_path / "two") if r["event"] == "start"]
    assert start["world_size"] == 2
    a, b = logs(tmp_path / "two"), logs(tmp_path / "one")
    assert [r["step"] for r in a] == [1, 2, 3] and any(logged in k for k in a[-1]), a[-1].keys()
    for x, y in zip(a, b): assert abs(x["loss"] - y["loss"]) < 1e-5, (x["loss"], y["loss"])
    wa, wb = adapter(tmp_path / "two"), adapter(tmp_path / "one")
    assert wa.keys() == wb.keys() and max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
