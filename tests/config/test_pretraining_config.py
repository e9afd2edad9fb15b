"""`pretraining_dataset` in config terms: axolotl's three spellings and its example configs load; its rules are one
message each, naming the key and why; the stream keys say when they change nothing."""
import pytest
from ftlab.config import load_config
from ftlab.errors import ConfigError

BASE = "base_model: ftlab:tiny\n"
# the shape of axolotl's examples/streaming/pretrain.yaml
AXOLOTL = """base_model: ftlab:tiny
pretraining_dataset:
  - path: HuggingFaceFW/fineweb-edu
    name: sample-10BT
    type: pretrain
    text_column: text
    split: train
streaming_multipack_buffer_size: 10000
shuffle_merged_datasets: true
max_steps: 1000
sequence_len: 1024
sample_packing: true
pretrain_multipack_attn: true
attn_implementation: flash_attention_2
gradient_accumulation_steps: 8
micro_batch_size: 1
learning_rate: 5e-4
warmup_ratio: 0.1
save_strategy: steps
save_steps: 250
special_tokens:
  pad_token: "<|endoftext|>"
"""


def problems(text):
    with pytest.raises(ConfigError) as e: load_config(text)
    return e.value.problems


def test_axolotls_streaming_example_loads_as_written():
    cfg = load_config(AXOLOTL)
    (e,) = cfg.pretraining_dataset
    assert (e.path, e.name, e.type, e.column, e.split) == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "pretrain", "text", "train")
    assert cfg.streaming_multipack_buffer_size == 10000 and cfg.pretrain_multipack_attn and cfg.datasets is None
    assert not any("pretraining" in n or "stream" in n for n in cfg.notes)


@pytest.mark.parametrize("value", ["allenai/c4", "{path: allenai/c4, name: en}", "[allenai/c4]", "[{path: allenai/c4}]"])
def test_axolotls_spellings_of_the_key(value):
    cfg = load_config(BASE + f"max_steps: 10\npretraining_dataset: {value}\n")
    assert [e.path for e in cfg.pretraining_dataset] == ["allenai/c4"] and cfg.pretraining_dataset[0].type == "pretrain"
    assert load_config(cfg.to_yaml()) == cfg


def test_several_sources_and_completion_with_field():
    cfg = load_config(BASE + "max_steps: 10\npretraining_dataset:\n  - path: wikitext\n    name: wikitext-103-raw-v1\n"
                      "    type: completion\n    field: text\n  - path: json\n    data_files: [a.jsonl, b.jsonl]\n    skip: 100\n")
    a, b = cfg.pretraining_dataset
    assert a.type == "completion" and a.column == "text" and b.data_files == ["a.jsonl", "b.jsonl"] and b.skip == 100


def test_max_steps_is_required_and_says_why():
    (p,) = problems(BASE + "sequence_len: 512\nmicro_batch_size: 4\npretraining_dataset: allenai/c4\n")
    assert p.key == "pretraining_dataset" and p.line == 4
    assert "`max_steps` is required" in p.message and "a stream has no length" in p.message
    assert "max_steps: 1000" in p.fix and "2,048 here" in p.fix        # 512 x 4 tokens per step


@pytest.mark.parametrize("extra, key, words", [
    ("  - path: a.jsonl\n    type: chat_template\n", "pretraining_dataset[0].type", "streams raw text"),
    ("  - path: a.jsonl\n    split: train[:10%]\n", "pretraining_dataset[0].split", "only a split name"),
    ("  - path: a.jsonl\n    text_column: body\n    field: text\n", "pretraining_dataset[0]", "two text columns"),
    ("  - path: a.jsonl\n    roles_to_train: [assistant]\n", "pretraining_dataset[0].roles_to_train", "read by the formats of `datasets:`"),
    ("  - path: a.jsonl\n    skp: 3\n", "pretraining_dataset[0].skp", "did you mean `skip`?"),
])
def test_entry_mistakes(extra, key, words):
    (p,) = problems(BASE + "max_steps: 10\npretraining_dataset:\n" + extra)
    assert p.key == key and words in p.message, p


def test_the_method_must_train_on_text():
    for method in ("rl: dpo", "reward_model: true", "rl: ebft"):
        (p,) = [p for p in problems(BASE + f"max_steps: 10\n{method}\npretraining_dataset: allenai/c4\n")
                if p.key == method.split(":")[0]]
        assert "trains the language-modelling loss on raw text" in p.message and "supervised fine-tuning" in p.fix


def test_rules_axolotl_has_are_one_message_each():
    ps = problems(BASE + "max_steps: 10\npretraining_dataset: allenai/c4\nval_set_size: 0.1\ndataset_exact_deduplication: true\n"
                  "pretrain_multipack_buffer_size: 10\nstreaming_multipack_buffer_size: 20\n")
    assert sorted(p.key for p in ps) == ["dataset_exact_deduplication", "pretrain_multipack_buffer_size", "val_set_size"]
    assert any("other name of `streaming_multipack_buffer_size`, which is set too" in p.message for p in ps)


def test_notes_for_stream_keys_that_change_nothing():
    notes = load_config(BASE + "datasets: [{path: ftlab:data/chat.jsonl, type: chat_template}]\nstreaming: true\n"
                        "pretrain_multipack_attn: false\n").notes
    assert any("`streaming: true` streams `pretraining_dataset`" in n for n in notes)
    assert any("`pretrain_multipack_attn` shapes the rows streamed from `pretraining_dataset`, which is not set" in n for n in notes)
    notes = load_config(BASE + "max_steps: 5\npretraining_dataset: allenai/c4\npretraining_sample_concatenation: true\n"
                        "pretrain_multipack_attn: false\nstreaming: false\ngroup_by_length: true\n").notes
    assert any("concatenated rows" in n and "attend to each other" in n for n in notes)
    assert any("always streamed" in n for n in notes) and any("group_by_length" in n for n in notes)
    cfg = load_config(BASE + "max_steps: 5\npretraining_dataset: allenai/c4\npretrain_multipack_buffer_size: 64\ndataset_num_proc: 3\n")
    assert cfg.streaming_multipack_buffer_size == 64 and cfg.dataset_processes == 3


def test_text_column_in_datasets_points_at_field():
    (p,) = problems(BASE + "datasets:\n  - path: a.jsonl\n    type: completion\n    text_column: body\n")
    assert p.key == "datasets[0].text_column" and "`field:`" in p.fix
