"""Training methods: the registry (`ftlab.methods.registry`), what every method shares (`ftlab.methods.common`) and
one module per family. Importing this package registers the built-in families; a new method is one notebook under
`nbs/methods/` and one name on the import line below. Nothing here imports torch: trainers load when a run builds one.
"""
from ftlab.methods.registry import Head, LM_HEAD, Method, METHODS, Panel, get_method, register_method
from ftlab.methods.common import (GRAD_NORM_PANEL, LOSS_PANEL, frozen_copy_needed, liger_kernel_config, make_trainer,
                                  steps_per_epoch, trainer_args, training_args)
from ftlab.methods import sft, preference, reward_model, grpo, ebft  # noqa: F401  (the built-in families register themselves)

__all__ = ["Head", "LM_HEAD", "Method", "METHODS", "Panel", "get_method", "register_method", "GRAD_NORM_PANEL",
           "LOSS_PANEL", "frozen_copy_needed", "liger_kernel_config", "make_trainer", "steps_per_epoch", "trainer_args",
           "training_args"]
