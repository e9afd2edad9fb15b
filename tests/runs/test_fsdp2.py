"""FSDP2's sharding on two CPU processes (gloo). Accelerate makes a run FSDP only on GPUs, so the sharding is driven
here as the trainer drives it there: the config's keys through ftlab's training arguments and transformers into
Accelerate's FSDP plugin, then Accelerate's own `fsdp2_prepare_model` (torch's `fully_shard` per decoder layer).
One optimizer step on half the batch per rank must leave the same weights as one step of the unsharded model on the
whole batch."""
import json, subprocess, sys
from pathlib import Path

import pytest

from run_helpers import RUN_CONFIG, checkout_env
from ftlab.distributed import free_port

WORKER = '''
import copy, json, sys
from types import SimpleNamespace as NS
import torch, torch.distributed as dist
from transformers import AutoModelForCausalLM, TrainingArguments
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from ftlab.assets import embedded_path
from ftlab.config import load_config
from ftlab.methods.common import parallel_args

cfg = load_config("""base_model: ftlab:tiny
datasets: [{path: ftlab:data/chat.jsonl}]
fsdp_version: 2
fsdp_config:
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_state_dict_type: SHARDED_STATE_DICT
""")
args = TrainingArguments(output_dir=sys.argv[1], use_cpu=True, report_to=[], **parallel_args(cfg, fsdp_here=True))
rank, n = dist.get_rank(), dist.get_world_size()
plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
tiny = str(embedded_path("ftlab:tiny"))
model, ref, start = (AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32) for _ in range(3))
accelerator = NS(state=NS(fsdp_plugin=plugin), mixed_precision="no", is_main_process=rank == 0, parallelism_config=None,
                 device=torch.device("cpu"))
sharded = fsdp2_prepare_model(accelerator, model)
ids = torch.randint(4, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
def step(m, batch):
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m(input_ids=batch, labels=batch).loss.backward()
    opt.step()
step(sharded, ids[2 * rank: 2 * rank + 2])     # each rank half the batch; FSDP averages the gradients
step(ref, ids)                                  # the unsharded model, the whole batch
full = {k: p.full_tensor() for k, p in sharded.named_parameters()}
out = dict(world=n, fsdp_version=plugin.fsdp_version, state_dict_type=str(plugin.state_dict_type),
           units=sorted({type(m).__name__ for m in sharded.modules() if isinstance(m, FSDPModule)}),
           all_dtensors=all(isinstance(p, DTensor) for p in sharded.parameters()),
           local=sum(p.to_local().numel() for p in sharded.parameters()), total=sum(p.numel() for p in ref.parameters()),
           diff=max((full[k] - q).abs().max().item() for k, q in ref.named_parameters()),
           moved=max((full[k] - q).abs().max().item() for k, q in start.named_parameters()))
if rank == 0: print("RESULT " + json.dumps(out), flush=True)
'''


def test_fsdp2_sharded_step_equals_the_unsharded_one(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                        f"--master_port={free_port()}", str(tmp_path / "worker.py"), str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path, env=checkout_env(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(next(l for l in r.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    assert res["world"] == 2 and res["fsdp_version"] == 2 and "SHARDED_STATE_DICT" in res["state_dict_type"]
    # each decoder layer is its own unit (the wrap policy from the config), the rest is the root's
    assert "FSDPLlamaDecoderLayer" in res["units"] and "FSDPLlamaForCausalLM" in res["units"]
    assert res["all_dtensors"] and res["local"] < 0.55 * res["total"]          # each rank holds half of every weight
    assert res["moved"] > 0.1 and res["diff"] < 1e-5, res                      # the step did something, and the same thing


@pytest.mark.gpu
def test_qlora_under_fsdp2_on_one_gpu_saves_sharded_checkpoints_and_resumes(tmp_path):
    """On a CUDA machine `ftlab train` starts one FSDP2 worker for one GPU: QLoRA's 4-bit weights (stored in the compute
    dtype) are sharded, checkpoints hold torch's distributed-checkpoint shards, a resume reads them, and the final
    adapter is saved whole."""
    from ftlab.events import read_metrics
    from ftlab.runfolder import checkpoints
    cfg = tmp_path / "fsdp.yaml"
    cfg.write_text(RUN_CONFIG.format(out=tmp_path / "out").replace("adapter: lora", "adapter: qlora\nload_in_4bit: true")
                   .replace("save_steps: 1000", "save_steps: 2")
                   + "fsdp_version: 2\nfsdp_config:\n  state_dict_type: SHARDED_STATE_DICT\n  activation_checkpointing: true\n")
    run = lambda *a: subprocess.run([sys.executable, "-m", "ftlab", "train", str(cfg), *a], capture_output=True, text=True, timeout=600, env=checkout_env())
    r = run("--max-steps", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    (start,) = [x for x in read_metrics(tmp_path / "out") if x["event"] == "start"]
    assert start["strategy"] == "FSDP2" and start["world_size"] == 1 and "parallel  FSDP2" in r.stdout
    good, _ = checkpoints(tmp_path / "out")
    assert [p.name for p in good] == ["checkpoint-2"] and (good[0] / "pytorch_model_fsdp_0" / ".metadata").is_file()
    assert (tmp_path / "out" / "adapter_model.safetensors").stat().st_size > 0
    r = run("--max-steps", "4", "--resume")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [x["step"] for x in read_metrics(tmp_path / "out") if x["event"] == "log"][-2:] == [3, 4]


@pytest.mark.gpu
def test_full_fine_tuning_under_fsdp2_on_one_gpu_saves_sharded_state_and_a_whole_model(tmp_path):
    """Full fine-tuning (no adapter) under FSDP2 with one worker: the checkpoint holds the sharded model and optimizer
    state, a resume continues from it, and the final model is saved whole, loadable with `from_pretrained`."""
    import re
    from transformers import AutoModelForCausalLM
    from ftlab.events import read_metrics
    from ftlab.runfolder import checkpoints
    cfg = tmp_path / "full.yaml"
    text = re.sub(r"adapter: lora\nlora_r: 8\nlora_alpha: 16\nlora_target_linear: true\n", "", RUN_CONFIG.format(out=tmp_path / "out"))
    assert "lora" not in text
    cfg.write_text(text.replace("save_steps: 1000", "save_steps: 2").replace("learning_rate: 0.002", "learning_rate: 0.0001")
                   + "fsdp_version: 2\nfsdp_config:\n  state_dict_type: SHARDED_STATE_DICT\n")
    run = lambda *a: subprocess.run([sys.executable, "-m", "ftlab", "train", str(cfg), *a], capture_output=True, text=True, timeout=300, env=checkout_env())
    r = run("--max-steps", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    (start,) = [x for x in read_metrics(tmp_path / "out") if x["event"] == "start"]
    assert start["strategy"] == "FSDP2" and start["world_size"] == 1
    good, _ = checkpoints(tmp_path / "out")
    assert [p.name for p in good] == ["checkpoint-2"]
    assert (good[0] / "pytorch_model_fsdp_0" / ".metadata").is_file() and (good[0] / "optimizer_0" / ".metadata").is_file()
    r = run("--max-steps", "3", "--resume")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [x["step"] for x in read_metrics(tmp_path / "out") if x["event"] == "log"][-1:] == [3]
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert sum(p.numel() for p in model.parameters()) > 0
