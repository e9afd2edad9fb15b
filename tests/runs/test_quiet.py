"""A reopened run says what it loaded and nothing else: no progress bars, load reports or library notices."""
import subprocess, sys, textwrap
from ftlab.config import load_config
from ftlab.run import Run

from run_helpers import LORA, checkout_env

NOISE = ("Loading weights", "LOAD REPORT", "MISSING", "newly initialized", "Failed to load", "pip install kernels",
         "FutureWarning", "Warning:", "%|")


def fresh_process(code: str, cwd) -> str:
    "Output (stdout and stderr) of `code` in a new Python process, run outside the checkout (as a user would)."
    env = checkout_env()
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def test_reopening_a_lora_run_to_chat_and_merge_is_quiet(make_cfg, tmp_path):
    cfg = make_cfg(LORA + "max_steps: 2\n")
    Run(cfg).train()
    out = fresh_process(f"""
        from ftlab import Run
        r = Run.load({cfg.output_dir!r})
        r.chat("What is 3 plus 4?", max_new_tokens=4)
        print()
        r.merge({str(tmp_path / 'merged')!r})
    """, tmp_path)
    assert f"loaded the trained adapter from {cfg.output_dir} on ftlab:tiny" in out
    assert not [n for n in NOISE if n in out], out


def test_reopening_a_reward_model_to_score_is_quiet(tmp_path):
    cfg = load_config(f"base_model: ftlab:tiny\nreward_model: true\noutput_dir: {tmp_path / 'rm'}\nsequence_len: 128\n"
                      "micro_batch_size: 8\nmax_steps: 2\nlearning_rate: 0.001\n"
                      "datasets:\n  - path: ftlab:data/preference.jsonl\n    type: chat_template\n")
    Run(cfg).train()
    out = fresh_process(f"""
        from ftlab import Run
        print(Run.load({cfg.output_dir!r}).score("What is 2 plus 2?", ["= 4", "= 5"]))
    """, tmp_path)
    assert "loaded the trained" in out and not [n for n in NOISE if n in out], out
