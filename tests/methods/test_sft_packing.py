"""sample_packing: packed rows train exactly the tokens unpacked rows train, and never attend to each other."""
import pytest, torch
from ftlab.prepare import prepare_datasets
from ftlab.methods import get_method
from ftlab.methods.sft import build_sft
from ftlab.model import load_model

IGNORE = -100


def segments(batch):
    "Split a padding-free packed batch back into its sequences, by position_ids restarting at 0."
    ids, labels, pos = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
    return [(ids[a:b].tolist(), labels[a:b].tolist()) for a, b in zip(starts, starts[1:])]


@pytest.fixture(scope="module")
def packed_setup(tmp_path_factory):
    from ftlab.config import load_config
    from ftlab.tokenizer import load_tokenizer
    out = tmp_path_factory.mktemp("pack")
    cfg = load_config(f"""base_model: ftlab:tiny
output_dir: {out}
sequence_len: 256
sample_packing: true
micro_batch_size: 2
max_steps: 1
datasets:
  - path: ftlab:data/chat.jsonl
    type: chat_template
    split: train[:40]
""")
    tok = load_tokenizer(cfg)
    prepared = prepare_datasets(cfg, tok, use_cache=False)
    model = load_model(cfg, tok)
    trainer = build_sft(cfg, get_method(cfg), model, tok, prepared)
    return cfg, tok, prepared, model, trainer


def test_packing_trains_the_same_tokens(packed_setup):
    cfg, tok, prepared, model, trainer = packed_setup
    packed = [s for b in trainer.get_train_dataloader() for s in segments(b)]
    # Each packed row fits sequence_len (a batch of micro_batch_size rows is then flattened, padding-free).
    assert max(len(x) for x in trainer.train_dataset["input_ids"]) <= cfg.sequence_len
    # Packing must have put several rows in one sequence for this test to mean anything.
    assert len(packed) == len(prepared.train) > len(list(trainer.get_train_dataloader()))
    # The first label of a sequence is never predicted (there is no token before it), packed or not.
    unpacked = sorted((r["input_ids"], [IGNORE] + r["labels"][1:]) for r in prepared.train)
    assert sorted(packed) == unpacked


def test_packed_sequences_do_not_attend_to_each_other(packed_setup):
    cfg, tok, prepared, model, trainer = packed_setup
    batch = next(iter(trainer.get_train_dataloader()))
    segs = segments(batch)
    assert len(segs) > 1
    model.eval()
    with torch.no_grad():
        kw = {k: batch[k] for k in ("input_ids", "position_ids")}
        packed_logits = model(**kw).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([ids])).logits[0] for ids, _ in segs])
    assert torch.allclose(packed_logits, alone, atol=1e-4), (packed_logits - alone).abs().max()
