"""The experiment schema: one frozen dataclass per section, nested in one tree.

Every field states what it accepts where it is declared: its annotation (a type
or a ``Literal`` alias from :mod:`lora_flwr.config.choices`) and, where needed,
an interval (:func:`~lora_flwr.config.fields.bounded`). Each section's
``__post_init__`` runs :func:`~lora_flwr.config.fields.check_fields` on them,
then the few checks no annotation can state, then the rows of
:data:`~lora_flwr.config.refusals.REFUSALS` local to the section.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_flwr.config import load
from lora_flwr.config.choices import ActiveFilter, OnExisting
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
from lora_flwr.config.fields import AT_LEAST_0, bounded, check_fields, pattern
from lora_flwr.config.load import FlatValue
from lora_flwr.config.refusals import check_refusals
from lora_flwr.config.sections import (
    ComputeConfig,
    DataConfig,
    EvalConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    TrainConfig,
)


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: everything a run needs, saved next to its results."""

    # Run name; results go to <output_dir>/<name>. It is one folder inside
    # output_dir: it must not climb out of it.
    name: str = pattern(
        "default",
        r"(?!.*\.\.)[A-Za-z0-9_][A-Za-z0-9._-]*",
        "one folder name (letters, digits, '.', '_', '-'; no '/' or '..')",
    )
    seed: int = bounded(0, AT_LEAST_0)  # seeds init, data split, sampling, training
    output_dir: str = "results"
    # What to do when <output_dir>/<name> already holds results: refuse (the
    # default), overwrite (clear it first) or resume (continue that run).
    on_existing: OnExisting = "refuse"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    server_opt: ServerOptConfig = field(default_factory=ServerOptConfig)
    guards: GuardsConfig = field(default_factory=GuardsConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)

    def __post_init__(self) -> None:
        """Check the top-level fields and the refusals across sections."""
        check_fields(self, "")
        check_refusals(self, "")

    def update_filter(self) -> ActiveFilter:
        """Return the update filter this run uses (``guards.filter``, "auto" resolved).

        "auto" is "cosine", except with differential privacy (leaving out a client
        for what it sent is outside the accountant's analysis) or SecAgg+ (the
        server sees no single update), where it is "none".
        """
        chosen = self.guards.filter
        if chosen != "auto":
            return chosen
        if self.privacy.noise_multiplier != 0 or self.secagg.enabled:
            return "none"
        return "cosine"

    # ----------------------------------------------------------------- builders
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExperimentConfig:
        """Build from a nested mapping (a parsed TOML file).

        Raises
        ------
        ValueError
            On an unknown key or a value of the wrong type or range.
        """
        return typing.cast(ExperimentConfig, load.build(cls, data))

    @classmethod
    def from_flat(cls, flat: Mapping[str, FlatValue]) -> ExperimentConfig:
        """Build from a flat Flower run_config with dotted keys (``"lora.r"``)."""
        return cls.from_dict(load.unflatten(flat))

    @classmethod
    def from_toml(cls, path: str | Path) -> ExperimentConfig:
        """Load a TOML experiment file.

        Raises
        ------
        FileNotFoundError
            If the file does not exist.
        ValueError
            If it is not valid TOML, or as :meth:`from_dict`.
        """
        return cls.from_dict(load.read_toml(path))

    def with_overrides(self, overrides: Sequence[str]) -> ExperimentConfig:
        """Return a copy with ``section.key=value`` overrides applied.

        Values are parsed with :func:`ast.literal_eval` when possible (so ``3``,
        ``1e-3``, ``True`` and ``'x'`` work) and otherwise taken as plain strings.
        """
        return ExperimentConfig.from_flat(
            load.apply_overrides(self.to_flat(), overrides)
        )

    # ---------------------------------------------------------------- exporters
    def to_dict(self) -> dict[str, Any]:
        """Nested plain-Python form (lists for tuples), e.g. to save as JSON."""
        return typing.cast(dict[str, Any], load.to_plain(self))

    def to_flat(self) -> dict[str, FlatValue]:
        """Flat run_config form: dotted keys, sequences as comma-separated strings."""
        return load.to_flat(self)

    def to_toml(self) -> str:
        """Serialise as TOML (one table per section) that :meth:`from_toml` reads."""
        return load.to_toml(self)
