"""GRPO: reward functions from the notebook or import paths, checked before the model loads; a run on the tiny
model; completions stored with the run; vLLM server waiting; the config's TRL keys."""
import json, math, sys, textwrap
import pytest
from ftlab.config import load_config
from ftlab.errors import ConfigError, FtlabError, RunError
from ftlab.events import read_metrics
from ftlab.run import Run


def count_reward(completions, answer, **kw):
    return [1.0 if c[0]["content"].strip() == a else 0.0 for c, a in zip(completions, answer)]


def grpo_cfg(tmp_path, extra="", funcs='["@count_reward"]', data="ftlab:data/counting.jsonl"):
    return (f"base_model: ftlab:tiny\nrl: grpo\nadapter: lora\nlora_r: 8\nlora_alpha: 16\nlora_target_linear: true\n"
            f"output_dir: {tmp_path / 'out'}\nsequence_len: 128\nmicro_batch_size: 8\nlearning_rate: 0.002\n"
            f"logging_steps: 1\nsave_steps: 1000\ndatasets:\n  - path: {data}\n    type: chat_template\n"
            f"trl:\n  reward_funcs: {funcs}\n  num_generations: 4\n  max_completion_length: 24\n{extra}")


def test_grpo_trains_and_stores_completions(tmp_path):
    run = Run(load_config(grpo_cfg(tmp_path)), namespace={"count_reward": count_reward}).train(max_steps=3)
    logs = [r for r in read_metrics(run.output_dir) if r["event"] == "log"]
    assert run.state == "finished" and [r["step"] for r in logs] == [1, 2, 3]
    assert all("rewards/count_reward/mean" in r and "frac_reward_zero_std" in r for r in logs)
    assert all(r["tokens_per_second"] > 0 for r in logs[1:])     # from TRL's own count of prompt and completion tokens
    rows = [json.loads(l) for l in (run.output_dir / "completions.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {1, 2, 3} and all(len([r for r in rows if r["step"] == s]) == 8 for s in (1, 2, 3))
    r0 = rows[0]
    assert r0["prompt"].startswith("Count from") and set(r0["rewards"]) == {"count_reward"} and r0["advantage"] is not None
    again = Run.load(run.output_dir)
    view = again.completions()
    assert "count_reward" in view._repr_html_() and r0["completion"].replace("<", "&lt;")[:10] in view._repr_html_()
    assert "step 3" in view.text() and "advantage" in view.text()


def slow_count(completions, answer, **kw):
    import time
    time.sleep(0.05)
    return count_reward(completions, answer)


TIMING = {"timing/generation", "timing/rewards", "timing/logprobs", "timing/update", "timing/step"}


def test_step_time_is_split_into_generation_rewards_and_update(tmp_path):
    "A reward function that sleeps 0.05 s per call: that time is the reward phase's, and the phases fit in the step."
    run = Run(load_config(grpo_cfg(tmp_path, funcs='["@slow_count"]', extra="  beta: 0.04\n")),
              namespace={"slow_count": slow_count}).train(max_steps=2)
    logs = [r for r in read_metrics(run.output_dir) if r["event"] == "log"]
    assert [r["step"] for r in logs] == [1, 2]
    for r in logs:
        t = {k: v for k, v in r.items() if k.startswith("timing/")}
        assert set(t) == TIMING and all(v > 0 for v in t.values()), t
        assert 0.05 <= t["timing/rewards"] < 0.05 + t["timing/step"] / 2, t     # one reward call per step
        parts = sum(v for k, v in t.items() if k != "timing/step")
        assert parts <= t["timing/step"] * (1 + 1e-6), t
        assert r["step_time"] < t["timing/step"]        # TRL's own figure: the training steps without the optimizer
    names = {tr["name"] for tr in run.plot().to_dict()["data"]}
    assert {"step time (s): generation", "step time (s): reward scoring", "step time (s): update"} <= names
    from ftlab.methods import get_method
    for method in ("grpo", "gdpo", "ebft"):
        assert TIMING <= {key for p in get_method(method).panels for _, key, _ in p.series}, method


def test_reward_function_problems_stop_before_the_model_loads(tmp_path, monkeypatch):
    import ftlab.model
    def no_load(*a, **k): raise AssertionError("the model was loaded")
    monkeypatch.setattr(ftlab.model, "load_model", no_load)
    def raises(completions, **kw): raise ValueError("bad parse")
    def short(completions, **kw): return [1.0]
    def needs_missing(completions, solution, **kw): return [0.0] * len(completions)
    def needs_missing_key(completions, **kw): return [kw["solution"] for _ in completions]
    def words(completions, **kw): return ["good"] * len(completions)
    def no_kwargs(completions): return [0.0] * len(completions)
    cases = {"raises": "raised ValueError: bad parse", "short": "returned 1 values for 2 completions",
             "needs_missing": "reads column 'solution', which the prepared rows do not have (columns: answer)",
             "needs_missing_key": "reads column 'solution'", "words": "returned str 'good'",
             "no_kwargs": "cannot be called the way GRPO calls it"}
    ns = {"raises": raises, "short": short, "needs_missing": needs_missing, "needs_missing_key": needs_missing_key,
          "words": words, "no_kwargs": no_kwargs}
    for name, expect in cases.items():
        run = Run(load_config(grpo_cfg(tmp_path, funcs=f'["@{name}"]')), namespace=ns)
        with pytest.raises(FtlabError) as e: run.train(max_steps=1)
        assert expect in str(e.value) and f"`{name}" in str(e.value) and e.value.problems[0].fix, (name, str(e.value))
    with pytest.raises(FtlabError) as e:
        Run(load_config(grpo_cfg(tmp_path, funcs='["@nowhere"]')), namespace={}).train(max_steps=1)
    assert "`@nowhere` is not defined in the notebook" in str(e.value)


def test_reward_functions_from_an_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def length_penalty(completions, **kwargs):
            return [-len(c[0]["content"]) / 100 for c in completions]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    run = Run(load_config(grpo_cfg(tmp_path, funcs="[my_rewards.length_penalty, '@count_reward']",
                                   extra="  reward_weights: [0.5, 1.0]\n")), namespace={"count_reward": count_reward})
    run.train(max_steps=2)
    log = [r for r in read_metrics(run.output_dir) if r["event"] == "log"][-1]
    assert "rewards/length_penalty/mean" in log and "rewards/count_reward/mean" in log


def test_vllm_server_missing_is_named(tmp_path):
    from ftlab.methods.grpo import wait_for_vllm
    cfg = load_config(grpo_cfg(tmp_path, extra="  use_vllm: true\n  vllm_mode: server\n  vllm_server_host: 127.0.0.1\n"
                                               "  vllm_server_port: 9\n  vllm_server_timeout: 1\n"))
    with pytest.raises(RunError) as e: wait_for_vllm(cfg, interval=0.2)
    assert "http://127.0.0.1:9/health/" in str(e.value) and "ftlab vllm-serve" in str(e.value)


def test_trl_keys_map_and_unsupported_ones_are_refused(tmp_path):
    from ftlab.methods.grpo import grpo_args
    cfg = load_config(grpo_cfg(tmp_path, extra="  temperature: 0.7\n  top_p: 0.9\n  scale_rewards: true\n  beta: 0.04\n"
                                               "  epsilon_high: 0.28\n  loss_type: dapo\n  vllm_guided_decoding_regex: '[0-9]+'\n"))
    kw = grpo_args(cfg, 100, False)
    assert (kw["temperature"], kw["top_p"], kw["scale_rewards"], kw["beta"], kw["epsilon_high"], kw["loss_type"]) == \
           (0.7, 0.9, "group", 0.04, 0.28, "dapo")
    assert kw["vllm_structured_outputs_regex"] == "[0-9]+" and kw["num_generations"] == 4 and kw["log_completions"] is False
    from trl import GRPOConfig
    GRPOConfig(**kw)   # TRL accepts every key ftlab passes
    with pytest.raises(ConfigError) as e: load_config(grpo_cfg(tmp_path, extra="  replay_buffer_size: 64\n"))
    assert e.value.problems[0].key == "trl.replay_buffer_size" and "TRL 1.16" in str(e.value)
    with pytest.raises(ConfigError) as e: load_config(grpo_cfg(tmp_path).replace("micro_batch_size: 8", "micro_batch_size: 6"))
    assert "cannot be split into groups of num_generations=4" in str(e.value)
    assert grpo_args(load_config(grpo_cfg(tmp_path).replace("rl: grpo", "rl: gdpo")), 10, False)["multi_objective_aggregation"] == "normalize_then_sum"


def test_charts_expand_reward_functions():
    from ftlab.charts import figure
    from ftlab.methods.grpo import GRPO_PANELS
    recs = [{"event": "log", "step": s, "reward": 0.1 * s, "rewards/acc/mean": 0.1 * s, "rewards/fmt/mean": 1.0} for s in (1, 2)]
    names = {t["name"] for t in figure(recs, GRPO_PANELS)["data"]}
    assert {"reward per function: acc mean", "reward per function: fmt mean", "reward (total): mean"} <= names


def test_grpo_from_the_command_line_with_a_built_in_reward(tmp_path, capsys):
    from ftlab.cli import main
    assert main(["train", "ftlab:configs/tiny-grpo.yaml", "--max-steps", "2", "--set", f"output_dir={tmp_path / 'out'}",
                 "--set", "micro_batch_size=16"]) == 0
    out = capsys.readouterr().out
    assert "step 2 · loss" in out and "reward " in out and "done:" in out
    rows = [json.loads(l) for l in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()]
    assert rows and set(rows[0]["rewards"]) == {"exact_answer"}


def test_dataset_transform_from_a_cell_keeps_reward_columns(tmp_path):
    rows = [{"question": f"Count from 1 to {n}.", "solution": ", ".join(map(str, range(1, n + 1))) + "."} for n in range(3, 11)]
    def to_prompts(cfg):
        def map_fn(row): return {"prompt": [{"role": "user", "content": row["question"]}], "answer": row["solution"]}
        return map_fn, {"remove_columns": ["question", "solution"]}
    text = grpo_cfg(tmp_path, data='"@rows"').replace("type: chat_template", 'type: "@to_prompts"')
    run = Run(load_config(text), namespace={"rows": rows, "to_prompts": to_prompts, "count_reward": count_reward})
    prepared = run.prepare()
    assert set(prepared.train.column_names) >= {"prompt", "answer"} and "solution" not in prepared.train.column_names
    run.train(max_steps=1)
    assert [r["step"] for r in read_metrics(run.output_dir) if r["event"] == "log"] == [1]
    # a reward function that wants the column the transform removed is stopped before the model loads
    def wants_solution(completions, solution, **kw): return [0.0] * len(completions)
    bad = Run(load_config(text.replace("@count_reward", "@wants_solution")),
              namespace={"rows": rows, "to_prompts": to_prompts, "wants_solution": wants_solution})
    with pytest.raises(FtlabError) as e: bad.train(max_steps=1)
    assert "reads column 'solution'" in str(e.value) and "remove_columns" in str(e.value)


def test_a_trained_reward_model_as_the_reward(tmp_path):
    rm_text = (f"base_model: ftlab:tiny\nreward_model: true\noutput_dir: {tmp_path / 'rm'}\nsequence_len: 128\n"
               f"micro_batch_size: 8\nmax_steps: 2\nlearning_rate: 0.001\nsave_steps: 1000\n"
               f"datasets:\n  - path: ftlab:data/preference.jsonl\n    type: chat_template\n")
    Run(load_config(rm_text)).train()
    run = Run(load_config(grpo_cfg(tmp_path, funcs=f"['{tmp_path / 'rm'}']"))).train(max_steps=1)
    (log,) = [r for r in read_metrics(run.output_dir) if r["event"] == "log"]
    assert "rewards/rm/mean" in log and log["reward_std"] > 0   # the reward model's scores vary across completions


def test_grpo_cell_ends_with_the_completions_view(tmp_path, monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output
    import ftlab.dashboard as dash
    monkeypatch.setattr(dash, "in_notebook", lambda: True)
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "ftlab")
    shell.user_ns["count_reward"] = count_reward
    with capture_output() as cap:
        shell.run_cell_magic("finetune", "--name g --max-steps 2", grpo_cfg(tmp_path, extra="  num_completions_to_print: 1\n"))
    htmls = [o.data.get("text/html", "") for o in cap.outputs]
    assert shell.user_ns["g"].state == "finished"
    (view,) = [h for h in htmls if "ftlab-completions" in h]
    assert "count_reward" in view and "step 2" in view
    assert view.count("white-space:pre-wrap") == 2 * 2          # 2 prompts of the step, 1 completion shown for each
    charts = [o.data["application/vnd.plotly.v1+json"] for o in cap.outputs if "application/vnd.plotly.v1+json" in o.data]
    assert any(t["name"] == "reward per function: count_reward mean" for t in charts[-1]["data"])


def test_use_vllm_without_vllm_is_one_message(tmp_path, monkeypatch):
    import importlib.util, ftlab.model
    if importlib.util.find_spec("vllm") is not None: pytest.skip("vLLM is installed here; tests/with_vllm runs it")
    monkeypatch.setattr(ftlab.model, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    run = Run(load_config(grpo_cfg(tmp_path, extra="  use_vllm: true\n  vllm_mode: colocate\n")),
              namespace={"count_reward": count_reward})
    with pytest.raises(FtlabError) as e: run.train(max_steps=1)
    assert "vLLM is not installed" in str(e.value) and "docs/vllm.md" in str(e.value)


def test_dry_run_cell_checks_reward_functions(tmp_path):
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "ftlab")
    def typo(completions, solution, **kw): return [0.0] * len(completions)
    shell.user_ns.update(typo=typo, count_reward=count_reward)
    with capture_output() as cap:
        shell.run_cell_magic("finetune", "--dry-run", grpo_cfg(tmp_path, funcs='["@typo"]'))
    h = "\n".join(o.data.get("text/html", "") for o in cap.outputs)
    assert "ftlab-plan" in h and ("reads column &#x27;solution&#x27;" in h or "reads column 'solution'" in h)
    with capture_output() as cap:
        shell.run_cell_magic("finetune", "--dry-run", grpo_cfg(tmp_path))
    assert not any("reads column" in o.data.get("text/html", "") for o in cap.outputs)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_reward_function_failing_during_training_saves_and_names_function_and_step(tmp_path):
    """It passed the check before the model loaded, then raised at its third call (step 2): one message with the
    function and the step, a checkpoint of the last completed step, an `end` event; resumable after the fix."""
    calls = {"n": 0}
    def flaky(completions, answer, **kw):
        calls["n"] += 1
        if calls["n"] == 3: raise KeyError("answer")        # call 1: the pre-check; 2: step 1; 3: step 2
        return count_reward(completions, answer)
    cfg = load_config(grpo_cfg(tmp_path, funcs='["@flaky"]'))
    run = Run(cfg, namespace={"flaky": flaky})
    with pytest.raises(FtlabError) as e:
        run.train(max_steps=4)
    msg = str(e.value)
    assert "reward function `flaky` raised KeyError at step 2" in msg and "saved checkpoint-1" in msg
    assert "Traceback" not in msg and e.value.problems[0].key == "trl.reward_funcs"
    assert (run.output_dir / "checkpoint-1" / "trainer_state.json").exists()
    end = read_metrics(run.output_dir)[-1]
    assert end["event"] == "end" and end["status"] == "failed" and "flaky" in end["message"]
    fixed = Run(cfg, namespace={"flaky": count_reward}).train(max_steps=4, resume=True)
    assert fixed.state == "finished" and [r["step"] for r in read_metrics(fixed.output_dir) if r["event"] == "log"][-1] == 4


@pytest.mark.parametrize("name, expect", [("wrong_count", "returned 3 scores for 8 completions"),
                                          ("infinite", "returned inf for completion 0"),
                                          ("all_nan", "returned nan for completion 0 (8 of 8 scores are not finite)"),
                                          ("all_none", "returned None for all 8 completions, and it is the only reward function")])
def test_wrong_counts_and_non_finite_rewards_stop_at_the_step(tmp_path, name, expect):
    "After passing the check on two rows: a batch gets the wrong number of scores, `inf`, or NaN everywhere."
    def wrong_count(completions, **kw): return [0.0] * (len(completions) if len(completions) <= 2 else 3)
    def infinite(completions, **kw): return [0.0] * len(completions) if len(completions) <= 2 else [float("inf")] * len(completions)
    def all_nan(completions, **kw): return [0.0] * len(completions) if len(completions) <= 2 else [float("nan")] * len(completions)
    def all_none(completions, **kw): return [0.0] * len(completions) if len(completions) <= 2 else [None] * len(completions)
    ns = {"wrong_count": wrong_count, "infinite": infinite, "all_nan": all_nan, "all_none": all_none}
    run = Run(load_config(grpo_cfg(tmp_path, funcs=f'["@{name}"]')), namespace=ns)
    with pytest.raises(FtlabError) as e:
        run.train(max_steps=2)
    assert f"reward function `{name}` at step 1" in str(e.value) and expect in str(e.value)


def test_constant_rewards_are_blamed_on_the_rewards(tmp_path):
    """All-equal rewards give zero advantages and a zero gradient: the health message says the rewards carry no
    signal, not that the adapter misses its layers."""
    def constant(completions, **kw): return [0.5] * len(completions)
    run = Run(load_config(grpo_cfg(tmp_path, funcs='["@constant"]')), namespace={"constant": constant}).train(max_steps=4)
    health = [r for r in read_metrics(run.output_dir) if r["event"] == "health"]
    assert [h["rule"] for h in health] == ["rewards_without_signal"], health
    assert "rewards carry no signal" in health[0]["message"] and "frac_reward_zero_std" in health[0]["message"]


@pytest.mark.parametrize("method, adapter", [("grpo", ""), ("gdpo", "adapter: lora\nlora_r: 8\nlora_alpha: 16\nlora_target_linear: true\n")])
def test_new_special_tokens_with_a_reference_model(tmp_path, method, adapter):
    "A new pad token and added tokens grow the embeddings; the reference model (beta > 0) must grow with them."
    text = grpo_cfg(tmp_path, extra="  beta: 0.1\n").replace("rl: grpo\nadapter: lora\nlora_r: 8\nlora_alpha: 16\nlora_target_linear: true\n",
                                                           f"rl: {method}\n{adapter}")
    text += "special_tokens:\n  pad_token: '<|mypad|>'\ntokens: ['<|newtok|>']\n"
    run = Run(load_config(text), namespace={"count_reward": count_reward}).train(max_steps=1)
    assert run.state == "finished" and len(run.tokenizer) > run.tokenizer.vocab_size
    (log,) = [r for r in read_metrics(run.output_dir) if r["event"] == "log"]
    assert math.isfinite(log["kl"])


@pytest.mark.parametrize("extra, paged", [
    ("  cache_implementation: static\n  generation_kwargs: {min_new_tokens: 24, disable_compile: false}\n", False),
    ("  use_transformers_paged: true\n  generation_kwargs: {min_new_tokens: 24}\n", True)])
def test_generation_speed_keys_reach_trl(tmp_path, extra, paged):
    "TRL's generation options pass through: a static cache compiled after the build, or continuous batching."
    run = Run(load_config(grpo_cfg(tmp_path, extra=extra)), namespace={"count_reward": count_reward}).train(max_steps=1)
    tr = run.trainer
    assert tr.use_transformers_continuous_batching is paged and tr.generation_config.min_new_tokens == 24
    if not paged: assert tr.generation_config.cache_implementation == "static" and tr.generation_config.disable_compile is False
    log, = [r for r in read_metrics(run.output_dir) if r["event"] == "log"]
    assert log["timing/generation"] > 0
    # min_new_tokens = max_completion_length fixes the lengths for generate; continuous batching drops that processor
    assert log["completions/mean_length"] == 24 if not paged else 0 < log["completions/mean_length"] <= 24
    if paged: assert any("min_new_tokens" in n for n in run.cfg.notes)


def test_temperature_zero_is_one_message_before_anything_loads(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(grpo_cfg(tmp_path, extra="  temperature: 0\n"))
    (p,) = e.value.problems
    assert p.key == "trl.temperature" and "temperature 0 cannot be sampled from" in p.message and "top_k: 1" in p.fix
