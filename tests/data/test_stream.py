"""pretraining_dataset streamed: sources of every kind, rows packed to sequence_len without a token lost, documents kept
apart (or not, as the keys say), a seeded block shuffle, a position that restores the stream exactly, and one share
of the documents per process."""
import json
from itertools import islice
import pytest
from ftlab.config import load_config
from ftlab.errors import DataError
from ftlab.stream import STATE_KEY, Stream, open_source, first_row

WORDS = "the cat sat on a mat while rain fell over old hills and quiet rivers near seven tall pines".split()


def doc(i: int) -> str:
    return f"Note {i}: " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(2 + i % 23)) + "."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.jsonl").write_text("".join(json.dumps({"text": doc(i), "id": i}) + "\n" for i in range(80)))
    (d / "b.jsonl").write_text("".join(json.dumps({"body": doc(1000 + i)}) + "\n" for i in range(30)))
    return d


def stream_cfg(tmp_path, entries, extra="sample_packing: true\nshuffle_merged_datasets: false\n", length=64):
    return load_config(f"base_model: ftlab:tiny\nsequence_len: {length}\nmax_steps: 4\noutput_dir: {tmp_path / 'out'}\n"
                       f"pretraining_dataset:\n{entries}{extra}")


def entry(path, extra=""):
    return f"  - path: {path}\n{extra}"


def ids(rows): return [r["input_ids"] for r in rows]


def documents(tok, texts):
    "The token stream of `texts` as the stream tokenizes them: each with the tokenizer's specials and one eos."
    out = []
    for t in texts: out += tok(t, add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
    return out


def test_packed_rows_are_full_and_lose_no_token(tmp_path, corpus, tok):
    s = Stream(stream_cfg(tmp_path, entry(corpus / "a.jsonl")), tok).check()
    rows = list(islice(s.rows(), 200))
    first_pass = rows[:next(i for i, r in enumerate(rows) if json.loads(r[STATE_KEY])["epoch"] == 1) + 1]
    flat = [t for r in first_pass for t in r["input_ids"]]
    assert flat == documents(tok, [doc(i) for i in range(80)])          # in order, nothing lost, eos after each
    assert all(len(r["input_ids"]) == 64 for r in first_pass[:-1]) and 0 < len(first_pass[-1]["input_ids"]) <= 64
    assert all(sum(r["seq_lengths"]) == len(r["input_ids"]) for r in rows)
    # a document cut by a row boundary goes on at the start of the next row
    assert any(r["input_ids"][0] != tok("Note", add_special_tokens=False)["input_ids"][0] for r in first_pass[1:])


def test_the_collator_keeps_documents_apart_unless_told_otherwise(tmp_path, corpus, tok):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    collate = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)
    apart = Stream(stream_cfg(tmp_path, entry(corpus / "a.jsonl")), tok)
    rows = [{k: v for k, v in r.items() if k != STATE_KEY} for r in islice(apart.rows(), 2)]
    batch = collate(rows)
    pos, labels = batch["position_ids"][0].tolist(), batch["labels"][0].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0]
    lens = rows[0]["seq_lengths"] + rows[1]["seq_lengths"]
    assert starts == [sum(lens[:k]) for k in range(len(lens))] and len(starts) > 2    # restart at every document
    assert all(labels[i] == -100 for i in starts)                                          # nothing predicts a first token
    assert [r["labels"] for r in apart.preview(2)] == [labels[:64], labels[64:]]        # the mask view shows the same
    together = Stream(stream_cfg(tmp_path, entry(corpus / "a.jsonl"), "sample_packing: true\npretrain_multipack_attn: false\n"
                                 "shuffle_merged_datasets: false\n"), tok)
    rows2 = [{k: v for k, v in r.items() if k != STATE_KEY} for r in islice(together.rows(), 2)]
    assert "seq_lengths" not in rows2[0] and ids(rows2) == ids(rows)                     # the same rows, one sequence each
    assert [i for i, p in enumerate(collate(rows2)["position_ids"][0].tolist()) if p == 0] == [0, 64]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_packed_documents_do_not_attend_to_each_other(tmp_path, corpus, tok, device):
    "The logits of a packed row equal those of its documents run alone (on the GPU: the CUDA attention kernels)."
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    from ftlab.model import load_model
    cfg = stream_cfg(tmp_path, entry(corpus / "a.jsonl"))
    row = {k: v for k, v in next(Stream(cfg, tok).rows()).items() if k != STATE_KEY}
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)([row])
    model = load_model(cfg, tok).to(device).eval()      # as the trainer has it (bfloat16 on a GPU that has it)
    cuts = [0] + [sum(row["seq_lengths"][:k + 1]) for k in range(len(row["seq_lengths"]))]
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device)).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([row["input_ids"][a:b]], device=device)).logits[0]
                           for a, b in zip(cuts, cuts[1:])])
    tol = 1e-4 if packed.dtype == torch.float32 else 5e-2 * alone.abs().max().item()
    assert len(cuts) > 2 and torch.allclose(packed.float(), alone.float(), atol=tol)


def test_concatenation_and_one_document_per_row(tmp_path, corpus, tok):
    cat = Stream(stream_cfg(tmp_path, entry(corpus / "a.jsonl"), "pretraining_sample_concatenation: true\n"
                            "shuffle_merged_datasets: false\n"), tok)
    rows = list(islice(cat.rows(), 5))
    assert all(len(r["input_ids"]) == 64 and "seq_lengths" not in r for r in rows) and cat.packed and not cat.separate
    own = Stream(stream_cfg(tmp_path, entry(corpus / "a.jsonl"), "shuffle_merged_datasets: false\n", length=16), tok)
    rows = list(islice(own.rows(), 12))
    first = documents(tok, [doc(0)])
    assert [t for r in rows for t in r["input_ids"]][:len(first)] == first
    assert all(len(r["input_ids"]) <= 16 for r in rows) and not own.packed
    assert "one document per row" in own.describe()


def test_the_block_shuffle_is_seeded(tmp_path, corpus, tok):
    def first(extra):
        return ids(islice(Stream(stream_cfg(tmp_path, entry(corpus / "a.jsonl"), "sample_packing: true\n" + extra), tok).rows(), 10))
    plain = ids(islice(Stream(stream_cfg(tmp_path, entry(corpus / "a.jsonl")), tok).rows(), 10))
    shuffled = first("streaming_multipack_buffer_size: 32\n")
    assert shuffled == first("streaming_multipack_buffer_size: 32\n") != plain
    assert first("streaming_multipack_buffer_size: 32\nseed: 7\n") != shuffled


@pytest.mark.parametrize("extra", ["sample_packing: true\nstreaming_multipack_buffer_size: 16\n",
                                   "sample_packing: true\nshuffle_merged_datasets: false\n",
                                   "pretraining_sample_concatenation: true\nstreaming_multipack_buffer_size: 16\n",
                                   "streaming_multipack_buffer_size: 16\n"])
def test_a_position_restores_the_stream_exactly(tmp_path, corpus, tok, extra):
    "Two sources with different text columns, one skipping rows, shuffled, over several passes."
    entries = entry(corpus / "a.jsonl", "    skip: 5\n") + entry(corpus / "b.jsonl", "    text_column: body\n")
    s = Stream(stream_cfg(tmp_path, entries, extra), tok)
    rows = list(islice(s.rows(), 240))
    assert len({json.loads(r[STATE_KEY])["epoch"] for r in rows}) >= 2
    for cut in (0, 3, 20, 77, 150, 230):
        again = list(islice(s.rows(start=json.loads(rows[cut][STATE_KEY])), 240 - cut - 1))
        assert ids(again) == ids(rows[cut + 1:]), cut


def test_sources_interleave_and_skip(tmp_path, corpus, tok):
    entries = entry(corpus / "a.jsonl", "    skip: 5\n") + entry(corpus / "b.jsonl", "    text_column: body\n")
    s = Stream(stream_cfg(tmp_path, entries, length=4096), tok)
    text = tok.decode(next(s.rows())["input_ids"])
    assert text.startswith(doc(5)) and text.index(doc(1000)) < text.index(doc(6))     # one from each in turn
    assert doc(4) not in text.split(tok.eos_token)


@pytest.mark.parametrize("fmt", ["txt", "csv", "parquet", "folder", "saved", "builder"])
def test_every_kind_of_source(tmp_path, tok, fmt):
    import datasets, pandas as pd
    texts = [doc(i) for i in range(12)]
    if fmt == "txt":
        (tmp_path / "c.txt").write_text("\n".join(texts) + "\n"); path = tmp_path / "c.txt"
    elif fmt == "csv":
        pd.DataFrame({"text": texts}).to_csv(tmp_path / "c.csv", index=False); path = tmp_path / "c.csv"
    elif fmt == "parquet":
        pd.DataFrame({"text": texts}).to_parquet(tmp_path / "c.parquet"); path = tmp_path / "c.parquet"
    elif fmt == "folder":
        (tmp_path / "f").mkdir()
        for k in range(2): (tmp_path / "f" / f"p{k}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[k * 6:(k + 1) * 6]))
        path = tmp_path / "f"
    elif fmt == "saved":
        datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved")); path = tmp_path / "saved"
    else:   # axolotl's `path: json` with `data_files`
        (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        path = f"json\n    data_files: [{tmp_path / 'c.jsonl'}]"
    s = Stream(stream_cfg(tmp_path, entry(path), length=4096), tok).check()
    assert tok.decode(next(s.rows())["input_ids"]).split(tok.eos_token)[:12] == texts


def test_a_wrong_text_column_names_the_columns_found(tmp_path, corpus, tok):
    cfg = stream_cfg(tmp_path, entry(corpus / "b.jsonl"))
    with pytest.raises(DataError) as e: Stream(cfg, tok).check()
    p = e.value.problems[0]
    assert p.key == "pretraining_dataset[0].text_column" and "its columns: body" in p.message and "text_column: body" in p.fix
    cfg = stream_cfg(tmp_path, entry(corpus / "a.jsonl", "    text_column: id\n"))
    with pytest.raises(DataError, match="has int in `id`, not text"): Stream(cfg, tok).check()


def test_missing_and_empty_sources_are_one_message(tmp_path, tok):
    with pytest.raises(DataError, match="no such file or folder"):
        Stream(stream_cfg(tmp_path, entry(tmp_path / "nope.jsonl")), tok).check()
    (tmp_path / "few.jsonl").write_text(json.dumps({"text": "one"}) + "\n")
    with pytest.raises(DataError, match="has no rows after the 3 skipped"):
        Stream(stream_cfg(tmp_path, entry(tmp_path / "few.jsonl", "    skip: 3\n")), tok).check()


def test_each_process_streams_its_own_documents(tmp_path, corpus, tok):
    "split_dataset_by_node before tokenizing: the processes' documents are disjoint and together the whole corpus."
    s = Stream(stream_cfg(tmp_path, entry(corpus / "a.jsonl"), "sample_packing: true\nstreaming_multipack_buffer_size: 16\n",
                          length=4096), tok)
    def docs_of(rank):
        row = next(s.rows(rank, 2))
        return [d for d in tok.decode(row["input_ids"]).split(tok.eos_token) if d]
    r0, r1 = docs_of(0), docs_of(1)
    assert not set(r0) & set(r1) and sorted(r0 + r1) == sorted(doc(i) for i in range(80))


@pytest.mark.parametrize("files", [1, 2])
def test_each_process_restores_its_own_position(tmp_path, corpus, tok, files):
    "One file: every other document; two files: one file each. Either way a position restores that process's stream."
    folder = tmp_path / f"parts{files}"; folder.mkdir()
    lines = (corpus / "a.jsonl").read_text().splitlines(keepends=True)
    for k in range(files): (folder / f"p{k}.jsonl").write_text("".join(lines[k::files]))
    s = Stream(stream_cfg(tmp_path, entry(folder), "sample_packing: true\nstreaming_multipack_buffer_size: 8\n"), tok)
    for rank in (0, 1):
        rows = list(islice(s.rows(rank, 2), 60))
        again = list(islice(s.rows(rank, 2, start=json.loads(rows[24][STATE_KEY])), 35))
        assert ids(again) == ids(rows[25:]), rank
    docs = [[d["text"] for d in s.documents(rank, 2)] for rank in (0, 1)]      # one pass of each
    assert not set(docs[0]) & set(docs[1]) and sorted(docs[0] + docs[1]) == sorted(doc(i) for i in range(80))
