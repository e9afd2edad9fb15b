"""The charts' figure: a legend wherever a panel draws more than one series (train beside eval)."""
from ftlab.charts import figure
from ftlab.methods.common import LOSS_PANEL, GRAD_NORM_PANEL


def test_eval_beside_train_has_a_legend():
    logs = [{"event": "log", "step": s, "loss": 1 / s, "grad_norm": 1.0} for s in range(1, 5)]
    with_eval = figure(logs + [{"event": "eval", "step": 4, "eval_loss": 0.5}], [LOSS_PANEL, GRAD_NORM_PANEL])
    shown = {d["name"]: d["showlegend"] for d in with_eval["data"]}
    assert with_eval["layout"]["showlegend"] is True
    assert shown == {"loss: train": True, "loss: eval": True, "grad norm: grad norm": False}
    assert figure(logs, [LOSS_PANEL, GRAD_NORM_PANEL])["layout"]["showlegend"] is False   # nothing to tell apart
