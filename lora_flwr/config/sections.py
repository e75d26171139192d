"""The sections a client trains by: model, LoRA, data, training, loss, compute, eval.

Each section checks its own fields (and the refusals that read only it) when it
is built; :mod:`lora_flwr.config.fed` holds the federation's sections.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lora_flwr.config.choices import (
    Benchmark,
    BenchmarkSplit,
    DataFormat,
    FallbackTemplate,
    Implementation,
    InitLoraWeights,
    Loss,
    LrSchedule,
    ModelTask,
    Optimizer,
    Partitioner,
    Precision,
    Quantization,
)
from lora_flwr.config.fields import (
    ABOVE_0,
    AT_LEAST_0,
    AT_LEAST_1,
    bounded,
    check_section,
    nonempty,
    pattern,
)


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
        check_section(self, "lora")
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
    # Instruction data is rendered with the tokenizer's own chat template; one
    # without a template is refused ("none") unless this names a fallback
    # ("chatml": <|im_start|>role\ncontent<|im_end|>, SmolLM2-Instruct's format).
    fallback_template: FallbackTemplate = "none"
    # The frozen base's linear layers in 8 bits ("int8", LLM.int8()) or 4 bits
    # ("nf4", QLoRA) through bitsandbytes, on the CPU or a CUDA GPU; LoRA factors,
    # head and embeddings stay float32. Smaller weights, slower steps on a CPU
    # (docs/BENCHMARKS.md).
    quantization: Quantization = "none"

    def __post_init__(self) -> None:
        """Check the fields and the model section's refusals."""
        check_section(self, "model")


@dataclass(frozen=True)
class DataConfig:
    """Which text, how it is held out and how it is split across clients."""

    # rotten_tomatoes | shakespeare | synthetic | a path to .csv / .jsonl / .txt /
    # .json / .parquet / .arrow or a datasets save_to_disk folder | a Hub data set id
    name: str = nonempty("rotten_tomatoes")
    # auto | text | alpaca (instruction, input, output) | chat (messages or
    # ShareGPT conversations): instruction data trains on the responses only
    format: DataFormat = "auto"
    text_column: str = "text"  # local files: column with the text
    label_column: str = "label"  # local files: column with the class (seq_cls)
    # local files: column naming the natural owner, or the category of instruction
    # data (natural: whole categories per client; dirichlet: skew over them)
    group_column: str = ""
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

    def __post_init__(self) -> None:
        """Check the fields and the data section's refusals."""
        check_section(self, "data")


@dataclass(frozen=True)
class TrainConfig:
    """Local training loop (one client, or the centralised reference)."""

    # Peak learning rate. Above 10 no optimiser trains a LoRA adapter: AdamW moves
    # every weight by about lr per step (its usual rates are 1e-5..1e-2), and SGD
    # on these models diverges well below that. Unusual values below the bound are
    # warned about (lora_flwr/config/unusual.py).
    lr: float = bounded(5e-4, "(0, 10]", why="a rate above 10 diverges")
    batch_size: int = bounded(16, AT_LEAST_1)
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
    # Training batches drawn from length-sorted chunks of this many batches: less
    # padding, the same examples per epoch (0: plain shuffled batches).
    bucket_batches: int = bounded(0, AT_LEAST_0, why="0: off")

    def __post_init__(self) -> None:
        """Check the fields and the train section's refusals."""
        check_section(self, "train")


@dataclass(frozen=True)
class LossConfig:
    """The local classification loss under label skew (lora_flwr/training/losses.py)."""

    # ce | fedlc (logit calibration) | fedrs (restricted softmax) | logit_adjust
    # (the client's label prior added to the logits) | balanced (class weights).
    name: Loss = "ce"
    tau: float = bounded(1.0, AT_LEAST_0)  # fedlc, logit_adjust: strength
    fedrs_alpha: float = bounded(0.5, "[0, 1]")  # fedrs: scale of absent classes
    balanced_beta: float = bounded(0.999, "[0, 1)")  # balanced: effective-number beta

    def __post_init__(self) -> None:
        """Check the fields."""
        check_section(self, "loss")


@dataclass(frozen=True)
class ComputeConfig:
    """Where and how each process computes."""

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
    # Ray resources per simulated client
    client_cpus: float = bounded(1.0, ABOVE_0)
    client_gpus: float = bounded(0.0, AT_LEAST_0)
    # Time every phase of a round (lora_flwr/profiling.py) into the history;
    # off: no timer runs and no device sync is added.
    profile: bool = False
    # Recompute each transformer block's activations in the backward pass instead
    # of keeping them (torch.utils.checkpoint, non-reentrant): less memory, about
    # one more forward per step; the same gradients.
    gradient_checkpointing: bool = False
    # A client logs "step k/K, loss, tokens/s" every this many seconds of local
    # training (0: never); the simulation shows it on the console.
    progress_every: float = bounded(10.0, AT_LEAST_0, why="0: off")

    def __post_init__(self) -> None:
        """Check the fields."""
        check_section(self, "compute")


@dataclass(frozen=True)
class EvalConfig:
    """When and on what the global adapter is evaluated."""

    # centralised evaluation every N rounds (0: only at the end)
    every: int = bounded(1, AT_LEAST_0)
    # The server's centralised evaluation of round t runs in a background thread
    # while round t + 1's messages travel and its clients train; round t's history
    # row and checkpoint are written when it is done. Same numbers either way. Pays
    # off when the ServerApp has cores of its own (a deployment's server machine);
    # where it shares them with the clients (the simulation, a one-machine
    # deployment) the two compete (docs/BENCHMARKS.md).
    overlap: bool = False
    # Share of clients evaluated per round (0: no federated eval; a personalised
    # rule such as fedsa then evaluates every client at each evaluation round).
    fraction: float = bounded(0.0, "[0, 1]")
    # federated evaluation waits for at least this many clients
    min_clients: int = bounded(2, AT_LEAST_1)
    batch_size: int = bounded(64, AT_LEAST_1)
    # cap the held-out set used per centralised evaluation (0: all)
    max_examples: int = bounded(0, AT_LEAST_0)
    # After the last round the server scores the global model on a multiple-choice
    # benchmark (causal LM only) under FlowerTune's General-NLP protocol, and by
    # letter choice, into <run>/benchmark.json: "none" or "mmlu" (an offline copy).
    benchmark: Benchmark = "none"
    benchmark_split: BenchmarkSplit = "validation"
    # at most this many questions per subject, one fixed sample (0: every one)
    benchmark_per_subject: int = bounded(0, AT_LEAST_0)
    # After the last round: greedy answers to this many held-out prompts of
    # instruction data, at most sample_tokens tokens each, in <run>/samples.jsonl.
    samples: int = bounded(0, AT_LEAST_0)
    sample_tokens: int = bounded(128, AT_LEAST_1)

    def __post_init__(self) -> None:
        """Check the fields."""
        check_section(self, "eval")
