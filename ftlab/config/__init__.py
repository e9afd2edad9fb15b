"""Axolotl's YAML config as a pydantic schema, and a loader whose every error names the key, the YAML line and the fix.

The package, one job per module (each exported from its notebook in `nbs/config/`):

- `values`: the words messages are written in (`key_text`, `fmt`, `close_match`, ...) and the shared value checks;
- `keys`: axolotl's names and ftlab's answer to each (methods, optimizers, ignored / not-yet-supported keys);
- `sections`: `Section`, the base of every mapping, and the nested sections (`datasets:`, `trl:`, `ebft:`, `vllm:`,
  `fsdp_config:`);
- `schema`: `Config`, composed from one class per group of top-level keys;
- `parallel`: several processes in config terms: DeepSpeed presets and files, FSDP2's options, what will run;
- `source`: YAML with line numbers, config files, `--set` overrides;
- `translate`: pydantic's errors as `Problem`s;
- `checks`: the checks across keys, one function per concern, and what this version can run;
- `load`: `load_config` and `check_supported`.

Nothing here imports torch, transformers or datasets.
"""
from .values import (BoolOrAuto, Choice, GradientCheckpointing, Number, PositiveNumber, ResumeFrom, TargetModules,
                     TextOrBool, ValSetSize, close_match, fmt, key_path, key_text, value_text)
from .keys import (AXOLOTL_ADAPTERS, AXOLOTL_DATASET_TYPES, AXOLOTL_OPTIMIZERS, AXOLOTL_PAIR_FORMATS, AXOLOTL_SCHEDULERS,
                   COVERED_PLUGINS, DATASET_IGNORED_KEYS, DATASET_TYPES, DATASET_UNSUPPORTED_KEYS, IGNORED_KEYS,
                   IGNORED_PREFIXES, LR_SCHEDULERS, NEUTRAL_VALUES, OPTIMIZERS, RL_METHODS, TRL_MISSING_KEYS,
                   UNSUPPORTED_KEYS, UNSUPPORTED_PREFIXES, WIRED_TRACKERS)
from .sections import DatasetConfig, EBFTConfig, FSDPConfig, Section, SpecialTokens, TrainOnEos, TRLConfig, VLLMConfig
from .schema import (AdapterKeys, AdapterName, Config, DataKeys, KernelKeys, MethodKeys, MethodName, ModelKeys,
                     OptimizerName, ParallelKeys, SchedulerName, TrackerKeys, TrainingKeys)
from .source import Where, parse_overrides, parse_yaml
from .checks import CHECKS, Found, check_runnable, cross_check
from .load import check_supported, load_config

__all__ = [
    # values
    "BoolOrAuto", "Choice", "GradientCheckpointing", "Number", "PositiveNumber", "ResumeFrom", "TargetModules",
    "TextOrBool", "ValSetSize", "close_match", "fmt", "key_path", "key_text", "value_text",
    # keys
    "AXOLOTL_ADAPTERS", "AXOLOTL_DATASET_TYPES", "AXOLOTL_OPTIMIZERS", "AXOLOTL_PAIR_FORMATS", "AXOLOTL_SCHEDULERS",
    "COVERED_PLUGINS", "DATASET_IGNORED_KEYS", "DATASET_TYPES", "DATASET_UNSUPPORTED_KEYS", "IGNORED_KEYS",
    "IGNORED_PREFIXES", "LR_SCHEDULERS", "NEUTRAL_VALUES", "OPTIMIZERS", "RL_METHODS", "TRL_MISSING_KEYS",
    "UNSUPPORTED_KEYS", "UNSUPPORTED_PREFIXES", "WIRED_TRACKERS",
    # sections and schema
    "DatasetConfig", "EBFTConfig", "FSDPConfig", "Section", "SpecialTokens", "TrainOnEos", "TRLConfig", "VLLMConfig",
    "AdapterKeys", "AdapterName", "Config", "DataKeys", "KernelKeys", "MethodKeys", "MethodName", "ModelKeys",
    "OptimizerName", "ParallelKeys", "SchedulerName", "TrackerKeys", "TrainingKeys",
    # reading, checking, loading
    "Where", "parse_overrides", "parse_yaml", "CHECKS", "Found", "check_runnable", "cross_check",
    "check_supported", "load_config",
]
