"""ConfigEditor, driven headless: widget values in, YAML / validation / marks / files out."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import IPython
from ftlab.config import Config, DatasetConfig, TRLConfig, load_config
from ftlab.editor import PRESETS, SECTIONS, ConfigEditor, field_spec, section_of
from ftlab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
ROUND_TRIP = sorted((ROOT / "ftlab/assets/configs").glob("*.yaml")) + [ROOT / "tests/configs/axolotl_lora_1b.yaml",
                                                           ROOT / "tests/configs/axolotl_qlora_1b.yaml"]
RED = "#d32f2f"


@pytest.fixture(scope="module")
def _editor():
    e = ConfigEditor()
    yield e
    e.close()


@pytest.fixture
def ed(_editor):
    "One editor per module (widgets take time to build), loaded afresh for each test: `load` replaces everything."
    _editor.load(PRESETS["SFT + LoRA (tiny)"])
    _editor.path.value, _editor.message.value, _editor.copy.value = "config.yaml", "", ""
    _editor.copy.layout.display = "none"
    return _editor


def marked(w) -> bool:
    return bool(w.layout.border) and RED in w.layout.border


# --- the form comes from the schema

def test_every_schema_field_has_a_widget():
    e = ConfigEditor()
    assert set(e.form.rows) == set(Config.model_fields)
    e.form.rows["datasets"].add.click()
    assert set(e.form.rows["datasets"].entries[0].form.rows) == set(DatasetConfig.model_fields)
    assert set(e.form.rows["trl"].sub.rows) == set(TRLConfig.model_fields)
    e.form.rows["datasets"].entries[0].remove.click()
    assert e.yaml == "" and e.values == {} and e.level == "empty"
    e.close()


def test_field_kinds_follow_annotations_and_metadata():
    f = Config.model_fields
    assert field_spec("lora_r", f["lora_r"]).lo == 1                        # gt=0 on an int
    assert (field_spec("warmup_ratio", f["warmup_ratio"]).lo, field_spec("warmup_ratio", f["warmup_ratio"]).hi) == (0, 1)
    assert field_spec("optimizer", f["optimizer"]).kind == "choice"           # validator + enum in the schema
    assert field_spec("eval_strategy", f["eval_strategy"]).choices == ("no", "steps", "epoch")   # Literal
    assert field_spec("torch_compile", f["torch_compile"]).choices == (True, False, "auto")
    assert field_spec("special_tokens", f["special_tokens"]).kind == "section"
    assert field_spec("lr_scheduler_kwargs", f["lr_scheduler_kwargs"]).kind == "yaml"
    assert all(section_of(k) in SECTIONS for k in f) and section_of("brand_new_key") == "other"


def test_widget_types(ed):
    import ipywidgets as W
    assert isinstance(ed.widget_for("lora_r"), W.BoundedIntText) and ed.widget_for("lora_r").min == 1
    assert isinstance(ed.widget_for("adapter"), W.Dropdown) and ed.widget_for("adapter").options[0] == ("(unset)", "")
    assert isinstance(ed.widget_for("load_in_4bit"), W.Checkbox)
    assert isinstance(ed.widget_for("learning_rate"), W.FloatText)
    assert isinstance(ed.widget_for("datasets[0].path"), (W.Text, W.Combobox))
    assert isinstance(ed.widget_for("lora_target_modules"), W.Textarea)
    assert "LoRA rank" in ed.widget_for("lora_r").tooltip


# --- editing

def test_widget_changes_update_yaml(ed):
    ed.widget_for("lora_r").value = 64
    ed.widget_for("micro_batch_size").value = 2
    ed.widget_for("gradient_accumulation_steps").value = 4
    ed.widget_for("optimizer").value = "adamw_torch_fused"
    ed.widget_for("lora_target_modules").value = "[q_proj, v_proj]"
    ed.widget_for("datasets[0].type").value = "alpaca"
    d = yaml.safe_load(ed.yaml)
    assert d["lora_r"] == 64 and d["optimizer"] == "adamw_torch_fused" and d["lora_target_modules"] == ["q_proj", "v_proj"]
    assert d["datasets"][0]["type"] == "alpaca"
    assert ed.config.effective_batch_size == 8 and "effective batch 8" in ed.status.value
    assert ed.values == d


def test_untouched_fields_stay_unset_and_unset_removes():
    e = ConfigEditor()
    e.widget_for("base_model").value = "ftlab:tiny"
    assert e.values == {"base_model": "ftlab:tiny"}
    e.widget_for("trust_remote_code").value = True            # a bool with a default: set once touched
    e.widget_for("trust_remote_code").value = False
    assert e.values == {"base_model": "ftlab:tiny", "trust_remote_code": False}
    e.form.rows["trust_remote_code"].reset.click()
    e.widget_for("adapter").value = "lora"
    e.widget_for("adapter").value = ""                        # "(unset)"
    e.widget_for("base_model").value = ""                     # an emptied text box
    assert e.values == {}
    e.close()


def test_sections_and_dataset_entries():
    e = ConfigEditor()
    e.set("base_model", "ftlab:tiny")
    e.form.rows["datasets"].add.click()
    e.widget_for("datasets[0].path").value = "ftlab:data/alpaca.jsonl"
    e.widget_for("datasets[0].type").value = "alpaca"
    e.set("datasets[1].path", "ftlab:data/chat.jsonl")        # adds an entry
    e.widget_for("special_tokens.pad_token").value = "<|pad|>"
    assert e.level == "ok", e.problems
    assert e.values["datasets"] == [{"path": "ftlab:data/alpaca.jsonl", "type": "alpaca"}, {"path": "ftlab:data/chat.jsonl"}]
    assert e.values["special_tokens"] == {"pad_token": "<|pad|>"}
    e.form.rows["datasets"].entries[0].remove.click()
    assert e.values["datasets"] == [{"path": "ftlab:data/chat.jsonl"}]
    e.unset("special_tokens.pad_token")
    assert "special_tokens" not in e.values
    e.close()


# --- validation as you type

def test_bad_value_is_reported_marked_and_cleared(ed):
    ed.widget_for("adapter").value = "qlora"                  # qlora without load_in_4bit
    assert ed.level == "invalid"
    assert [p.key for p in ed.problems] == ["adapter"]
    assert "adapter" in ed.status.value and "load_in_4bit" in ed.status.value
    assert marked(ed.widget_for("adapter"))
    assert "load_in_4bit" in ed.form.rows["adapter"].msg.value     # the message and fix at the widget
    assert ed.tabs.titles[1].startswith("✗ adapter")
    with pytest.raises(ConfigError) as err:
        ed.config
    assert err.value.problems[0].key == "adapter"
    ed.widget_for("load_in_4bit").value = True                # the fix
    assert ed.level == "ok" and ed.problems == [] and not marked(ed.widget_for("adapter"))
    assert "✓ valid" in ed.status.value and isinstance(ed.config, Config)


def test_out_of_range_value_marks_the_widget(ed):
    ed.set("lora_r", 0)            # a bounded widget cannot hold 0: the value waits in other keys, as written
    assert ed.values["lora_r"] == 0 and [p.key for p in ed.problems] == ["lora_r"]
    assert marked(ed.form.other.input)
    ed.widget_for("lora_r").value = 4                         # typing in the widget takes the key back
    assert ed.level == "ok" and ed.values["lora_r"] == 4 and "lora_r" not in ed.form.other.input.value
    ed.widget_for("lora_dropout").value = 0.5
    ed.widget_for("warmup_ratio").value = 0.1                 # warmup_steps and warmup_ratio both set
    assert [p.key for p in ed.problems] == ["warmup_ratio"] and marked(ed.widget_for("warmup_ratio"))


def test_nested_problem_points_at_the_dataset_widget(ed):
    ed.widget_for("datasets[0].split").value = "train[:1%"    # an invalid slice
    assert [p.key for p in ed.problems] == ["datasets[0].split"] and marked(ed.widget_for("datasets[0].split"))
    assert "split" in ed.form.rows["datasets"].entries[0].form.rows["split"].msg.value
    assert ed.tabs.titles[2].startswith("✗ data")
    ed.widget_for("datasets[0].split").value = "train[:1%]"
    assert ed.level == "ok" and not ed.widget_for("datasets[0].split").layout.border
    ed.widget_for("datasets[0].type").value = "sharegpt"       # an axolotl type ftlab has not built yet
    assert ed.level == "unsupported" and ed.problems[0].key == "datasets[0].type"
    assert "#ef6c00" in ed.widget_for("datasets[0].type").layout.border and "sharegpt" in ed.status.value


def test_nested_section_problem(ed):
    ed.set("trl.top_p", 2)                                     # out of the widget's range: kept in trl's other keys
    assert [p.key for p in ed.problems] == ["trl.top_p"] and marked(ed.form.rows["trl"].sub.other.input)
    ed.widget_for("trl.top_p").value = 0.9
    assert ed.values["trl"] == {"top_p": 0.9} and ed.level == "ok"


def test_unreadable_yaml_box_is_reported_not_lost(ed):
    ed.widget_for("lora_target_modules").value = "[q_proj, v_proj"
    assert ed.level == "invalid" and ed.problems[0].key == "lora_target_modules"
    assert "YAML syntax error" in ed.problems[0].message and marked(ed.widget_for("lora_target_modules"))
    ed.save_button.click()
    assert "not saved" in ed.message.value
    ed.widget_for("lora_target_modules").value = "[q_proj, v_proj]"
    assert ed.level == "ok"


def test_unknown_key_in_other_keys(ed):
    ed.form.other.input.value = "lora_rr: 8\n"
    assert ed.problems[0].key == "lora_rr" and "did you mean `lora_r`" in ed.problems[0].message
    assert marked(ed.form.other.input)
    ed.form.other.input.value = "strict: false\n"            # an axolotl key ftlab ignores: a note, no problem
    assert ed.level == "ok" and "strict" in ed.status.value


# --- presets

@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_fill_the_form_and_validate(name):
    e = ConfigEditor()
    e.preset.value = name
    assert e.values and e.level in ("ok", "unsupported"), e.problems
    assert load_config(e.yaml, check_support=False) == load_config(PRESETS[name], check_support=False)
    assert e.level == "ok" and isinstance(e.config, Config)
    e.close()


def test_preset_replaces_the_form(ed):
    ed.widget_for("lora_r").value = 3
    ed.preset.value = "Full fine-tune (tiny)"
    assert "adapter" not in ed.values and "lora_r" not in ed.values and ed.values["num_epochs"] == 2


# --- opening and round trips

@pytest.mark.parametrize("path", ROUND_TRIP, ids=lambda p: p.name)
def test_round_trip(path, _editor):
    want = load_config(path)
    for source in (str(path), path, path.read_text(), want, want.to_dict(exclude_unset=True)):
        _editor.load(source)
        assert load_config(_editor.yaml) == want
        assert _editor.level == "ok", _editor.problems
    e = ConfigEditor.from_file(path)
    assert load_config(e.yaml) == want
    e.close()


def test_ignored_keys_kept_in_other_keys():
    e = ConfigEditor(ROOT / "tests/configs/axolotl_lora_1b.yaml")
    other = yaml.safe_load(e.form.other.input.value)
    assert other == {"strict": False, "loss_watchdog_threshold": 5.0, "loss_watchdog_patience": 3}
    assert e.values["datasets"][0]["roles"] == {"user": ["user"], "assistant": ["assistant"]}
    e.close()


def test_values_a_widget_cannot_show_round_trip():
    text = textwrap.dedent("""
        base_model: ftlab:tiny
        datasets:
          - path: ftlab:data/chat.jsonl
            type: {field_instruction: q}
            weird_key: 1
        lora_dropout: 2
        trl: {}
        num_epochs: 1.5
        sequence_parallel_degree: 2
    """)
    e = ConfigEditor(text)
    assert e.values == yaml.safe_load(text)
    assert yaml.safe_load(e.form.other.input.value) == {"lora_dropout": 2, "trl": {}, "sequence_parallel_degree": 2}
    assert yaml.safe_load(e.form.rows["datasets"].entries[0].form.other.input.value) == {"type": {"field_instruction": "q"}, "weird_key": 1}
    assert {p.key for p in e.problems} >= {"lora_dropout", "datasets[0].weird_key"}
    e.close()


def test_duplicate_keys():
    e = ConfigEditor(ROOT / "tests/configs/bad_duplicate_key.yaml")   # read as YAML reads it, with a notice
    assert "learning_rate" in e.message.value and "written twice" in e.message.value
    assert e.values["learning_rate"] == 2.0e-3 and e.level == "ok"
    e.form.other.input.value = "strict: false\nstrict: true\n"      # typed twice in a box: a problem
    assert e.level == "invalid" and "written twice" in e.problems[0].message
    e.close()


def test_unreadable_source_is_kept():
    e = ConfigEditor("base_model: [oops\n")
    assert e.level == "invalid" and "YAML syntax error" in e.problems[0].message
    assert e.form.other.input.value == "base_model: [oops\n"
    with pytest.raises(ConfigError):
        ConfigEditor.from_file("/no/such/config.yaml")
    e.close()


# --- buttons

class FakeShell:
    def __init__(self): self.calls = []
    def set_next_input(self, text, replace=False): self.calls.append((text, replace))


def test_insert_button_writes_a_finetune_cell(ed, monkeypatch):
    shell = FakeShell()
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    ed.insert_button.click()
    (text, replace), = shell.calls
    assert text.startswith("%%finetune\n") and replace is False
    assert load_config(text.split("\n", 1)[1]) == ed.config
    assert "cell requested" in ed.message.value and ed.copy.value == text


def test_insert_without_a_front_end_shows_the_text(ed, monkeypatch):
    monkeypatch.setattr(IPython, "get_ipython", lambda: None)
    assert ed.insert_cell() is False
    assert ed.copy.value.startswith("%%finetune\n") and ed.copy.layout.display != "none"
    assert "copy this text" in ed.message.value


def test_insert_in_colab_also_shows_the_text(ed, monkeypatch):
    shell = FakeShell()
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    monkeypatch.setitem(sys.modules, "google.colab", type(sys)("google.colab"))
    ed.insert_cell()
    assert shell.calls and ed.copy.value.startswith("%%finetune\n") and "Colab" in ed.message.value


def test_save_button_writes_a_loadable_file(ed, tmp_path):
    ed.widget_for("lora_r").value = 24
    ed.path.value = str(tmp_path / "cfg.yaml")
    ed.save_button.click()
    assert "saved to" in ed.message.value and str(tmp_path / "cfg.yaml") in ed.message.value
    assert load_config(tmp_path / "cfg.yaml") == ed.config and ed.config.lora_r == 24


@pytest.mark.parametrize("bad", ["", "{tmp}", "{tmp}/file.txt/cfg.yaml", "{tmp}/missing/cfg.yaml"])
def test_bad_save_path_gives_a_message(ed, tmp_path, bad):
    (tmp_path / "file.txt").write_text("x")
    ed.path.value = bad.format(tmp=tmp_path)
    ed.save_button.click()                                    # no exception
    assert "✗" in ed.message.value and "Traceback" not in ed.message.value


# --- import cost

def test_import_does_not_import_torch():
    code = "import ftlab.editor, sys; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
