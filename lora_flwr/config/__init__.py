"""The one experiment schema shared by ``run_simulation.py``, ``flwr run`` and the CLI.

An experiment is a tree of frozen dataclasses. It can be built from

* a TOML file with one table per section (``[lora]``, ``[train]``, ...),
* a flat Flower ``run_config`` whose keys are dotted (``"lora.r"``), which is what
  ``flwr run --run-config`` and ``[tool.flwr.app.config]`` produce,
* ``--set section.key=value`` overrides on the command line.

Unknown keys and ill-typed or out-of-range values raise ``ValueError`` naming the key.
Flower run-config values may only be bool/int/float/str, so sequences are written as
comma-separated strings in the flat form.

The package imports only the standard library:

* :mod:`~lora_flwr.config.choices`: the allowed values (``Literal`` aliases);
* :mod:`~lora_flwr.config.fields`: checks derived from annotations and metadata;
* :mod:`~lora_flwr.config.refusals`: the one table of cross-feature refusals;
* :mod:`~lora_flwr.config.sections` (model, LoRA, data, training, loss, compute,
  evaluation) and :mod:`~lora_flwr.config.fed` (the federation's sections);
  :mod:`~lora_flwr.config.schema`: the tree they form;
* :mod:`~lora_flwr.config.renames`: keys that moved, refused with their new name;
* :mod:`~lora_flwr.config.load`: TOML, flat run configs, overrides;
* :mod:`~lora_flwr.config.app_config`: ``[tool.flwr.app.config]`` from the schema
  (``python -m lora_flwr.config --app-config``).
* :mod:`~lora_flwr.config.unusual`: values accepted but far from their usual
  range, as one warning line each.
* :mod:`~lora_flwr.config.identity`: a run's identity (the config keys that can
  change its numbers) and fingerprint, which a resume must match.
"""

from lora_flwr.config.choices import (
    COMPRESSIONS,
    HEAD_CALIBRATIONS,
    HEAD_MODES,
    LOSSES,
    NATIVE_MODEL_NAMES,
    REGEX_PREFIX,
    Compression,
    HeadCalibration,
    HeadMode,
    Loss,
    Task,
)
from lora_flwr.config.cli import add_config_arguments, config_from_arguments
from lora_flwr.config.fed import (
    CompressionConfig,
    FedConfig,
    GuardsConfig,
    HeadConfig,
    PrivacyConfig,
    SamplingConfig,
    SecAggConfig,
    ServerOptConfig,
)
from lora_flwr.config.load import FlatValue, parse_value, unflatten
from lora_flwr.config.owners import parse_partition_owners
from lora_flwr.config.refusals import (
    REFUSALS,
    Refusal,
    check_cross_feature,
    cross_feature_errors,
)
from lora_flwr.config.renames import RENAMED
from lora_flwr.config.schema import ExperimentConfig
from lora_flwr.config.sections import (
    ComputeConfig,
    DataConfig,
    EvalConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    TrainConfig,
)
from lora_flwr.config.unusual import unusual_values

__all__ = [
    "COMPRESSIONS",
    "HEAD_CALIBRATIONS",
    "HEAD_MODES",
    "LOSSES",
    "NATIVE_MODEL_NAMES",
    "REFUSALS",
    "REGEX_PREFIX",
    "RENAMED",
    "Compression",
    "CompressionConfig",
    "ComputeConfig",
    "DataConfig",
    "EvalConfig",
    "ExperimentConfig",
    "FedConfig",
    "FlatValue",
    "GuardsConfig",
    "HeadCalibration",
    "HeadConfig",
    "HeadMode",
    "LoraConfig",
    "Loss",
    "LossConfig",
    "ModelConfig",
    "PrivacyConfig",
    "Refusal",
    "SamplingConfig",
    "SecAggConfig",
    "ServerOptConfig",
    "Task",
    "TrainConfig",
    "add_config_arguments",
    "check_cross_feature",
    "config_from_arguments",
    "cross_feature_errors",
    "parse_partition_owners",
    "parse_value",
    "unflatten",
    "unusual_values",
]
