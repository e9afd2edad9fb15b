"""Small pieces several test rooms share (importable from any of them: pytest puts tests/ on the path for conftest.py)."""
import os
from pathlib import Path
from ftlab.events import read_metrics

ROOT = Path(__file__).resolve().parents[1]

# a short LoRA run on the tiny model for tests that start `ftlab train` (`.format(out=OUTPUT_DIR)`)
RUN_CONFIG = """base_model: ftlab:tiny
adapter: lora
lora_r: 8
lora_alpha: 16
lora_target_linear: true
sequence_len: 128
micro_batch_size: 2
learning_rate: 0.002
logging_steps: 1
save_steps: 1000
output_dir: {out}
datasets:
  - path: ftlab:data/chat.jsonl
    type: chat_template
"""

# a LoRA config fragment that visibly learns on the tiny model in a few steps
LORA = "adapter: lora\nlora_r: 8\nlora_alpha: 16\nlora_target_linear: true\nlearning_rate: 0.002\nmicro_batch_size: 8\n"


def logs(run):
    "The run's training log records, from its metrics.jsonl."
    return [r for r in read_metrics(run.output_dir) if r["event"] == "log"]


def checkout_env(**extra) -> dict:
    "The environment for a fresh Python process that imports ftlab from this checkout (keeping the caller's path)."
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra}
