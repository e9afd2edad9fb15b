"""`ftlab inference` (one reply, the interactive loop in a pty and through stdin, the base model) and `ftlab merge-lora`."""
import os, pathlib, subprocess, sys
import pytest
from ftlab.cli import main

EXE = pathlib.Path(sys.executable).parent / "ftlab"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
Q = "What is 3 plus 4?"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("inference")
    cfg = d / "c.yaml"
    cfg.write_text(f"base_model: ftlab:tiny\nadapter: lora\nlora_target_linear: true\nsequence_len: 256\nmicro_batch_size: 8\n"
                   f"learning_rate: 0.004\noutput_dir: {d}/out\ndataset_prepared_path: {d}/prep\n"
                   "datasets:\n  - path: ftlab:data/chat.jsonl\n    type: chat_template\n")
    assert main(["train", str(cfg), "--max-steps", "3"]) == 0
    return cfg


def reply_of(cfg, *extra):
    from ftlab.run import Run
    from ftlab.config import load_config
    return str(Run(load_config(cfg)).chat(Q, max_new_tokens=24, stream=False))


def test_one_reply_is_the_runs_chat(trained, capsys):
    capsys.readouterr()
    assert main(["inference", str(trained), "--prompt", Q, "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert "loaded the trained adapter from" in out
    assert reply_of(trained).strip() and reply_of(trained) in out


def test_base_model_and_no_weights(trained, tmp_path, capsys):
    assert main(["inference", str(trained), "--prompt", Q, "--base", "--max-new-tokens", "4"]) == 0
    assert "loaded the base model ftlab:tiny (no adapter)" in capsys.readouterr().out
    fresh = tmp_path / "fresh.yaml"
    fresh.write_text(trained.read_text().replace(str(trained.parent / "out"), str(tmp_path / "none")))
    assert main(["inference", str(fresh), "--prompt", Q]) == 2
    err = capsys.readouterr().err
    assert "no trained weights" in err and "--base" in err and "Traceback" not in err


def test_interactive_loop_in_a_pty(trained):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(str(EXE), ["inference", str(trained), "--max-new-tokens", "24"], env=ENV, encoding="utf-8", timeout=120)
    child.expect("you> ")
    child.sendline(Q)
    child.expect("model> ")
    child.expect("you> ")
    first = child.before
    child.sendline("/reset"); child.expect("conversation cleared"); child.expect("you> ")
    child.sendline("/exit"); child.expect(pexpect.EOF); child.close()
    assert child.exitstatus == 0 and reply_of(trained).strip() in first


def test_interactive_loop_through_stdin(trained):
    r = subprocess.run([str(EXE), "inference", str(trained), "--max-new-tokens", "24"], input=f"{Q}\n\n{Q}\n", text=True,
                       capture_output=True, env=ENV, timeout=180)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(reply_of(trained).strip()) == 2 and "you>" not in r.stdout


def test_merge_lora_writes_a_standalone_model(trained, capsys):
    import torch, transformers
    from ftlab.run import Run
    from ftlab.config import load_config
    assert main(["merge-lora", str(trained)]) == 0
    out = capsys.readouterr().out
    merged = trained.parent / "out" / "merged"
    assert f"merged: {merged} (1 safetensors file" in out and not (merged / "adapter_config.json").exists()
    run = Run(load_config(trained))
    from ftlab.inference import inference_model
    model, tok = inference_model(run)
    ids = tok(Q, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = model(ids).logits
        got = transformers.AutoModelForCausalLM.from_pretrained(str(merged))(ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert main(["inference", str(trained), "--weights", str(merged), "--prompt", Q, "--max-new-tokens", "24"]) == 0
    assert f"loaded the trained model from {merged}" in capsys.readouterr().out
    assert main(["merge-lora", str(trained), "--simulate-nf4"]) == 2
    assert "--simulate-nf4" in capsys.readouterr().err
