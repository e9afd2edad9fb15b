"""One walk of the parameters (ftlab.methods.grad_walk) in a real run: the same training as transformers' own walks,
bit for bit, with one walk for the whole run; and the model and trainer given back their own methods afterwards."""
import torch
import torch.nn.modules.module as modules
import ftlab.methods.grad_walk as gw
from ftlab.run import Run
from run_helpers import RUN_CONFIG, logs


def run(tmp_path, name):
    r = Run(RUN_CONFIG.format(out=tmp_path / name) + "max_grad_norm: 0.01\nseed: 3\n")
    return r.train(max_steps=4)


def test_one_walk_trains_exactly_like_transformers_walks(tmp_path, monkeypatch):
    hooks = (len(modules._global_parameter_registration_hooks), len(modules._global_module_registration_hooks))
    ours = run(tmp_path, "walk")
    (cb,) = [c for c in ours.trainer.callback_handler.callbacks if type(c).__name__ == "GradWalk"]
    # the loop's zero_grad before training is torch's; the four steps' are the walk's, over one walk
    assert (cb.zero_grads, cb.clips, cb.walks) == (4, 4, 1)
    assert "zero_grad" not in ours.trainer.model_wrapped.__dict__ and "_clip_grad_norm" not in ours.trainer.__dict__
    assert (len(modules._global_parameter_registration_hooks), len(modules._global_module_registration_hooks)) == hooks

    from transformers import TrainerCallback
    class Off(TrainerCallback):              # transformers' own walks: torch's zero_grad, the trainer's clipping
        def release(self): pass
    monkeypatch.setattr(gw, "grad_walk_callback", lambda trainer: Off())
    theirs = run(tmp_path, "torch")
    assert not [c for c in theirs.trainer.callback_handler.callbacks if type(c).__name__ == "GradWalk"]
    a, b = logs(ours), logs(theirs)
    assert [r["step"] for r in a] == [1, 2, 3, 4] and len(b) == 4
    assert all(r["grad_norm"] > 0.01 for r in a)          # every step is clipped: the clipping's selection matters
    for x, y in zip(a, b):
        assert (x["loss"], x["grad_norm"]) == (y["loss"], y["grad_norm"]), (x, y)
    for p, q in zip(ours.trainer.model.parameters(), theirs.trainer.model.parameters()):
        assert torch.equal(p, q)


def test_a_new_parameter_in_the_tree_is_walked_and_a_throwaway_list_is_not():
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    walk = gw.ParameterWalk(net)
    try:
        assert walk.parameters() == tuple(net.parameters()) and walk.walks == 1
        torch.nn.ModuleList(list(net))                   # as Llama's forward slices its layers each call
        net.add_module("extra", torch.nn.Linear(3, 1))  # a new submodule: its parameters belong to the tree now
        assert walk.parameters() == tuple(net.parameters()) and len(walk.parameters()) == 6 and walk.walks == 2
        net[0].register_parameter("gain", torch.nn.Parameter(torch.ones(3)))
        assert any(p is net[0].gain for p in walk.parameters()) and walk.walks == 3
    finally:
        walk.close()
    assert walk.handles == [] and walk.params is None
