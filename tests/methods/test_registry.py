"""A method is one registry entry: registering one makes the config accept it, the data layer prepare its rows, the
plan, the trainer and the dashboard use its facts, with no other file changed."""
import pytest
from ftlab.config import load_config
from ftlab.errors import ConfigError
from ftlab.methods import METHODS, Panel, get_method, register_method
from ftlab.methods.sft import build_sft
from ftlab.run import Run


@pytest.fixture
def toy_ebft():
    "`rl: ebft` replaced for the length of a test by an SFT-shaped stand-in (not EBFT's maths)."
    real = METHODS.pop("ebft")
    seen = []
    def check(cfg, found):
        seen.append(cfg.method)
        if cfg.ebft is not None and cfg.ebft.ce_coef > 0.5:
            found.error(("ebft", "ce_coef"), "the toy method keeps ce_coef at or below 0.5", "lower `ebft.ce_coef`")
    def build(cfg, method, model, tokenizer, prepared, callbacks=(), **kw):
        return build_sft(cfg, method, model, tokenizer, prepared, callbacks)
    panels = [Panel("toy loss", [("log", "loss", "train")])]
    yield register_method("ebft", build, description="a stand-in", data="sft", packing=False, reads=("toy_",),
                          checks=(check,), panels=panels, figures=[("loss", "toy", ".2f")]), seen
    METHODS["ebft"] = real


TEXT = ("base_model: ftlab:tiny\nrl: ebft\nadapter: lora\nlora_target_linear: true\nsequence_len: 128\n"
        "micro_batch_size: 4\nmax_steps: 2\ndatasets: [{path: ftlab:data/chat.jsonl, type: chat_template}]\n")


def test_an_unregistered_method_is_not_supported(monkeypatch):
    monkeypatch.delitem(METHODS, "ebft")
    with pytest.raises(ConfigError) as e:
        load_config(TEXT)
    assert "`rl: ebft` is not supported yet" in str(e.value)


def test_one_entry_is_all_a_method_needs(toy_ebft, tmp_path):
    entry, seen = toy_ebft
    cfg = load_config(TEXT + f"output_dir: {tmp_path}/out\n")      # the config accepts it and runs its checks
    assert get_method(cfg) is entry and seen == ["ebft"]
    with pytest.raises(ConfigError) as e:
        load_config(TEXT + "ebft: {ce_coef: 0.9}\n")
    assert "ce_coef" in str(e.value) and "line 9" in str(e.value)   # the line the key is written on
    with pytest.raises(ConfigError) as e:
        load_config(TEXT + "sample_packing: true\n")                # the entry says packing is not allowed
    assert "sample_packing" in str(e.value)
    run = Run(cfg)
    run.train()                                                     # its builder trains
    assert run.state == "finished" and list(run.history["step"]) == [1, 2]
    from ftlab.dashboard import Dashboard
    from ftlab.events import format_record
    dash = Dashboard.for_run(run, rich=False)
    assert [p.title for p in dash.panels] == ["toy loss"] and dash.figures == entry.figures
    log = next(r for r in run.records if r.get("event") == "log" and r.get("loss") is not None)
    assert " · toy " in format_record(log, dash.figures)           # the progress line shows its headline figure
