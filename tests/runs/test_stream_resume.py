"""A streamed run stopped and resumed trains exactly the batches an uninterrupted run trains: the stream's position is
saved with each checkpoint and restored, shuffled, across passes, with gradient accumulation."""
import json, os, signal
from pathlib import Path
import pytest
import transformers
from ftlab.config import load_config
from ftlab.errors import RunError
from ftlab.run import Run
from ftlab.stream import STATE_FILE

from run_helpers import logs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    words = "the cat sat on a mat while rain fell over old hills and quiet rivers".split()
    p = tmp_path_factory.mktemp("stream") / "corpus.jsonl"
    p.write_text("".join(json.dumps({"text": f"Story {i}: " + " ".join(words[(i * 7 + k) % len(words)] for k in range(3 + i % 29))})
                         + "\n" for i in range(30)))
    return p


def config(corpus, out, steps=8):
    return load_config(f"""base_model: ftlab:tiny
sequence_len: 64
sample_packing: true
micro_batch_size: 2
gradient_accumulation_steps: 2
learning_rate: 0.001
max_steps: {steps}
save_steps: 100
streaming_multipack_buffer_size: 24
output_dir: {out}
pretraining_dataset:
  - path: {corpus}
""")


@pytest.fixture
def seen(monkeypatch):
    "The input_ids of every micro-batch the trainers of this test train on, in order."
    got = []
    step = transformers.Trainer.training_step
    def recording(self, model, inputs, *args, **kw):
        got.append(inputs["input_ids"].tolist())
        return step(self, model, inputs, *args, **kw)
    monkeypatch.setattr(transformers.Trainer, "training_step", recording)
    return got


class StopAt(transformers.TrainerCallback):
    "Ctrl-C (the notebook's stop button) after optimizer step `n`."
    def __init__(self, n): self.n = n
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.n: os.kill(os.getpid(), signal.SIGINT)


def test_a_resumed_stream_trains_the_batches_of_an_uninterrupted_run(corpus, tmp_path, seen):
    whole = Run(config(corpus, tmp_path / "whole")).train()
    assert whole.state == "finished"
    expected = list(seen)
    assert len(expected) == 16                                     # 8 steps x 2 micro-batches (of 2 rows of 64 tokens)
    seen.clear()
    stopped = Run(config(corpus, tmp_path / "cut")).train(callbacks=[StopAt(5)])
    assert stopped.state == "interrupted" and stopped.stopped_at == 5
    saved = json.loads((tmp_path / "cut" / "checkpoint-5" / STATE_FILE).read_text())
    (position,) = saved["positions"]
    assert saved["processes"] == 1 and position["rows"] == 5 * 2 * 2 and position["epoch"] == 1   # in the second pass
    before = list(seen)
    seen.clear()
    resumed = Run(config(corpus, tmp_path / "cut")).train(resume=True)
    assert resumed.state == "finished"
    assert before + seen == expected and len(seen) == 6           # the tokens of every batch, in order
    notes = [r["message"] for r in resumed.records if r["event"] == "note"]
    assert "the stream goes on where checkpoint-5 left it (20 rows in, pass 2)" in notes
    assert [r["loss"] for r in logs(resumed)][-3:] == [r["loss"] for r in logs(whole)][-3:]


def test_a_checkpoint_without_a_position_is_resumed_by_reading_the_stream_again(corpus, tmp_path, seen):
    "A checkpoint from before positions were saved: the trainer skips the batches it trained, reading them again."
    whole = Run(config(corpus, tmp_path / "whole", steps=5)).train()
    expected = list(seen)
    seen.clear()
    Run(config(corpus, tmp_path / "cut", steps=5)).train(callbacks=[StopAt(2)])
    (tmp_path / "cut" / "checkpoint-2" / STATE_FILE).unlink()
    before = list(seen)
    seen.clear()
    resumed = Run(config(corpus, tmp_path / "cut", steps=5)).train(resume=True)
    assert resumed.state == whole.state == "finished" and before + seen == expected
    assert any("holds no stream position" in r["message"] for r in resumed.records if r["event"] == "note")


def test_a_checkpoint_of_another_number_of_processes_is_one_message(corpus, tmp_path, seen):
    Run(config(corpus, tmp_path / "two", steps=3)).train(callbacks=[StopAt(1)])
    f = tmp_path / "two" / "checkpoint-1" / STATE_FILE
    saved = json.loads(f.read_text())
    f.write_text(json.dumps({"processes": 2, "positions": saved["positions"] * 2}))
    with pytest.raises(RunError) as e: Run(config(corpus, tmp_path / "two", steps=3)).train(resume=True)
    assert "saved by 2 processes" in str(e.value) and "--num-processes 2" in e.value.problems[0].fix
