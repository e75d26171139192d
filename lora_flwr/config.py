"""The one experiment schema shared by ``run_simulation.py``, ``flwr run`` and the CLI.

An experiment is a tree of frozen dataclasses. It can be built from

* a TOML file with one table per section (``[lora]``, ``[train]``, ...),
* a flat Flower ``run_config`` whose keys are dotted (``"lora.r"``), which is what
  ``flwr run --run-config`` and ``[tool.flwr.app.config]`` produce,
* ``--set section.key=value`` overrides on the command line.

Unknown keys and ill-typed or out-of-range values raise ``ValueError`` naming the key.
Flower run-config values may only be bool/int/float/str, so sequences are written as
comma-separated strings in the flat form.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

FlatValue = bool | int | float | str

# What a model is trained for: sequence classification or next-token prediction.
Task = Literal["seq_cls", "causal_lm"]

# A target_modules value that starts with this prefix is a full-match regex (PEFT's
# "a string is a regex"); anything else is a comma-separated list of module names.
REGEX_PREFIX = "re:"

# Uplink codecs (lora_flwr.compression.CODECS; a test keeps the two equal).
Compression = Literal["none", "fp16", "bf16", "int8", "topk"]
COMPRESSIONS: tuple[str, ...] = typing.get_args(Compression)
# How the saved modules (e.g. a new classifier head) are treated
# (lora_flwr.aggregation.base.Rule.use_head; a test keeps the two equal).
HeadMode = Literal["averaged", "frozen", "local", "reinit"]
HEAD_MODES: tuple[str, ...] = typing.get_args(HeadMode)
# How the server refits the head between rounds (fed.head_calibration).
HeadCalibration = Literal["none", "lda"]
HEAD_CALIBRATIONS: tuple[str, ...] = typing.get_args(HeadCalibration)
# Local classification losses (lora_flwr.training.losses.LOSSES; a test keeps the
# two equal).
Loss = Literal["ce", "fedlc", "fedrs", "logit_adjust", "balanced"]
LOSSES: tuple[str, ...] = typing.get_args(Loss)


def _check(cond: bool, key: str, value: object, what: str) -> None:
    """Raise a ``ValueError`` naming the field when ``cond`` is false."""
    if not cond:
        raise ValueError(f"`{key}` should be {what} but the value passed is {value!r}")


def _check_finite(section: object, prefix: str) -> None:
    """Refuse NaN and infinite values in every float field of ``section``."""
    for f in dataclasses.fields(section):  # type: ignore[arg-type]
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(
                f"`{prefix}{f.name}` should be a finite number but the value "
                f"passed is {value!r}"
            )


@dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters (PEFT's names; the seed's defaults)."""

    r: int = 8  # rank of the update: A is (r, in), B is (out, r)
    lora_alpha: float = 16.0  # scaling = lora_alpha / r (or / sqrt(r) with rsLoRA)
    lora_dropout: float = 0.1  # dropout on the LoRA branch input
    # Module names (exact or ".name" suffix) or, as a str, a full-match regex.
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    init_lora_weights: Literal["kaiming", "gaussian"] = "kaiming"  # init of A; B = 0
    use_rslora: bool = False  # rank-stabilised scaling lora_alpha / sqrt(r)
    # Whole modules trained and shared next to the adapter (e.g. a new classifier).
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Validate every field."""
        _check_finite(self, "lora.")
        _check(
            isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0,
            "lora.r",
            self.r,
            "a positive integer value",
        )
        _check(
            _is_real(self.lora_alpha) and self.lora_alpha > 0,
            "lora.lora_alpha",
            self.lora_alpha,
            "a positive number",
        )
        _check(
            _is_real(self.lora_dropout) and 0.0 <= self.lora_dropout < 1.0,
            "lora.lora_dropout",
            self.lora_dropout,
            "a number in [0, 1)",
        )
        if isinstance(self.target_modules, str):
            _check(
                bool(self.target_modules) and _is_regex(self.target_modules),
                "lora.target_modules",
                self.target_modules,
                "a non-empty, valid regex",
            )
        else:
            _check(
                len(self.target_modules) > 0
                and all(isinstance(t, str) and t for t in self.target_modules),
                "lora.target_modules",
                self.target_modules,
                "a non-empty list of module names",
            )
        _check(
            self.init_lora_weights in ("kaiming", "gaussian"),
            "lora.init_lora_weights",
            self.init_lora_weights,
            "one of 'kaiming', 'gaussian'",
        )
        _check(
            isinstance(self.use_rslora, bool),
            "lora.use_rslora",
            self.use_rslora,
            "true or false",
        )
        _check(
            not isinstance(self.modules_to_save, str)
            and all(isinstance(t, str) and t for t in self.modules_to_save),
            "lora.modules_to_save",
            self.modules_to_save,
            "a list of module names",
        )

    @property
    def scaling(self) -> float:
        """Return the factor on ``B @ A``: alpha / r (rsLoRA: alpha / sqrt(r))."""
        if self.use_rslora:
            return float(self.lora_alpha) / math.sqrt(self.r)
        return float(self.lora_alpha) / self.r


# The built-ins with a plain-torch implementation (lora_flwr.models.native).
NATIVE_MODEL_NAMES: tuple[str, ...] = ("minilm", "smollm2-135m")


@dataclass(frozen=True)
class ModelConfig:
    """Which pretrained model to adapt."""

    # Built-in name (minilm, smollm2-135m, tiny-bert, tiny-llama, tiny-gpt2),
    # a Hugging Face id, or a local directory.
    name: str = "minilm"
    task: Literal["auto", "seq_cls", "causal_lm"] = "auto"  # auto: from the model
    num_labels: int = 2  # classes for seq_cls
    max_length: int = 64  # tokens per example after truncation
    # Who builds the model: "native" (plain torch, no transformers import: a fresh
    # process starts seconds sooner) for minilm and smollm2-135m only,
    # "transformers", or "auto" (native where it exists, else transformers).
    implementation: Literal["auto", "native", "transformers"] = "auto"

    def __post_init__(self) -> None:
        """Validate every field."""
        _check_finite(self, "model.")
        _check(bool(self.name), "model.name", self.name, "a non-empty string")
        _check(
            self.task in ("auto", "seq_cls", "causal_lm"),
            "model.task",
            self.task,
            "one of 'auto', 'seq_cls', 'causal_lm'",
        )
        _check(self.num_labels >= 2, "model.num_labels", self.num_labels, ">= 2")
        _check(self.max_length >= 2, "model.max_length", self.max_length, ">= 2")
        _check(
            self.implementation in ("auto", "native", "transformers"),
            "model.implementation",
            self.implementation,
            "one of 'auto', 'native', 'transformers'",
        )
        _check(
            self.implementation != "native" or self.name in NATIVE_MODEL_NAMES,
            "model.implementation",
            f"native (with model.name = {self.name!r})",
            f"'auto' or 'transformers' for a model other than "
            f"{' or '.join(NATIVE_MODEL_NAMES)}",
        )


@dataclass(frozen=True)
class DataConfig:
    """Which text, how it is held out and how it is split across clients."""

    # rotten_tomatoes | shakespeare | synthetic | a path to .csv / .jsonl / .txt
    name: str = "rotten_tomatoes"
    text_column: str = "text"  # local files: column with the text
    label_column: str = "label"  # local files: column with the class (seq_cls)
    group_column: str = ""  # local files: column naming the natural owner
    test_fraction: float = 0.2  # global held-out split (centralised evaluation)
    max_examples: int = 0  # use a seeded subsample of this size (0: all)
    min_group_size: int = 0  # drop natural groups with fewer examples
    partitioner: Literal["iid", "dirichlet", "natural"] = "natural"
    dirichlet_alpha: float = 0.5  # concentration for the Dirichlet label split
    local_test_fraction: float = 0.1  # each client's own validation split
    eval_max_examples: int = 0  # cap the held-out set used per evaluation (0: all)

    def __post_init__(self) -> None:
        """Validate every field."""
        _check_finite(self, "data.")
        _check(bool(self.name), "data.name", self.name, "a non-empty string")
        _check(
            0.0 < self.test_fraction < 1.0,
            "data.test_fraction",
            self.test_fraction,
            "in (0, 1)",
        )
        _check(
            0.0 <= self.local_test_fraction < 1.0,
            "data.local_test_fraction",
            self.local_test_fraction,
            "in [0, 1)",
        )
        _check(self.max_examples >= 0, "data.max_examples", self.max_examples, ">= 0")
        _check(
            self.min_group_size >= 0,
            "data.min_group_size",
            self.min_group_size,
            ">= 0",
        )
        _check(
            self.partitioner in ("iid", "dirichlet", "natural"),
            "data.partitioner",
            self.partitioner,
            "one of 'iid', 'dirichlet', 'natural'",
        )
        _check(
            self.dirichlet_alpha > 0,
            "data.dirichlet_alpha",
            self.dirichlet_alpha,
            "> 0",
        )
        _check(
            self.eval_max_examples >= 0,
            "data.eval_max_examples",
            self.eval_max_examples,
            ">= 0",
        )


@dataclass(frozen=True)
class TrainConfig:
    """Local training loop (one client, or the centralised reference)."""

    lr: float = 5e-4  # peak AdamW learning rate
    batch_size: int = 16
    eval_batch_size: int = 64
    local_steps: int = 10  # optimiser steps per fit call (per round)
    local_epochs: float = 0.0  # if > 0: epochs over the local data instead of steps
    warmup_steps: int = 0  # linear warm-up inside one fit call
    # Local optimiser, fresh every fit call: adamw, or sgd (a step proportional to
    # the gradient, as FedLC/FedRS assume) with momentum.
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = 0.0  # sgd only
    lr_schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient clipping (0: off)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # Autocast on the device; "auto": bf16 where the hardware runs it natively
    # (CUDA with bf16, CPU with AMX / AVX-512 BF16), else fp32.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    num_threads: int = 0  # torch intra-op threads per process (0: torch's default)
    # Local classification loss under label skew (lora_flwr/training/losses.py):
    # ce | fedlc (logit calibration) | fedrs (restricted softmax) | logit_adjust
    # (the client's label prior added to the logits) | balanced (class weights).
    loss: Loss = "ce"
    loss_tau: float = 1.0  # fedlc, logit_adjust: calibration strength
    fedrs_alpha: float = 0.5  # fedrs: scale of absent classes' logits
    balanced_beta: float = 0.999  # balanced: effective-number beta
    # Training batches drawn from length-sorted chunks of this many batches: less
    # padding, the same examples per epoch (0: plain shuffled batches).
    bucket_batches: int = 0
    # Time every phase of a round (lora_flwr/profiling.py) into the history;
    # off: no timer runs and no device sync is added.
    profile: bool = False

    def __post_init__(self) -> None:
        """Validate every field."""
        _check_finite(self, "train.")
        _check(self.lr > 0, "train.lr", self.lr, "> 0")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, ">= 1")
        _check(
            self.eval_batch_size >= 1,
            "train.eval_batch_size",
            self.eval_batch_size,
            ">= 1",
        )
        _check(self.local_steps >= 0, "train.local_steps", self.local_steps, ">= 0")
        _check(self.local_epochs >= 0, "train.local_epochs", self.local_epochs, ">= 0")
        _check(
            self.local_steps > 0 or self.local_epochs > 0,
            "train.local_steps",
            self.local_steps,
            "> 0 (or set train.local_epochs > 0)",
        )
        _check(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, ">= 0")
        _check(
            self.optimizer in ("adamw", "sgd"),
            "train.optimizer",
            self.optimizer,
            "one of 'adamw', 'sgd'",
        )
        _check(
            0 <= self.momentum < 1 and (self.momentum == 0 or self.optimizer == "sgd"),
            "train.momentum",
            self.momentum,
            "in [0, 1), and 0 unless train.optimizer = 'sgd'",
        )
        _check(
            self.lr_schedule in ("constant", "cosine"),
            "train.lr_schedule",
            self.lr_schedule,
            "one of 'constant', 'cosine'",
        )
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, ">= 0")
        _check(
            self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm, ">= 0"
        )
        _check(
            self.device == "auto"
            or self.device in ("cpu", "cuda", "mps")
            or self.device.startswith("cuda:"),
            "train.device",
            self.device,
            "one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'",
        )
        _check(
            self.precision in ("auto", "fp32", "bf16", "fp16"),
            "train.precision",
            self.precision,
            "one of 'auto', 'fp32', 'bf16', 'fp16'",
        )
        _check(self.num_threads >= 0, "train.num_threads", self.num_threads, ">= 0")
        _check(
            self.loss in LOSSES,
            "train.loss",
            self.loss,
            f"one of {', '.join(repr(n) for n in LOSSES)}",
        )
        _check(self.loss_tau >= 0, "train.loss_tau", self.loss_tau, ">= 0")
        _check(
            0 <= self.fedrs_alpha <= 1,
            "train.fedrs_alpha",
            self.fedrs_alpha,
            "in [0, 1]",
        )
        _check(
            0 <= self.balanced_beta < 1,
            "train.balanced_beta",
            self.balanced_beta,
            "in [0, 1)",
        )
        _check(
            self.bucket_batches >= 0,
            "train.bucket_batches",
            self.bucket_batches,
            ">= 0 (0: off)",
        )
        _check(
            isinstance(self.profile, bool),
            "train.profile",
            self.profile,
            "true or false",
        )


@dataclass(frozen=True)
class FedConfig:
    """Federated rounds, sampling, aggregation and evaluation."""

    num_rounds: int = 5
    num_clients: int = 10  # partitions = simulated SuperNodes
    fraction_fit: float = 1.0  # share of available clients trained per round
    # Share evaluated per round (0: no federated eval; a personalised rule such as
    # fedsa then evaluates every client at each evaluation round).
    fraction_evaluate: float = 0.0
    min_fit_clients: int = 2  # wait for (and require) at least this many replies
    min_evaluate_clients: int = 2
    min_available_clients: int = 2
    # Rule name in lora_flwr.aggregation: fedit, ffa, fedsa, rolora, flora, fedex,
    # hetlora, flexlora, fedsvd.
    aggregation: str = "fedit"
    # Client ranks, assigned to partitions deterministically from the seed (e.g.
    # "4,8,16"); empty: every client at lora.r. lora.r must be the largest tier.
    rank_tiers: tuple[int, ...] = ()
    # Server optimizer on the pseudo-gradient of what the rule averaged (Reddi et
    # al., ICLR 2021): none, fedavgm, fedadagrad, fedadam, fedyogi.
    server_optimizer: Literal["none", "fedavgm", "fedadagrad", "fedadam", "fedyogi"] = (
        "none"
    )
    server_lr: float = 1.0  # server learning rate eta
    server_beta1: float = 0.9  # momentum (FedAvgM's beta, FedAdam/FedYogi's beta_1)
    server_beta2: float = 0.99  # second-moment decay (FedAdam, FedYogi)
    server_tau: float = 1e-3  # adaptivity tau (FedAdagrad, FedAdam, FedYogi)
    prox_mu: float = 0.0  # FedProx proximal term mu on the client (0: off)
    lr_decay: float = 1.0  # client lr in round t = train.lr * lr_decay ** (t - 1)
    eval_every: int = 1  # centralised evaluation every N rounds (0: only at the end)
    # The server's centralised evaluation of round t runs in a background thread
    # while round t + 1's messages travel and its clients train; round t's history
    # row and checkpoint are written when it is done. Same numbers either way. Pays
    # off when the ServerApp has cores of its own (a deployment's server machine);
    # where it shares them with the clients (the simulation, a one-machine
    # deployment) the two compete (docs/BENCHMARKS.md).
    eval_overlap: bool = False
    max_update_norm: float = (
        0.0  # reject replies whose update norm exceeds this (0: off)
    )
    # A round aggregates when at least this many replies pass validation; fewer
    # keep the global adapter unchanged for that round.
    min_fit_replies: int = 1
    # The run stops (non-zero exit) after this many consecutive rounds without an
    # aggregate (every client failed or was dropped).
    max_failed_rounds: int = 2
    # Robustness against a hostile client (on by default). A reply's example count
    # is capped at weight_cap x the round's lower-median count (0: off) ...
    weight_cap: float = 1.5
    # ... and an update (reply - what it started from) whose norm exceeds
    # norm_guard_factor x the round's lower-median update norm is clipped to that
    # bound ("clip") or dropped ("reject"); "off" disables the guard.
    norm_guard: Literal["clip", "reject", "off"] = "clip"
    norm_guard_factor: float = 2.0
    # Optional robust aggregation of what the rule averages (unweighted,
    # coordinate-wise): none, median, trimmed_mean (drops trim_fraction of the
    # replies at each end per coordinate). Only for plain-average rules.
    robust: Literal["none", "median", "trimmed_mean"] = "none"
    trim_fraction: float = 0.2
    # Client-level differential privacy (DP-FedAvg, McMahan et al., ICLR 2018):
    # each update is clipped to dp_clip_norm, clients weigh equally, and Gaussian
    # noise of std dp_noise_multiplier * dp_clip_norm / m is added to the mean of
    # the m updates. 0: off. Epsilon at dp_delta is reported every round.
    dp_noise_multiplier: float = 0.0
    dp_clip_norm: float = 1.0
    dp_delta: float = 1e-5
    # Uplink compression of each reply's update (reply - what the client started
    # from), decoded on the server before validation (lora_flwr/compression.py):
    # none (float32), fp16, bf16, int8 (a scale per row/column), or topk (the
    # topk_fraction largest entries, with error feedback on the client). The
    # downlink stays float32.
    compression: Compression = "none"
    topk_fraction: float = 0.1
    # The saved modules (lora.modules_to_save, e.g. the new classifier head):
    # averaged (trained, sent and averaged like the factors), frozen (trained and
    # averaged for head_warmup_rounds rounds, then fixed), local (trained and kept
    # on each client, never sent; federated evaluation uses each client's own),
    # reinit (every round each client trains it from the seeded init; the server
    # averages those).
    head: HeadMode = "averaged"
    head_warmup_rounds: int = 0
    # Server-side head refit (lora_flwr/aggregation/lda.py): none, or lda: after
    # every round (and before the first) every client sends the class counts,
    # per-class sums and second moments of the head's inputs on its training
    # split; the server sets the head to the linear discriminant of their exact
    # sums (shared covariance shrunk by lda_shrinkage * tr/d * I, the pooled label
    # prior). Classification only; the head must be received (averaged or
    # frozen), and SecAgg / DP do not cover the statistics.
    head_calibration: HeadCalibration = "none"
    lda_shrinkage: float = 1e-3
    # Examples per client the statistics are computed on (0: all, exact). Above
    # 0, a stratified sample of about that many, scaled back to the exact class
    # counts: unbiased, and the forward pass costs at most that many examples.
    lda_max_examples: int = 0
    # Refit before round 1, after every lda_every-th round and after the last:
    # each refit costs a forward pass over every client's training split.
    lda_every: int = 1
    # Secure aggregation (Flower's SecAgg+ workflow, Bell et al., CCS 2020): the
    # server learns only the weighted sum of what clients send. Each client
    # multiplies its reply by num_examples / secagg_max_weight, and every value of
    # that must lie within +-secagg_clip (the client refuses to send otherwise:
    # SecAgg+ would clip it silently); values are quantised to 2**22 levels over
    # that range. Each client shares its keys with secagg_shares x the sampled
    # clients; secagg_threshold x those shares rebuild a dropped client's mask.
    # Only for plain weighted-sum rules at one rank; the server sees no single
    # update, so its guards (norm_guard, weight_cap, robust, DP) must be off.
    secagg: bool = False
    secagg_clip: float = 2.0
    secagg_max_weight: float = 1000.0
    secagg_shares: float = 1.0
    secagg_threshold: float = 0.67
    # Deployment under SuperNode authentication: which registered key owns which
    # partition, "SHA256:<fingerprint>=<partition>,..." (ssh-keygen -lf). A node
    # then gets the partition its key owns, never one it merely claims. "": off.
    partition_owners: str = ""
    client_num_cpus: float = 1.0  # Ray resources per simulated client
    client_num_gpus: float = 0.0

    def __post_init__(self) -> None:
        """Validate every field."""
        _check_finite(self, "fed.")
        _check(self.num_rounds >= 1, "fed.num_rounds", self.num_rounds, ">= 1")
        _check(self.num_clients >= 1, "fed.num_clients", self.num_clients, ">= 1")
        for name in ("fraction_fit", "fraction_evaluate"):
            value = getattr(self, name)
            _check(0.0 <= value <= 1.0, f"fed.{name}", value, "in [0, 1]")
        _check(self.fraction_fit > 0, "fed.fraction_fit", self.fraction_fit, "> 0")
        for name in (
            "min_fit_clients",
            "min_evaluate_clients",
            "min_available_clients",
        ):
            value = getattr(self, name)
            _check(
                1 <= value <= self.num_clients,
                f"fed.{name}",
                value,
                f"in [1, fed.num_clients={self.num_clients}]",
            )
        _check(bool(self.aggregation), "fed.aggregation", self.aggregation, "a name")
        _check(
            all(isinstance(t, int) and t >= 1 for t in self.rank_tiers),
            "fed.rank_tiers",
            ",".join(map(str, self.rank_tiers)),
            "positive integer ranks, e.g. '4,8,16'",
        )
        _check(
            self.server_optimizer
            in ("none", "fedavgm", "fedadagrad", "fedadam", "fedyogi"),
            "fed.server_optimizer",
            self.server_optimizer,
            "one of 'none', 'fedavgm', 'fedadagrad', 'fedadam', 'fedyogi'",
        )
        _check(
            _finite(self.server_lr) and self.server_lr > 0,
            "fed.server_lr",
            self.server_lr,
            "> 0",
        )
        for name in ("server_beta1", "server_beta2"):
            value = getattr(self, name)
            _check(_finite(value) and 0 <= value < 1, f"fed.{name}", value, "in [0, 1)")
        _check(
            _finite(self.server_tau) and self.server_tau > 0,
            "fed.server_tau",
            self.server_tau,
            "> 0",
        )
        _check(
            _finite(self.prox_mu) and self.prox_mu >= 0,
            "fed.prox_mu",
            self.prox_mu,
            ">= 0",
        )
        _check(0 < self.lr_decay <= 1.0, "fed.lr_decay", self.lr_decay, "in (0, 1]")
        _check(self.eval_every >= 0, "fed.eval_every", self.eval_every, ">= 0")
        _check(
            self.max_update_norm >= 0,
            "fed.max_update_norm",
            self.max_update_norm,
            ">= 0",
        )
        _check(
            1 <= self.min_fit_replies <= self.num_clients,
            "fed.min_fit_replies",
            self.min_fit_replies,
            f"in [1, fed.num_clients={self.num_clients}]",
        )
        _check(
            self.max_failed_rounds >= 0,
            "fed.max_failed_rounds",
            self.max_failed_rounds,
            ">= 0",
        )
        _check(self.weight_cap >= 0, "fed.weight_cap", self.weight_cap, ">= 0")
        _check(
            self.weight_cap == 0 or self.weight_cap >= 1,
            "fed.weight_cap",
            self.weight_cap,
            "0 (off) or >= 1 (a multiple of the median example count)",
        )
        _check(
            self.norm_guard in ("clip", "reject", "off"),
            "fed.norm_guard",
            self.norm_guard,
            "one of 'clip', 'reject', 'off'",
        )
        _check(
            self.norm_guard_factor >= 1,
            "fed.norm_guard_factor",
            self.norm_guard_factor,
            ">= 1 (a multiple of the median update norm)",
        )
        _check(
            self.robust in ("none", "median", "trimmed_mean"),
            "fed.robust",
            self.robust,
            "one of 'none', 'median', 'trimmed_mean'",
        )
        _check(
            0 <= self.trim_fraction < 0.5,
            "fed.trim_fraction",
            self.trim_fraction,
            "in [0, 0.5)",
        )
        _check(
            self.dp_noise_multiplier >= 0,
            "fed.dp_noise_multiplier",
            self.dp_noise_multiplier,
            ">= 0 (0: no differential privacy)",
        )
        _check(self.dp_clip_norm > 0, "fed.dp_clip_norm", self.dp_clip_norm, "> 0")
        _check(0 < self.dp_delta < 1, "fed.dp_delta", self.dp_delta, "in (0, 1)")
        _check(
            self.dp_noise_multiplier == 0 or self.robust == "none",
            "fed.robust",
            self.robust,
            "'none' with differential privacy (its noise is calibrated to a mean)",
        )
        _check(
            self.compression in COMPRESSIONS,
            "fed.compression",
            self.compression,
            f"one of {', '.join(repr(c) for c in COMPRESSIONS)}",
        )
        _check(
            self.head in HEAD_MODES,
            "fed.head",
            self.head,
            f"one of {', '.join(repr(h) for h in HEAD_MODES)}",
        )
        _check(
            isinstance(self.head_warmup_rounds, int) and self.head_warmup_rounds >= 0,
            "fed.head_warmup_rounds",
            self.head_warmup_rounds,
            ">= 0 (rounds the head trains before it is frozen)",
        )
        _check(
            self.head_calibration in HEAD_CALIBRATIONS,
            "fed.head_calibration",
            self.head_calibration,
            f"one of {', '.join(repr(h) for h in HEAD_CALIBRATIONS)}",
        )
        _check(
            _finite(self.lda_shrinkage) and self.lda_shrinkage >= 0,
            "fed.lda_shrinkage",
            self.lda_shrinkage,
            "a finite number >= 0",
        )
        _check(
            isinstance(self.lda_every, int) and self.lda_every >= 1,
            "fed.lda_every",
            self.lda_every,
            ">= 1 (refit the head after every lda_every-th round)",
        )
        _check(
            isinstance(self.lda_max_examples, int) and self.lda_max_examples >= 0,
            "fed.lda_max_examples",
            self.lda_max_examples,
            ">= 0 (0: every training example)",
        )
        _check(
            self.head_calibration == "none" or self.head in ("averaged", "frozen"),
            "fed.head",
            self.head,
            "'averaged' or 'frozen' with fed.head_calibration = 'lda' (the server's "
            "head must reach the clients)",
        )
        _check(
            self.head_calibration == "none"
            or (not self.secagg and self.dp_noise_multiplier == 0),
            "fed.head_calibration",
            self.head_calibration,
            "'none' with fed.secagg or differential privacy (they do not cover the "
            "class statistics the clients would send)",
        )
        _check(
            self.head_calibration == "none" or self.robust == "none",
            "fed.head_calibration",
            self.head_calibration,
            "'none' with fed.robust (a median or trimmed mean of class statistics "
            "is not implemented; the statistics are checked for consistency only)",
        )
        _check(
            self.head_warmup_rounds == 0 or self.head == "frozen",
            "fed.head_warmup_rounds",
            self.head_warmup_rounds,
            "0 unless fed.head = 'frozen'",
        )
        _check(
            0 < self.topk_fraction <= 1,
            "fed.topk_fraction",
            self.topk_fraction,
            "in (0, 1]",
        )
        _check(self.secagg_clip > 0, "fed.secagg_clip", self.secagg_clip, "> 0")
        _check(
            self.secagg_max_weight >= 1,
            "fed.secagg_max_weight",
            self.secagg_max_weight,
            ">= 1 (the largest example count a client may have)",
        )
        for name in ("secagg_shares", "secagg_threshold"):
            value = getattr(self, name)
            _check(0 < value <= 1, f"fed.{name}", value, "in (0, 1]")
        if self.secagg:
            self._check_secagg()
        if self.partition_owners.strip():
            from lora_flwr.fl.owners import parse_owners

            parse_owners(self.partition_owners, self.num_clients)
        _check(
            self.client_num_cpus > 0,
            "fed.client_num_cpus",
            self.client_num_cpus,
            "> 0",
        )
        _check(
            self.client_num_gpus >= 0,
            "fed.client_num_gpus",
            self.client_num_gpus,
            ">= 0",
        )

    def _check_secagg(self) -> None:
        """Refuse what cannot run when the server sees only the masked sum."""
        _check(
            self.min_fit_clients >= 2,
            "fed.min_fit_clients",
            self.min_fit_clients,
            ">= 2 with fed.secagg = true (a sum of one update reveals it)",
        )
        hidden = "with fed.secagg = true: the server sees no single update"
        _check(
            self.norm_guard == "off",
            "fed.norm_guard",
            self.norm_guard,
            f"'off' {hidden}",
        )
        _check(
            self.weight_cap == 0,
            "fed.weight_cap",
            self.weight_cap,
            f"0 {hidden}",
        )
        _check(
            self.max_update_norm == 0,
            "fed.max_update_norm",
            self.max_update_norm,
            f"0 {hidden}",
        )
        _check(self.robust == "none", "fed.robust", self.robust, f"'none' {hidden}")
        _check(
            self.compression == "none",
            "fed.compression",
            self.compression,
            "'none' with fed.secagg = true (SecAgg+ sums equally shaped float "
            "vectors and quantises them itself; a per-client encoding cannot be "
            "decoded inside that sum)",
        )
        _check(
            self.dp_noise_multiplier == 0,
            "fed.dp_noise_multiplier",
            self.dp_noise_multiplier,
            f"0 {hidden} (DP clips each update)",
        )


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: everything a run needs, saved next to its results."""

    name: str = "default"  # run name; results go to <output_dir>/<name>
    seed: int = 0  # seeds init, data split, sampling and training
    output_dir: str = "results"
    # What to do when <output_dir>/<name> already holds results: refuse (the
    # default), overwrite (clear it first) or resume (continue that run).
    on_existing: Literal["refuse", "overwrite", "resume"] = "refuse"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FedConfig = field(default_factory=FedConfig)

    def __post_init__(self) -> None:
        """Validate the top-level fields."""
        # The name is one folder inside output_dir: it must not climb out of it.
        _check(
            re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", self.name) is not None
            and ".." not in self.name,
            "name",
            self.name,
            "one folder name (letters, digits, '.', '_', '-'; no '/' or '..')",
        )
        _check(self.seed >= 0, "seed", self.seed, ">= 0")
        _check(
            self.on_existing in ("refuse", "overwrite", "resume"),
            "on_existing",
            self.on_existing,
            "one of 'refuse', 'overwrite', 'resume'",
        )
        tiers = self.fed.rank_tiers
        _check(
            not tiers or max(tiers) == self.lora.r,
            "fed.rank_tiers",
            ",".join(map(str, tiers)),
            f"ranks whose largest equals lora.r={self.lora.r} (the allocated rank)",
        )
        _check(
            self.fed.head_calibration == "none" or bool(self.lora.modules_to_save),
            "fed.head_calibration",
            self.fed.head_calibration,
            "'none' when lora.modules_to_save is empty (there is no head to refit; "
            "set lora.modules_to_save, e.g. 'classifier')",
        )
        _check(
            self.fed.head == "averaged" or bool(self.lora.modules_to_save),
            "fed.head",
            self.fed.head,
            "'averaged' when lora.modules_to_save is empty (there is no head to "
            "treat; set lora.modules_to_save, e.g. 'classifier')",
        )

    # ----------------------------------------------------------------- builders
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExperimentConfig:
        """Build from a nested mapping (a parsed TOML file).

        Raises
        ------
        ValueError
            On an unknown key or a value of the wrong type or range.
        """
        return typing.cast(ExperimentConfig, _build(cls, data, prefix=""))

    @classmethod
    def from_flat(cls, flat: Mapping[str, FlatValue]) -> ExperimentConfig:
        """Build from a flat Flower run_config with dotted keys (``"lora.r"``)."""
        return cls.from_dict(unflatten(flat))

    @classmethod
    def from_toml(cls, path: str | Path) -> ExperimentConfig:
        """Load a TOML experiment file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Config file not found: {path}. Pass an existing TOML file, e.g. "
                "configs/default.toml."
            )
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"Config file {path} is not valid TOML: {exc}") from exc
        return cls.from_dict(data)

    def with_overrides(self, overrides: Sequence[str]) -> ExperimentConfig:
        """Return a copy with ``section.key=value`` overrides applied.

        Values are parsed with :func:`ast.literal_eval` when possible (so ``3``,
        ``1e-3``, ``True`` and ``'x'`` work) and otherwise taken as plain strings.
        """
        flat = self.to_flat()
        for item in overrides:
            if "=" not in item:
                raise ValueError(
                    f"Override {item!r} should look like section.key=value"
                )
            key, raw = item.split("=", 1)
            key = key.strip()
            if key not in flat:
                raise ValueError(f"Unknown config key: {key}")
            flat[key] = parse_value(raw.strip())
        return ExperimentConfig.from_flat(flat)

    # ---------------------------------------------------------------- exporters
    def to_dict(self) -> dict[str, Any]:
        """Nested plain-Python form (lists for tuples), e.g. to save as JSON."""
        return typing.cast(dict[str, Any], _to_plain(self))

    def to_flat(self) -> dict[str, FlatValue]:
        """Flat run_config form: dotted keys, sequences as comma-separated strings."""
        out: dict[str, FlatValue] = {}
        _flatten(self, "", out)
        return out

    def to_toml(self) -> str:
        """Serialise as TOML (one table per section) that :meth:`from_toml` reads."""
        lines: list[str] = []
        sections: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                sections.append(f.name)
            else:
                lines.append(f"{f.name} = {_toml_value(value)}")
        for name in sections:
            lines.append(f"\n[{name}]")
            section = getattr(self, name)
            for f in dataclasses.fields(section):
                value = _to_plain(getattr(section, f.name), f.name)
                lines.append(f"{f.name} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------- helpers
def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value: object) -> bool:
    return _is_real(value) and math.isfinite(value)  # type: ignore[arg-type]


def parse_value(raw: str) -> FlatValue:
    """Parse a command-line value: a Python literal if it is one, else the string."""
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return raw


def unflatten(flat: Mapping[str, FlatValue]) -> dict[str, Any]:
    """Turn ``{"lora.r": 8}`` into ``{"lora": {"r": 8}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"Config key {key!r} clashes with a value at {part!r}")
            node = child
        node[parts[-1]] = value
    return out


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def _to_plain(obj: object, name: str = "") -> object:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: _to_plain(getattr(obj, f.name), f.name)
            for f in dataclasses.fields(obj)
        }
    if isinstance(obj, tuple):
        return list(obj)
    if name == "target_modules" and isinstance(obj, str):
        # A regex keeps its prefix so that from_dict / from_toml read it back as one.
        return REGEX_PREFIX + obj
    return obj


def _is_regex(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def _flatten(obj: object, prefix: str, out: dict[str, FlatValue]) -> None:
    assert dataclasses.is_dataclass(obj)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _flatten(value, key + ".", out)
        elif isinstance(value, tuple):
            out[key] = ",".join(str(v) for v in value)
        elif f.name == "target_modules" and isinstance(value, str):
            out[key] = REGEX_PREFIX + value
        else:
            out[key] = value


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> object:
    if not isinstance(data, Mapping):
        raise ValueError(
            f"Config section `{prefix.rstrip('.') or '<root>'}` should be a table "
            f"but the value passed is {data!r}"
        )
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ValueError(f"Unknown config key: {full}")
        hint = hints[key]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, prefix=full + ".")
        else:
            kwargs[key] = _coerce(full, hint, value)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - dataclass signature mismatch
        raise ValueError(f"Bad config section `{prefix or '<root>'}`: {exc}") from exc


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Check ``value`` against the annotation ``hint`` and convert where lossless."""
    origin = typing.get_origin(hint)
    if key.endswith("target_modules"):
        return _coerce_target_modules(key, value)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ValueError(
                f"`{key}` should be one of {list(allowed)} but the value passed is "
                f"{value!r}"
            )
        return value
    if origin is tuple and typing.get_args(hint)[0] is int:
        return _coerce_int_tuple(key, value)
    if origin is tuple:
        return _coerce_str_tuple(key, value)
    if origin in (types.UnionType, typing.Union):  # pragma: no cover - none left
        raise ValueError(f"`{key}` has an unsupported type")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(
            f"`{key}` should be true or false but the value passed is {value!r}"
        )
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(
            f"`{key}` should be an integer but the value passed is {value!r}"
        )
    if hint is float:
        if _is_real(value):
            return float(value)
        raise ValueError(
            f"`{key}` should be a number but the value passed is {value!r}"
        )
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(
            f"`{key}` should be a string but the value passed is {value!r}"
        )
    raise ValueError(f"`{key}` has an unsupported type {hint!r}")  # pragma: no cover


def _coerce_str_tuple(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(
        f"`{key}` should be a list of strings or a comma-separated string but the "
        f"value passed is {value!r}"
    )


def _coerce_int_tuple(key: str, value: Any) -> tuple[int, ...]:
    items: list[Any]
    if isinstance(value, str):
        items = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, list | tuple):
        items = list(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    else:
        items = [None]
    out: list[int] = []
    for item in items:
        if isinstance(item, str) and item.lstrip("-").isdigit():
            item = int(item)
        if not isinstance(item, int) or isinstance(item, bool):
            raise ValueError(
                f"`{key}` should be a list of integers or a comma-separated string "
                f"such as '4,8,16' but the value passed is {value!r}"
            )
        out.append(item)
    return tuple(out)


def _coerce_target_modules(key: str, value: Any) -> tuple[str, ...] | str:
    if isinstance(value, str) and value.startswith(REGEX_PREFIX):
        return value[len(REGEX_PREFIX) :]
    return _coerce_str_tuple(key, value)


# ------------------------------------------------------------------------ CLI
def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` and repeatable ``--set key=value`` to a CLI parser."""
    parser.add_argument("--config", default="configs/default.toml", help="TOML file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set fed.num_rounds=3",
    )


def config_from_arguments(args: argparse.Namespace) -> ExperimentConfig:
    """Load ``args.config`` and apply ``args.overrides`` (see add_config_arguments)."""
    cfg = ExperimentConfig.from_toml(args.config)
    return cfg.with_overrides(args.overrides)
