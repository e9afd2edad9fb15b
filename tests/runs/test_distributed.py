"""Several processes through `ftlab train --num-processes 2` (DDP over gloo on the CPU): the same training as one
process with accumulation, one run folder written by rank 0, a stop every rank takes at the same step, a worker's
mistake said once with its ranks, GRPO and EBFT training each rank on prompts of its own, and DDP's search for unused
parameters off unless the config asks for it."""
import json, os, re, shlex, signal, subprocess, sys
from pathlib import Path
import pytest
from ftlab.events import read_metrics
from run_helpers import RUN_CONFIG as CFG, checkout_env

EXE = Path(sys.executable).parent / "ftlab"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def config(tmp_path, name, extra="", swap=None):
    "The shared LoRA run (`RUN_CONFIG`) as `name.yaml`, writing to `tmp_path/name`: `extra` keys added, `swap` texts replaced."
    text = CFG.format(out=tmp_path / name) + extra
    for old, new in (swap or {}).items(): text = text.replace(old, str(new))
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    return p


def grpo_config(tmp_path, name, reward, data="ftlab:data/counting.jsonl"):
    "A short GRPO run on counting prompts: each rank's micro-batch of 4 is the 4 completions of one prompt."
    return config(tmp_path, name, f"rl: grpo\ntrl:\n  reward_funcs: [{reward}]\n  num_generations: 4\n  max_completion_length: 8\n",
                  swap={"ftlab:data/chat.jsonl": data, "micro_batch_size: 2": "micro_batch_size: 4"})


def ftlab(*args, timeout=300, path=None):
    "`ftlab ARGS`; `path`: a folder the workers import from (reward functions written by the test)."
    env = {**os.environ, "PYTHONPATH": f"{path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"} if path else None
    return subprocess.run([str(EXE), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def logs(folder): return [r for r in read_metrics(folder) if r["event"] == "log"]


def start(folder):
    (s,) = [r for r in read_metrics(folder) if r["event"] == "start"]
    return s


def two_ranks_logged_once(folder, steps=(1, 2)):
    "Both ranks trained (the start event's world size), and rank 0 alone logged each step, once, to one metrics.jsonl."
    assert start(folder)["world_size"] == 2
    assert [r["step"] for r in logs(folder)] == list(steps)
    assert sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("metrics")) == ["metrics.jsonl"]


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
    two_ranks_logged_once(ddp, steps=(1, 2, 3))
    assert "training: 3 steps on 2 processes" in two.stdout and "effective 4 (2 processes)" in two.stdout
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
    r = ftlab("train", grpo_config(tmp_path, "grpo", "flaky_rewards.flaky"), "--num-processes", 2, "--max-steps", 3, path=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "error (ranks 0, 1): key `trl.reward_funcs`: reward function `flaky` raised KeyError at step 2" in r.stderr
    assert r.stderr.count("raised KeyError") == 1 and "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr
    assert "training: 3 steps on 2 processes" in r.stdout and "step 1 · loss" in r.stdout


def test_two_processes_stream_their_own_rows_and_save_where_each_stands(tmp_path):
    """`pretraining_dataset` on two processes: each trains rows of its own share of the documents, and the checkpoint
    holds each process's position: the one after exactly the rows that process's stream gives first."""
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
    assert start(tmp_path / "out")["world_size"] == 2 and "effective 4 (2 processes) · 2 steps · 256 tokens per step" in two.stdout
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
                                   "fsdp_state_dict_type: SHARDED_STATE_DICT\n", swap={"save_steps: 1000": "save_steps: 2"})
    r = ftlab("train", cfg, "--num-processes", 2, "--max-steps", 2)
    assert r.returncode == 0, r.stdout + r.stderr
    said = "FSDP2 shards across GPUs; on a machine without one Accelerate trains with DDP (gloo): nothing is sharded or offloaded"
    assert f"parallel  DDP — {said}" in r.stdout and f"note: {said}" in r.stdout        # the plan, then the run
    two_ranks_logged_once(tmp_path / "fsdp")
    assert start(tmp_path / "fsdp")["strategy"] == "DDP" and "training: 2 steps on 2 processes · DDP" in r.stdout
    ckpt = tmp_path / "fsdp" / "checkpoint-2"
    assert (ckpt / "rng_state_1.pth").exists() and not list(ckpt.glob("pytorch_model_fsdp*"))   # a DDP checkpoint


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
    swap = {"ftlab:data/chat.jsonl": "ftlab:data/preference.jsonl", "type: chat_template": f"type: {data_type}"}
    two = ftlab("train", config(tmp_path, "two", method + "\n", swap), "--num-processes", 2, "--max-steps", 3)
    one = ftlab("train", config(tmp_path, "one", method + "\ngradient_accumulation_steps: 2\n", swap), "--max-steps", 3)
    assert two.returncode == 0 and one.returncode == 0, two.stderr[-2000:] + one.stderr[-2000:]
    assert start(tmp_path / "two")["world_size"] == 2
    a, b = logs(tmp_path / "two"), logs(tmp_path / "one")
    assert [r["step"] for r in a] == [1, 2, 3] and any(logged in k for k in a[-1]), a[-1].keys()
    for x, y in zip(a, b): assert abs(x["loss"] - y["loss"]) < 1e-5, (x["loss"], y["loss"])
    wa, wb = adapter(tmp_path / "two"), adapter(tmp_path / "one")
    assert wa.keys() == wb.keys() and max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


# --- GRPO and EBFT under DDP ---------------------------------------------------------------------------------------

SEEN_REWARD = '''import json, os
from pathlib import Path
def seen(prompts, completions, trainer_state=None, **kw):
    "A cheap reward that notes, at each training step, the prompts this rank scored (in seen-RANK.jsonl beside this file)."
    if trainer_state is not None:     # not ftlab's check of the function before training
        with open(Path(__file__).parent / f"seen-{os.environ['RANK']}.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer_state.global_step + 1, "prompts": sorted({p[-1]["content"] for p in prompts})}) + "\\n")
    return [float(len(c[0]["content"]) % 3) for c in completions]
'''


def test_grpo_under_ddp_trains_each_rank_on_prompts_of_its_own(tmp_path):
    """GRPO on 2 processes: each rank generates and scores the 4 completions of its own prompt at each step (a reward
    function notes what each rank scored), rank 0 logs and stores both ranks' completions, and the adapter is saved."""
    from ftlab.assets import embedded_path
    from ftlab.completions import read_completions
    rows = {}                       # the counting prompts, each once, so that a prompt names its row
    for line in embedded_path("ftlab:data/counting.jsonl").read_text().splitlines():
        rows.setdefault(json.loads(line)["prompt"][-1]["content"], line)
    (tmp_path / "counting.jsonl").write_text("\n".join(rows.values()) + "\n")
    (tmp_path / "seen_rewards.py").write_text(SEEN_REWARD)
    cfg = grpo_config(tmp_path, "grpo", "seen_rewards.seen", data=tmp_path / "counting.jsonl")
    r = ftlab("train", cfg, "--num-processes", 2, "--max-steps", 2, path=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / "grpo"
    two_ranks_logged_once(out)
    assert all({"reward", "reward_std", "rewards/seen/mean", "frac_reward_zero_std"} <= set(x) for x in logs(out)), logs(out)[-1].keys()
    seen = {rank: [json.loads(l) for l in (tmp_path / f"seen-{rank}.jsonl").read_text().splitlines()] for rank in (0, 1)}
    assert all([s["step"] for s in seen[rank]] == [1, 2] and all(len(s["prompts"]) == 1 for s in seen[rank]) for rank in (0, 1))
    mine = {rank: {p for s in seen[rank] for p in s["prompts"]} for rank in (0, 1)}
    assert len(mine[0]) == len(mine[1]) == 2 and not mine[0] & mine[1]       # 4 prompts, none trained twice
    stored = read_completions(out)                                           # rank 0's record of both ranks' samples
    for step in (1, 2):
        assert sorted(c["prompt"] for c in stored if c["step"] == step) == sorted(4 * [s["prompts"][0] for rank in (0, 1)
                                                                                    for s in seen[rank] if s["step"] == step])
    assert (out / "adapter_model.safetensors").stat().st_size > 0 and "Traceback" not in r.stderr


def test_ebft_under_ddp_trains_each_rank_on_prompts_of_its_own(tmp_path):
    """EBFT (structured, axolotl's no-vLLM example) on 2 processes: the EBFT metrics are logged once per step; each rank
    samples 4 completions of a prompt of its own per step (TRL gathers the ranks' samples in rank order: rank 0's
    first), and each sample's reward is its own alignment minus diversity, computed on all ranks' features and handed
    back to the rank that drew it."""
    from ftlab.completions import read_completions
    out = tmp_path / "ebft"
    cfg = tmp_path / "ebft.yaml"
    cfg.write_text((CONFIGS / "ebft_opencode_novllm.yaml").read_text().replace("./outputs/ebft-validation", str(out)))
    r = ftlab("train", cfg, "--num-processes", 2, "--max-steps", 2)
    assert r.returncode == 0, r.stdout + r.stderr
    two_ranks_logged_once(out)
    assert all({"ebft/reward", "ebft/alignment", "ebft/diversity", "ebft/cfm_loss"} <= set(x) for x in logs(out))
    stored, prompts = read_completions(out), {0: set(), 1: set()}
    for step in (1, 2):
        rows = [c for c in stored if c["step"] == step]
        assert len(rows) == 2 * 4                      # micro-batch 2 x accumulation 2 on each rank: one prompt's 4 samples
        for rank, half in enumerate((rows[:4], rows[4:])):
            assert len({c["prompt"] for c in half}) == 1
            prompts[rank].add(half[0]["prompt"])
        for c in rows:
            assert c["rewards"]["feature_matching"] == pytest.approx(c["parts"]["alignment"] - c["parts"]["diversity"], abs=1e-5)
    assert len(prompts[0]) == len(prompts[1]) == 2 and not prompts[0] & prompts[1]
    assert (out / "adapter_model.safetensors").stat().st_size > 0 and "Traceback" not in r.stderr


# --- DDP's search for unused parameters ----------------------------------------------------------------------------

def tiny_multimodal(folder) -> int:
    """A random-init Gemma 3 vision-language model with the tiny model's tokenizer, saved to `folder`; text-only rows
    never reach its vision tower. Returns the number of linear layers in that tower."""
    import shutil, torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    from ftlab.assets import embedded_path
    cfg = Gemma3Config(
        text_config=dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=32, max_position_embeddings=1024, sliding_window=64,
                         pad_token_id=3, bos_token_id=0, eos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                           patch_size=14),
        mm_tokens_per_image=1, image_token_index=1023, boi_token_index=1021, eoi_token_index=1022)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(cfg)
    model.save_pretrained(folder)
    tiny = embedded_path("ftlab:tiny")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"): shutil.copy(tiny / name, Path(folder) / name)
    return sum(isinstance(m, torch.nn.Linear) for m in model.model.vision_tower.modules())


def test_lora_on_a_vision_tower_the_text_never_reaches_is_one_message_and_the_key_trains_it(tmp_path):
    """A multimodal model trained on text, with LoRA on every linear layer (its vision tower's too): those adapters get
    no gradient. DDP, which by default does not look for such parameters, stops at step 2: one message from both ranks
    with the key, the parameters and the fix. With `ddp_find_unused_parameters: true` the same run trains, and the vision
    tower's adapters are left as they started."""
    linears = tiny_multimodal(tmp_path / "vlm")
    swap = {"ftlab:tiny": tmp_path / "vlm"}
    cfg = config(tmp_path, "unused", swap=swap)
    r = ftlab("train", cfg, "--num-processes", 2, "--max-steps", 2)
    assert r.returncode == 2, r.stdout + r.stderr
    assert re.search(rf"^error \(ranks 0, 1\): {re.escape(str(cfg))}, key `ddp_find_unused_parameters`: DDP stopped at step 2: "
                     rf"{2 * linears} trainable parameters \(`base_model\.model\.model\.vision_tower\.", r.stderr, re.M), r.stderr
    assert "took no part in the loss, and with `ddp_find_unused_parameters: false` (the default)" in r.stderr
    assert "fix: set `ddp_find_unused_parameters: true`" in r.stderr
    assert r.stderr.count("error") == 1 and "Traceback" not in r.stderr and "RuntimeError" not in r.stderr
    assert "step 1 · loss" in r.stdout
    ok = ftlab("train", config(tmp_path, "found", "ddp_find_unused_parameters: true\n", swap), "--num-processes", 2, "--max-steps", 2)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    two_ranks_logged_once(tmp_path / "found")
    w = adapter(tmp_path / "found")
    vision = [v for k, v in w.items() if "vision_tower" in k and "lora_B" in k]
    text = [v for k, v in w.items() if "language_model" in k and "lora_B" in k]
    assert len(vision) == linears and all((v == 0).all() for v in vision)    # LoRA's B starts at 0: never trained
    assert text and any((v != 0).any() for v in text)


def test_torchrun_by_hand_trains_without_ddp_searching_for_unused_parameters(tmp_path):
    """`torchrun -m ftlab train` (with `ACCELERATE_USE_CPU=1` on a CPU), the workers' output as they wrote it: LoRA
    trains on both ranks, and torch no longer warns on each that DDP searched every step for unused parameters and
    found none (what transformers' own default does for a PEFT model)."""
    from ftlab.distributed import free_port
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                        f"--master_port={free_port()}", "-m", "ftlab", "train", str(config(tmp_path, "torchrun")), "--max-steps", "2"],
                       capture_output=True, text=True, timeout=300, env=checkout_env(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    two_ranks_logged_once(tmp_path / "torchrun")
    assert "find_unused_parameters=True was specified" not in r.stderr and "Traceback" not in r.stderr
