"""The allowed values of every multiple-choice setting, each written once.

A setting annotated with one of these aliases accepts exactly its values: the
schema's field checks read them with :func:`typing.get_args`, and so does every
module that needs the list (the ``*S`` tuples below are derived, not restated).
"""

from __future__ import annotations

import typing
from typing import Literal

# What a model is trained for: sequence classification or next-token prediction.
Task = Literal["seq_cls", "causal_lm"]
# model.task: a Task, or "auto" (read from the model).
ModelTask = Literal["auto", Task]
# model.implementation: who builds the model.
Implementation = Literal["auto", "native", "transformers"]
# lora.init_lora_weights: the init of A (B starts at zero).
InitLoraWeights = Literal["kaiming", "gaussian"]
# data.format: how a data file's rows are read. "text": a text column (and labels);
# "alpaca": instruction / input / output; "chat": messages (role / content) or
# ShareGPT's conversations (from / value); "auto": chat or alpaca when the rows
# have those fields, else text.
DataFormat = Literal["auto", "text", "alpaca", "chat"]
# model.quantization: the frozen base's linear layers in int8 or NF4 (bitsandbytes).
Quantization = Literal["none", "int8", "nf4"]
# The rules that fold part of the update into the base weights (a base delta),
# which a quantized base cannot hold.
BASE_DELTA_RULES: tuple[str, ...] = ("flora", "fedex")
# model.fallback_template: the chat template used when the tokenizer has none.
FallbackTemplate = Literal["none", "chatml"]
# eval.benchmark: what the server scores the final global model on ("none": nothing).
Benchmark = Literal["none", "mmlu"]
# eval.benchmark_split: which of MMLU's splits.
BenchmarkSplit = Literal["test", "validation", "dev"]
# data.partitioner: how the training split is shared across clients.
Partitioner = Literal["iid", "dirichlet", "natural"]
# train.optimizer, train.lr_schedule, compute.precision.
Optimizer = Literal["adamw", "sgd"]
LrSchedule = Literal["constant", "cosine"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
# Local classification losses (lora_flwr.training.losses.LOSSES; a test keeps the
# two equal).
Loss = Literal["ce", "fedlc", "fedrs", "logit_adjust", "balanced"]
# server_opt.name: the optimizer on the server's pseudo-gradient.
ServerOptimizer = Literal["none", "fedavgm", "fedadagrad", "fedadam", "fedyogi"]
# guards.norm_guard: what happens to an update far above the round's median norm.
NormGuard = Literal["clip", "reject", "off"]
# guards.robust: the coordinate-wise average that replaces the weighted mean.
Robust = Literal["none", "median", "trimmed_mean"]
# guards.filter: which whole updates a round leaves out before the rule averages
# ("auto": cosine, or none where the server sees no single update or DP accounts).
UpdateFilter = Literal["auto", "none", "cosine", "krum"]
ActiveFilter = Literal["none", "cosine", "krum"]
# Uplink codecs (lora_flwr.compression.CODECS; a test keeps the two equal).
Compression = Literal["none", "fp16", "bf16", "int8", "topk"]
# How the saved modules (e.g. a new classifier head) are treated
# (lora_flwr.aggregation.base.Rule.use_head; a test keeps the two equal).
HeadMode = Literal["averaged", "frozen", "local", "reinit"]
# How the server refits the head between rounds (head.calibration).
HeadCalibration = Literal["none", "lda"]
# on_existing: what a run does with an output folder that already holds results.
OnExisting = Literal["refuse", "overwrite", "resume"]

COMPRESSIONS: tuple[str, ...] = typing.get_args(Compression)
HEAD_MODES: tuple[str, ...] = typing.get_args(HeadMode)
HEAD_CALIBRATIONS: tuple[str, ...] = typing.get_args(HeadCalibration)
LOSSES: tuple[str, ...] = typing.get_args(Loss)

# The built-ins with a plain-torch implementation (lora_flwr.models.native).
NATIVE_MODEL_NAMES: tuple[str, ...] = ("minilm", "smollm2-135m")

# A target_modules value that starts with this prefix is a full-match regex (PEFT's
# "a string is a regex"); anything else is a comma-separated list of module names.
REGEX_PREFIX = "re:"
