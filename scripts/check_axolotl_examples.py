"""How axolotl's example configs fare in ftlab: accepted, refused (by cause) or crashed, and optionally trained.

    python scripts/check_axolotl_examples.py PATH_TO_AXOLOTL [--table] [--trial N] [--only SUBSTRING]

PATH_TO_AXOLOTL is a checkout or a bare git repository (its `examples/` are read at HEAD with git). Every YAML file
under `examples/` that is a training config (it has `base_model`) is loaded with `ftlab.config.load_config`,
datasets and all, as a person would paste it. A refusal is sorted by its cause (multi-GPU, multimodal, MoE,
plugin, method, dataset format, ...); any exception that is not ftlab's one-message error is a crash.

`--trial N` then trains N accepted configs, chosen to vary method, adapter and data format, with
`ftlab train --max-steps 2`: each in a rewritten copy with `base_model: ftlab:tiny`, the datasets swapped for the
embedded data of the same shape (`ftlab:data/*.jsonl`), and sizes cut to what a CPU trains in seconds.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ftlab.config import load_config          # noqa: E402
from ftlab.errors import ConfigError          # noqa: E402

# causes, first match wins: (name, pattern over the message); the first three are features this version leaves out
CAUSES = [
    ("multi-GPU", r"multi-GPU|one device|several GPUs|deepspeed|fsdp"),
    ("multimodal", r"multimodal|vision|image|audio|processor"),
    ("MoE", r"MoE|expert"),
    ("unknown key", r"unknown key"),
    ("chat template keys", r"eot_tokens|field_thinking|template_thinking_key|chat-template|chat template"),
    ("plugin", r"plugin"),
    ("method", r"`rl: |reward_model: true|process_reward_model: true"),
    ("dataset format", r"`type: |dataset"),
    ("optimizer / scheduler", r"optimizer|lr_scheduler"),
]
OUT_OF_SCOPE = ("multi-GPU", "multimodal", "MoE")


class Examples:
    "The example YAML files of an axolotl checkout or bare repository: (name, text) pairs."
    def __init__(self, path: str):
        self.path = Path(path)
        self.bare = not (self.path / "examples").is_dir()

    def _git(self, *args) -> str:
        return subprocess.run(["git", "-C", str(self.path), *args], check=True, capture_output=True, text=True).stdout

    def __iter__(self):
        if self.bare:
            names = [n for n in self._git("ls-tree", "-r", "HEAD", "--name-only", "--", "examples").split()
                     if n.endswith((".yml", ".yaml"))]
            for n in sorted(names): yield n, self._git("show", f"HEAD:{n}")
        else:
            for p in sorted(self.path.glob("examples/**/*.y*ml")): yield str(p.relative_to(self.path)), p.read_text()


def cause_of(err: ConfigError) -> tuple[str, list[str]]:
    "(the cause, the messages) of a refusal; the first out-of-scope cause wins."
    msgs = [p.message for p in err.problems] or [str(err)]
    found = [next((name for name, pat in CAUSES if re.search(pat, m, re.I)), "other") for m in msgs]
    for c in OUT_OF_SCOPE + tuple(n for n, _ in CAUSES) + ("other",):
        if c in found: return c, msgs
    return "other", msgs


def check(path: str, only: str | None = None):
    "One row per example config: (name, status, cause, detail, text, cfg)."
    rows = []
    for name, text in Examples(path):
        if only and only not in name: continue
        try: data = yaml.safe_load(text)
        except yaml.YAMLError: data = None
        if not isinstance(data, dict) or "base_model" not in data: continue   # not a training config
        try:
            cfg = load_config(text, name=name)
            rows.append((name, "accepted", "", "", text, cfg))
        except ConfigError as e:
            c, msgs = cause_of(e)
            rows.append((name, "refused", c, " | ".join(msgs), text, None))
        except Exception as e:  # noqa: BLE001 - what this script exists to find
            rows.append((name, "crashed", type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "", text, None))
    return rows


def summary(rows) -> dict:
    status = collections.Counter(r[1] for r in rows)
    causes = collections.Counter(r[2] for r in rows if r[1] == "refused")
    in_scope = [r for r in rows if not (r[1] == "refused" and r[2] in OUT_OF_SCOPE)]
    accepted = sum(r[1] == "accepted" for r in in_scope)
    unknown = {m for r in rows for m in re.findall(r"unknown key `([^`]+)`", r[3])}
    from ftlab.config.known import axolotl_keys
    known = set().union(*(axolotl_keys(s) for s in ("top", "dataset", "trl", "vllm", "ebft", "special_tokens")))
    return dict(total=len(rows), status=status, causes=causes, in_scope=len(in_scope), in_scope_accepted=accepted,
                unknown=sorted(unknown & known), foreign=sorted(unknown - known))


# ---------------------------------------------------------------------------------------------- trials
DATA = {   # the data kind a method trains on -> an embedded dataset of that shape
    "chat": {"path": "ftlab:data/chat.jsonl", "type": "chat_template"},
    "alpaca": {"path": "ftlab:data/alpaca.jsonl", "type": "alpaca"},
    "completion": {"path": "ftlab:data/completion.jsonl", "type": "completion"},
    "pairs": {"path": "ftlab:data/preference.jsonl", "type": "chat_template"},
    "scores": {"path": "ftlab:data/preference.jsonl", "type": "bradley_terry.chat_template"},
    "unpaired": {"path": "ftlab:data/kto.jsonl", "type": "chat_template"},
    "stepwise": {"path": "ftlab:data/stepwise.jsonl", "type": "stepwise_supervised"},
    "prompts": {"path": "ftlab:data/counting.jsonl", "type": "chat_template"},
    "ebft": {"path": "ftlab:data/ebft_code.jsonl", "type": "ebft_opencode.transform"},
    "stream": {"path": "ftlab:data/completion.jsonl", "type": "pretrain"},    # a `pretraining_dataset:` entry
}
DROP = ("wandb_project", "wandb_entity", "wandb_name", "wandb_watch", "wandb_log_model", "wandb_run_id", "wandb_mode",
        "mlflow_tracking_uri", "mlflow_experiment_name", "use_tensorboard", "hub_model_id", "hub_strategy",
        "dataset_prepared_path", "resume_from_checkpoint", "auto_resume_from_checkpoints", "lora_model_dir",
        "tokenizer_config", "base_model_config", "revision_of_model", "test_datasets", "pretraining_dataset",
        "chat_template", "chat_template_jinja", "special_tokens", "tokens", "tokenizer_type", "lora_modules_to_save",
        "unfrozen_parameters", "lora_target_parameters", "torch_compile", "hub_revision", "trust_remote_code")
TINY_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}   # ftlab:tiny's layers


def data_kind(cfg) -> str:
    from ftlab.methods import METHODS
    kind = METHODS[cfg.method].data
    if cfg.method == "reward_model": return "scores"
    if cfg.method == "ebft": return "ebft"
    if cfg.pretraining_dataset: return "stream"
    if kind != "sft": return kind
    t = (cfg.datasets or [None])[0]
    t = t.type if t is not None else None
    return {"alpaca": "alpaca", "completion": "completion"}.get(t if isinstance(t, str) else "", "chat")


def trial_config(cfg, out: Path) -> dict:
    "The config as a dict, with the tiny model, embedded data of the same shape and CPU-sized settings."
    d = cfg.to_dict(exclude_unset=True)
    for k in DROP: d.pop(k, None)
    kind = data_kind(cfg)
    d.update(base_model="ftlab:tiny", output_dir=str(out), sequence_len=min(cfg.sequence_len, 256),
             micro_batch_size=min(cfg.micro_batch_size, 2), gradient_accumulation_steps=min(cfg.gradient_accumulation_steps, 2),
             bf16=False, fp16=False, tf32=False)
    d["pretraining_dataset" if kind == "stream" else "datasets"] = [dict(DATA[kind])]   # streamed stays streamed
    if d.get("batch_size"): d["batch_size"] = d["micro_batch_size"] * d["gradient_accumulation_steps"]
    t = cfg.lora_target_modules
    if t and (isinstance(t, str) or not set(t) <= TINY_LINEAR):   # another architecture's layer names
        d.pop("lora_target_modules", None); d["lora_target_linear"] = True
    elif t: d["lora_target_modules"] = list(t)
    if d.get("val_set_size", 0) and d["val_set_size"] >= 1: d["val_set_size"] = 0.1
    if cfg.method in ("grpo", "gdpo"):
        trl = dict(d.get("trl") or {})
        trl.update(use_vllm=False, reward_funcs=["ftlab.rewards.exact_answer"], reward_weights=None, num_generations=2,
                   max_completion_length=8, generation_batch_size=None, steps_per_generation=None)
        d["trl"] = {k: v for k, v in trl.items() if v is not None}
        d["micro_batch_size"] = 2
        d.pop("vllm", None)
    elif cfg.method == "ebft" and d.get("trl"):   # no vLLM on this machine: generate with transformers
        d["trl"] = {**d["trl"], "use_vllm": False}
        d["trl"].pop("vllm_mode", None)
        d.pop("vllm", None)
    return d


def pick(rows, n: int):
    "N accepted configs, round-robin over (method, adapter, data kind) so the trials vary."
    groups = collections.defaultdict(list)
    for r in rows:
        if r[1] != "accepted": continue
        cfg = r[5]
        groups[(cfg.method, cfg.adapter or "full", data_kind(cfg))].append(r)
    order, chosen = sorted(groups), []
    while len(chosen) < n and any(groups.values()):
        for g in order:
            if groups[g] and len(chosen) < n: chosen.append(groups[g].pop(0))
    return chosen


def trial(rows, n: int, timeout: int = 600):
    results = []
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false",   # this checkout first, then the caller's path (e.g. a deepspeed folder)
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    with tempfile.TemporaryDirectory() as tmp:
        for i, r in enumerate(pick(rows, n)):
            name, cfg = r[0], r[5]
            out = Path(tmp) / f"run{i}"
            path = Path(tmp) / f"cfg{i}.yaml"
            path.write_text(yaml.safe_dump(trial_config(cfg, out), sort_keys=False))
            t0 = time.time()
            p = subprocess.run([sys.executable, "-m", "ftlab", "train", str(path), "--max-steps", "2"], env=env,
                               capture_output=True, text=True, timeout=timeout)
            tail = (p.stdout + p.stderr).strip().splitlines()
            ok = p.returncode == 0
            results.append((name, f"{cfg.method}/{cfg.adapter or 'full'}/{data_kind(cfg)}", ok, time.time() - t0,
                            "" if ok else " / ".join(tail[-6:])))
            print(f"  trial {i + 1}: {'trained' if ok else 'FAILED'} {name} ({results[-1][1]}, {results[-1][3]:.0f} s)"
                  + ("" if ok else f"\n      {results[-1][4]}"), flush=True)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("axolotl", help="an axolotl checkout or bare git repository")
    ap.add_argument("--table", action="store_true", help="print one line per config")
    ap.add_argument("--trial", type=int, default=0, metavar="N", help="train N varied accepted configs for 2 steps")
    ap.add_argument("--only", default=None, help="only configs whose path contains this")
    a = ap.parse_args(argv)
    rows = check(a.axolotl, a.only)
    if a.table:
        for name, status, cause, detail, *_ in rows:
            print(f"{status:9} {cause:22} {name}" + (f"\n{'':33}{detail[:300]}" if detail else ""))
    s = summary(rows)
    print(f"\n{s['total']} example configs: " + ", ".join(f"{s['status'][k]} {k}" for k in ("accepted", "refused", "crashed")))
    for c, n in s["causes"].most_common(): print(f"  refused, {c}: {n}")
    pct = 100 * s["in_scope_accepted"] / max(s["in_scope"], 1)
    print(f"needing no multi-GPU, multimodal or MoE feature: {s['in_scope_accepted']} / {s['in_scope']} accepted ({pct:.1f}%)")
    print(f"axolotl keys called unknown: {', '.join(s['unknown']) or 'none'}")
    print(f"names in no axolotl schema (called unknown, rightly): {', '.join(s['foreign']) or 'none'}")
    if a.trial:
        print(f"\ntrials (ftlab train --max-steps 2 on ftlab:tiny):")
        res = trial(rows, a.trial)
        print(f"{sum(r[2] for r in res)} / {len(res)} trials trained")
        return 0 if all(r[2] for r in res) and not s["status"]["crashed"] else 1
    return 1 if s["status"]["crashed"] else 0


if __name__ == "__main__":
    sys.exit(main())
