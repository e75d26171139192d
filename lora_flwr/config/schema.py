"""The experiment schema: one frozen dataclass per section, nested in one tree.

Every field states what it accepts where it is declared: its annotation (a type
or a ``Literal`` alias from :mod:`lora_flwr.config.choices`) and, where needed,
an interval (:func:`~lora_flwr.config.fields.bounded`). Each section's
``__post_init__`` runs :func:`~lora_flwr.config.fields.check_fields` on them,
then the few checks no annotation can state, then the rows of
:data:`~lora_flwr.config.refusals.REFUSALS` local to the section.
"""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_flwr.config import load
from lora_flwr.config.choices import (
    Implementation,
    InitLoraWeights,
    Loss,
    LrSchedule,
    ModelTask,
    OnExisting,
    Optimizer,
    Partitioner,
    Precision,
)
from lora_flwr.config.fed import FedConfig
from lora_flwr.config.fields import (
    ABOVE_0,
    AT_LEAST_0,
    AT_LEAST_1,
    bounded,
    check_fields,
    nonempty,
    pattern,
)
from lora_flwr.config.load import FlatValue
from lora_flwr.config.refusals import check_refusals


@dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters (PEFT's names; the seed's defaults)."""

    # rank of the update: A is (r, in), B is (out, r)
    r: int = bounded(8, AT_LEAST_1, said="a positive integer value")
    # scaling = lora_alpha / r (or / sqrt(r) with rsLoRA)
    lora_alpha: float = bounded(16.0, ABOVE_0)
    lora_dropout: float = bounded(0.1, "[0, 1)")  # dropout on the LoRA branch input
    # Module names (exact or ".name" suffix) or, as a str, a full-match regex.
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    init_lora_weights: InitLoraWeights = "kaiming"  # init of A; B = 0
    use_rslora: bool = False  # rank-stabilised scaling lora_alpha / sqrt(r)
    # Whole modules trained and shared next to the adapter (e.g. a new classifier).
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Check the fields; target_modules must select something."""
        check_fields(self, "lora.")
        targets = self.target_modules
        if isinstance(targets, str) and not (targets and _is_regex(targets)):
            raise ValueError(
                "`lora.target_modules` should be a non-empty, valid regex but the "
                f"value passed is {targets!r}"
            )
        if not targets:
            raise ValueError(
                "`lora.target_modules` should be a non-empty list of module names "
                f"but the value passed is {targets!r}"
            )
        check_refusals(self, "lora")

    @property
    def scaling(self) -> float:
        """Return the factor on ``B @ A``: alpha / r (rsLoRA: alpha / sqrt(r))."""
        if self.use_rslora:
            return float(self.lora_alpha) / math.sqrt(self.r)
        return float(self.lora_alpha) / self.r


def _is_regex(text: str) -> bool:
    try:
        re.compile(text)
    except re.error:
        return False
    return True


@dataclass(frozen=True)
class ModelConfig:
    """Which pretrained model to adapt."""

    # Built-in name (minilm, smollm2-135m, tiny-bert, tiny-llama, tiny-gpt2),
    # a Hugging Face id, or a local directory.
    name: str = nonempty("minilm")
    task: ModelTask = "auto"  # auto: from the model
    num_labels: int = bounded(2, "[2, inf)")  # classes for seq_cls
    max_length: int = bounded(64, "[2, inf)")  # tokens per example after truncation
    # Who builds the model: "native" (plain torch, no transformers import: a fresh
    # process starts seconds sooner) for minilm and smollm2-135m only,
    # "transformers", or "auto" (native where it exists, else transformers).
    implementation: Implementation = "auto"

    def __post_init__(self) -> None:
        """Check the fields and the model section's refusals."""
        check_fields(self, "model.")
        check_refusals(self, "model")


@dataclass(frozen=True)
class DataConfig:
    """Which text, how it is held out and how it is split across clients."""

    # rotten_tomatoes | shakespeare | synthetic | a path to .csv / .jsonl / .txt
    name: str = nonempty("rotten_tomatoes")
    text_column: str = "text"  # local files: column with the text
    label_column: str = "label"  # local files: column with the class (seq_cls)
    group_column: str = ""  # local files: column naming the natural owner
    # global held-out split (centralised evaluation)
    test_fraction: float = bounded(0.2, "(0, 1)")
    # use a seeded subsample of this size (0: all)
    max_examples: int = bounded(0, AT_LEAST_0)
    min_group_size: int = bounded(0, AT_LEAST_0)  # drop natural groups with fewer
    partitioner: Partitioner = "natural"
    # concentration for the Dirichlet label split
    dirichlet_alpha: float = bounded(0.5, ABOVE_0)
    # each client's own validation split
    local_test_fraction: float = bounded(0.1, "[0, 1)")
    # cap the held-out set used per evaluation (0: all)
    eval_max_examples: int = bounded(0, AT_LEAST_0)

    def __post_init__(self) -> None:
        """Check the fields and the data section's refusals."""
        check_fields(self, "data.")
        check_refusals(self, "data")


@dataclass(frozen=True)
class TrainConfig:
    """Local training loop (one client, or the centralised reference)."""

    lr: float = bounded(5e-4, ABOVE_0)  # peak AdamW learning rate
    batch_size: int = bounded(16, AT_LEAST_1)
    eval_batch_size: int = bounded(64, AT_LEAST_1)
    # optimiser steps per fit call (per round)
    local_steps: int = bounded(10, AT_LEAST_0)
    # if > 0: epochs over the local data instead of steps
    local_epochs: float = bounded(0.0, AT_LEAST_0)
    warmup_steps: int = bounded(0, AT_LEAST_0)  # linear warm-up inside one fit call
    # Local optimiser, fresh every fit call: adamw, or sgd (a step proportional to
    # the gradient, as FedLC/FedRS assume) with momentum.
    optimizer: Optimizer = "adamw"
    momentum: float = bounded(0.0, "[0, 1)")  # sgd only
    lr_schedule: LrSchedule = "constant"
    weight_decay: float = bounded(0.0, AT_LEAST_0)
    # gradient clipping (0: off)
    max_grad_norm: float = bounded(1.0, AT_LEAST_0)
    device: str = pattern(  # auto | cpu | cuda | cuda:N | mps
        "auto",
        r"(?s)auto|cpu|cuda|mps|cuda:.*",
        "one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'",
    )
    # Autocast on the device; "auto": bf16 where the hardware runs it natively
    # (CUDA with bf16, CPU with AMX / AVX-512 BF16), else fp32.
    precision: Precision = "fp32"
    # torch intra-op threads per process (0: torch's default)
    num_threads: int = bounded(0, AT_LEAST_0)
    # Local classification loss under label skew (lora_flwr/training/losses.py):
    # ce | fedlc (logit calibration) | fedrs (restricted softmax) | logit_adjust
    # (the client's label prior added to the logits) | balanced (class weights).
    loss: Loss = "ce"
    loss_tau: float = bounded(1.0, AT_LEAST_0)  # fedlc, logit_adjust: strength
    fedrs_alpha: float = bounded(0.5, "[0, 1]")  # fedrs: scale of absent classes
    balanced_beta: float = bounded(0.999, "[0, 1)")  # balanced: effective-number beta
    # Training batches drawn from length-sorted chunks of this many batches: less
    # padding, the same examples per epoch (0: plain shuffled batches).
    bucket_batches: int = bounded(0, AT_LEAST_0, why="0: off")
    # Time every phase of a round (lora_flwr/profiling.py) into the history;
    # off: no timer runs and no device sync is added.
    profile: bool = False

    def __post_init__(self) -> None:
        """Check the fields and the train section's refusals."""
        check_fields(self, "train.")
        check_refusals(self, "train")


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
    fed: FedConfig = field(default_factory=FedConfig)

    def __post_init__(self) -> None:
        """Check the top-level fields and the refusals across sections."""
        check_fields(self, "")
        check_refusals(self, "")

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
