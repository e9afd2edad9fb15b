"""bench/grpo_bench.py on the CPU: TRL's trainer and ftlab's GRPO give the timing split, generation speed and the
weight-read comparison, and the table comes out (the speeds themselves mean nothing on a CPU)."""
import importlib.util, json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_grpo_bench_rows_on_the_tiny_model(tmp_path):
    spec = importlib.util.spec_from_file_location("grpo_bench", ROOT / "bench" / "grpo_bench.py")
    gb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gb)
    out = tmp_path / "out"
    code = gb.main(["--model", "tiny", "--device", "cpu", "--rows", "trl,ftlab-gen4", "--in-process", "--cache", str(tmp_path),
                    "--out-dir", str(out), "--prompt-len", "8", "--completion-len", "8", "--generations", "4",
                    "--warmup", "1", "--steps", "2", "--bw-mib", "16",
                    "--variant", "sampler:ftlab-gen4:trl.sampler=graphs", "--profile-decode", str(tmp_path / "prof")])
    rows = {r["row"]: r for r in map(json.loads, (out / "grpo_bench.jsonl").read_text().splitlines())}
    assert code == 0 and set(rows) == {"trl", "ftlab-gen4", "sampler"}
    for r in rows.values():
        assert r["status"] == "ok", r.get("error")
        assert all(r[f"{p}_s"] > 0 for p in ("generation", "update", "step")) and r["rewards_s"] >= 0
        assert r["generation_s"] + r["rewards_s"] + r["logprobs_s"] + r["update_s"] <= r["step_s"] * (1 + 1e-6)
        assert r["completion_len_mean"] == 8 and r["gen_tokens_per_s"] > 0 and r["weight_bytes"] > 0
        assert r["decode_over_weight_read"] == round(r["decode_ms"] / r["weight_read_ms"], 2)
    trl, gen4 = rows["trl"], rows["ftlab-gen4"]
    assert (trl["warmup"], trl["steps"], trl["generate_calls"], trl["generation_batch"]) == (1, 2, 2, 4)
    # a 4x generation batch: warm-up and measured steps round up to whole periods, one generate call per 4 steps
    assert (gen4["warmup"], gen4["steps"], gen4["generate_calls"], gen4["generation_batch"]) == (4, 4, 1, 16)
    # ftlab's sampler timed alone (asked for: on a CPU it runs without graphs, the same steps one by one); the rows
    # that generate with transformers have no sampler to time
    own = rows["sampler"]
    assert own["sampler_step_ms"] > 0 and "sampler_step_error" not in own
    assert own["sampler_step_over_weight_read"] == round(own["sampler_step_ms"] / own["weight_read_ms"], 2)
    assert trl.get("sampler_step_ms") is None and gen4.get("sampler_step_ms") is None
    # one eager step profiled: no CUDA kernels on a CPU, but the table is written for the row that sampled
    assert own["decode_kernels_per_step"] == 0 and [p.name for p in (tmp_path / "prof").iterdir()] == ["decode-profile-sampler.md"]
    assert "generation_batch_size: 16" in gen4["ftlab_config"] and "min_new_tokens: 8" in gen4["ftlab_config"]
    md = (out / "grpo_bench.md").read_text()
    assert "| trl | ok |" in md and "| ftlab-gen4 | ok |" in md and "decode / weight-read" in md and "sampler step ms" in md
