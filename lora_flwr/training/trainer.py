"""LoRATrainer: the local training and evaluation loop (in-process PyTorch).

The seed's ``NewLoRATrainer`` / ``SetWorkDir`` / ``Train`` / ``GetAdapterWeights`` /
``SetAdapterWeights``. Training runs here, in this process; a failure raises. There is
no subprocess and no "simulated" fallback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from lora_flwr.config import ComputeConfig, LossConfig, Task, TrainConfig
from lora_flwr.data.tokenize import TokenizedDataset, infinite_batches, iter_batches
from lora_flwr.lora import LoRAAdapter, save_peft
from lora_flwr.lora.io import PEFT_TASK_TYPES
from lora_flwr.profiling import NULL_TIMER, PhaseTimer, Timer, key

# Metric keys live with the wire protocol: the server reads them without torch.
from lora_flwr.protocol import (  # noqa: E402
    ACCURACY,
    EVAL_LOSS,
    NUM_EXAMPLES,
    NUM_STEPS,
    NUM_TOKENS,
    PERPLEXITY,
    SECONDS,
    TOKENS_PER_S,
    TRAIN_LOSS,
)
from lora_flwr.training.adamw import SGD, AdamW
from lora_flwr.training.checkpointing import set_checkpointing, supports_checkpointing
from lora_flwr.training.losses import class_counts, skew_loss
from lora_flwr.training.precision import resolve_precision
from lora_flwr.training.progress import ProgressLine, progress_bar

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """Turn ``"auto"`` into CUDA when present (then MPS), else CPU; check the rest."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"`compute.device` is {device!r} but CUDA is not available; "
            "use 'auto' or 'cpu'"
        )
    return dev


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("`compute.precision`='fp16' needs a GPU; use 'bf16' or 'fp32'")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimiser step ``step`` (0-based) of ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class _Run:
    """What the steps of one ``train`` call update, and with what."""

    params: list[nn.Parameter]  # the trained parameters
    anchors: list[torch.Tensor]  # FedProx: their values at the start (or none)
    prox_mu: float
    optimizer: torch.optim.Optimizer | AdamW | SGD
    scaler: torch.amp.GradScaler
    peak: float  # peak learning rate
    total: int  # optimiser steps
    labels: torch.Tensor | None  # the local data's labels (seq_cls)
    counts: torch.Tensor | None = None  # the client's label counts (skew losses)


@dataclass
class _Tally:
    """What the steps of one ``train`` call saw."""

    losses: list[float] = field(default_factory=list)
    examples: int = 0
    tokens: int = 0

    def metrics(self, total: int, seconds: float) -> dict[str, float]:
        """Return the call's metrics (profile phases apart)."""
        return {
            TRAIN_LOSS: float(np.mean(self.losses)),
            NUM_EXAMPLES: float(self.examples),
            NUM_STEPS: float(total),
            NUM_TOKENS: float(self.tokens),
            SECONDS: seconds,
            TOKENS_PER_S: self.tokens / seconds if seconds > 0 else 0.0,
        }


class LoRATrainer:
    """Train and evaluate a LoRA adapter on local data.

    Parameters
    ----------
    adapter
        An adapter already applied to its model; only its parameters are trained.
    task
        ``"seq_cls"`` (accuracy) or ``"causal_lm"`` (perplexity).
    config
        Optimiser, schedule, batch size and steps.
    loss
        The local loss (default: cross-entropy).
    compute
        Device, precision, threads, profiling, gradient checkpointing and progress
        lines (default: ``ComputeConfig()``).
    eval_batch_size
        Batch size of :meth:`evaluate` and the head statistics.
    work_dir
        Where :meth:`save_adapter` and the metrics log (``metrics.jsonl``) go.
    """

    def __init__(
        self,
        adapter: LoRAAdapter,
        task: Task,
        config: TrainConfig,
        *,
        loss: LossConfig | None = None,
        compute: ComputeConfig | None = None,
        eval_batch_size: int = 64,
        work_dir: str | Path | None = None,
    ) -> None:
        loss = loss if loss is not None else LossConfig()
        compute = compute if compute is not None else ComputeConfig()
        if task not in ("seq_cls", "causal_lm"):
            raise ValueError(f"`task` should be 'seq_cls' or 'causal_lm', not {task!r}")
        if task != "seq_cls" and loss.name != "ce":
            raise ValueError(
                f"`loss.name` = {loss.name!r} needs a classification task; "
                f"this model's task is {task!r}: use 'ce'"
            )
        self.adapter = adapter
        self.model: nn.Module = adapter.model
        self.task = task
        self.config = config
        self.loss = loss
        self.compute = compute
        self.eval_batch_size = eval_batch_size
        self.device = resolve_device(compute.device)
        # "auto" becomes bf16 only where the hardware runs it natively.
        self.precision = resolve_precision(compute.precision, self.device)
        self.autocast_dtype = _autocast_dtype(self.precision, self.device)
        if compute.precision == "auto":
            logger.info(
                "compute.precision 'auto' -> %s on %s", self.precision, self.device
            )
        if compute.num_threads > 0:
            torch.set_num_threads(compute.num_threads)
        if compute.gradient_checkpointing and not supports_checkpointing(self.model):
            raise ValueError(
                "`compute.gradient_checkpointing` is on but "
                f"{type(self.model).__name__} has no checkpointing switch"
            )
        self.model.to(self.device)
        self.work_dir: Path | None = None
        if work_dir is not None:
            self.set_work_dir(work_dir)

    # ------------------------------------------------------------ seed's API
    def set_work_dir(self, path: str | Path) -> None:
        """Set (and create) the directory for the adapter and the metrics log."""
        self.work_dir = Path(path)
        self.work_dir.mkdir(parents=True, exist_ok=True)

    def get_adapter_weights(self) -> list[npt.NDArray[np.float32]]:
        """Return the adapter's arrays in its documented order."""
        return self.adapter.get_weights()

    def set_adapter_weights(self, arrays: list[npt.NDArray[np.float32]]) -> None:
        """Overwrite the adapter's arrays (count, shape, dtype and values checked)."""
        self.adapter.set_weights(arrays)

    def save_adapter(
        self, name: str = "adapter", *, base_model_name_or_path: str | None = None
    ) -> Path:
        """Save the adapter as a PEFT directory inside the work dir.

        ``base_model_name_or_path`` is written to its config, for PEFT to load the
        base by (see :func:`lora_flwr.models.base_model_source`); the task type is
        the trainer's.
        """
        if self.work_dir is None:
            raise ValueError("No work dir set; call `set_work_dir(path)` first")
        return save_peft(
            self.adapter,
            self.work_dir / name,
            base_model_name_or_path=base_model_name_or_path,
            task_type=PEFT_TASK_TYPES.get(self.task),
        )

    # ----------------------------------------------------------------- train
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def num_steps_for(self, data: TokenizedDataset) -> int:
        """Optimiser steps one ``train`` call takes on ``data`` under the config."""
        if self.config.local_epochs > 0:
            per_epoch = math.ceil(len(data) / self.config.batch_size)
            return max(1, math.ceil(self.config.local_epochs * per_epoch))
        return self.config.local_steps

    def train(
        self,
        data: TokenizedDataset,
        *,
        steps: int | None = None,
        lr: float | None = None,
        seed: int = 0,
        progress: bool | None = None,
        on_step: Callable[[int, float], None] | None = None,
        prox_mu: float = 0.0,
        name: str = "train",
    ) -> dict[str, float]:
        """Run ``steps`` optimiser steps (``train.optimizer``) on the trained adapter.

        Only parameters with ``requires_grad`` train
        (:meth:`~lora_flwr.lora.LoRAAdapter.set_trainable`).

        Parameters
        ----------
        data
            Tokenized local training data.
        steps
            Optimiser steps (default: ``local_steps``, or ``local_epochs`` worth).
        lr
            Peak learning rate (default: ``config.lr``).
        seed
            Seeds batch order and dropout; same seed, same data, same start weights
            give bit-identical results on CPU.
        progress
            Show a progress bar (default: when stderr is a terminal); without one,
            a line every ``compute.progress_every`` seconds
            (:class:`~lora_flwr.training.progress.ProgressLine`).
        on_step
            Called as ``on_step(step, loss)`` after each optimiser step (1-based),
            e.g. to evaluate mid-run without breaking the schedule.
        prox_mu
            FedProx's proximal term (Li et al., MLSys 2020): adds
            ``prox_mu / 2 * ||w - w_start||^2`` over the trained parameters, where
            ``w_start`` is their value when the call starts. 0 turns it off.
        name
            Who trains, first in each progress line (``"client 3 (round 2)"``).

        Returns
        -------
        dict
            ``train_loss`` (mean over steps), ``num_examples``, ``num_steps``,
            ``num_tokens``, ``seconds``, ``tokens_per_s``; with ``compute.profile``
            also ``prof_data_s``, ``prof_forward_s``, ``prof_backward_s`` and
            ``prof_optimizer_s`` (:mod:`lora_flwr.profiling`).
        """
        cfg = self.config
        total, params = self._check_train(data, steps, prox_mu)
        peak = cfg.lr if lr is None else lr
        run = self._start_run(params, total, peak, prox_mu, data.labels)
        generator = torch.Generator().manual_seed(seed)
        batches = infinite_batches(
            data, cfg.batch_size, generator=generator, bucket_batches=cfg.bucket_batches
        )
        show = sys.stderr.isatty() if progress is None else progress
        line = ProgressLine(name, total, 0.0 if show else self.compute.progress_every)
        set_checkpointing(self.model, self.compute.gradient_checkpointing)
        self.model.train()
        clock = self._phase_timer()
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tally = self._run_steps(run, batches, clock, (show, line), on_step)
        seconds = time.perf_counter() - start
        self.model.eval()
        metrics = tally.metrics(total, seconds)
        metrics.update({key(p): v for p, v in clock.seconds.items()})
        self._log("train", metrics)
        return metrics

    def _check_train(
        self, data: TokenizedDataset, steps: int | None, prox_mu: float
    ) -> tuple[int, list[nn.Parameter]]:
        """Check a ``train`` call; return its step count and trained parameters."""
        if len(data) == 0:
            raise ValueError("Cannot train on an empty dataset")
        total = self.num_steps_for(data) if steps is None else steps
        if total < 1:
            raise ValueError(f"`steps` should be >= 1 but the value passed is {total}")
        if not (prox_mu >= 0 and math.isfinite(prox_mu)):
            raise ValueError(
                f"`prox_mu` should be >= 0 but the value passed is {prox_mu}"
            )
        params = self.adapter.trainable_parameters()
        if not params:
            raise ValueError(
                "No adapter parameter is trainable; call `adapter.set_trainable(...)` "
                "with at least one group"
            )
        return total, params

    def _start_run(
        self,
        params: list[nn.Parameter],
        total: int,
        peak: float,
        prox_mu: float,
        labels: torch.Tensor | None,
    ) -> _Run:
        """Build the optimiser (and FedProx's anchors) of one ``train`` call."""
        anchors = [p.detach().clone() for p in params] if prox_mu > 0 else []
        optimizer = self._optimizer(params, peak)
        scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.autocast_dtype is torch.float16
        )
        return _Run(params, anchors, prox_mu, optimizer, scaler, peak, total, labels)

    def _run_steps(
        self,
        run: _Run,
        batches: Iterator[dict[str, torch.Tensor]],
        clock: Timer,
        shown: tuple[bool, ProgressLine],
        on_step: Callable[[int, float], None] | None,
    ) -> _Tally:
        """Take every optimiser step of a ``train`` call; count what it saw."""
        tally = _Tally()
        show, line = shown
        for step in progress_bar(range(run.total), show, "train"):
            clock.restart()
            batch = self._to_device(next(batches))
            clock.lap("data")
            loss = self._train_step(run, step, batch, clock)
            tally.losses.append(loss.item())
            if on_step is not None:
                on_step(step + 1, tally.losses[-1])
            tokens = int(batch["attention_mask"].sum().item())
            line.step(step + 1, tally.losses[-1], tokens)
            tally.examples += int(batch["input_ids"].shape[0])
            tally.tokens += tokens
        return tally

    def _train_step(
        self,
        run: _Run,
        step: int,
        batch: dict[str, torch.Tensor],
        clock: Timer,
    ) -> torch.Tensor:
        """One optimiser step on ``batch``; return its loss (FedProx's term apart)."""
        cfg = self.config
        for group in run.optimizer.param_groups:
            group["lr"] = run.peak * lr_factor(
                step, run.total, cfg.warmup_steps, cfg.lr_schedule
            )
        loss = self._batch_loss(run, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"Training loss became {loss.item()} at step {step}; lower "
                "`train.lr` or check the data"
            )
        objective = loss
        if run.anchors:
            objective = loss + 0.5 * run.prox_mu * sum(
                ((p.float() - a.float()) ** 2).sum()
                for p, a in zip(run.params, run.anchors, strict=True)
            )
        clock.lap("forward")
        self._update(run, objective, clock)
        return loss

    def _batch_loss(self, run: _Run, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward ``batch`` and return its ``loss.name``."""
        cfg = self.loss
        with self._autocast():
            if cfg.name == "ce":
                loss: torch.Tensor = self.model(**batch).loss
                return loss
            logits = self.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            if run.counts is None:  # the client's own label counts
                assert run.labels is not None, "seq_cls has labels"
                run.counts = class_counts(run.labels, logits.shape[-1])
            return skew_loss(
                cfg.name,
                logits,
                batch["labels"],
                run.counts,
                tau=cfg.tau,
                alpha=cfg.fedrs_alpha,
                beta=cfg.balanced_beta,
            )

    def _update(self, run: _Run, objective: torch.Tensor, clock: Timer) -> None:
        """Backward ``objective`` and step the optimiser (clipping, loss scaling)."""
        max_norm = self.config.max_grad_norm
        run.optimizer.zero_grad(set_to_none=True)
        clock.lap("optimizer")
        # torch leaves Tensor.backward unannotated (hence the ignores below).
        if isinstance(run.optimizer, AdamW | SGD):  # CPU: no fp16, no loss scaling
            objective.backward()  # type: ignore[no-untyped-call]
            clock.lap("backward")
            if max_norm > 0:
                torch.nn.utils.clip_grad_norm_(run.params, max_norm)
            run.optimizer.step()
        else:
            run.scaler.scale(objective).backward()  # type: ignore[no-untyped-call]
            clock.lap("backward")
            if max_norm > 0:
                run.scaler.unscale_(run.optimizer)
                torch.nn.utils.clip_grad_norm_(run.params, max_norm)
            run.scaler.step(run.optimizer)
            run.scaler.update()
        clock.lap("optimizer")

    def _optimizer(
        self, params: list[torch.nn.Parameter], lr: float
    ) -> torch.optim.Optimizer | AdamW | SGD:
        """Build ``train.optimizer`` (the CPU ones without a torch._dynamo import)."""
        cfg = self.config
        cpu = self.device.type == "cpu"  # same arithmetic as torch.optim's
        if cfg.optimizer == "sgd":
            if cpu:
                return SGD(
                    params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
                )
            return torch.optim.SGD(
                params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        if cpu:
            return AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)

    def _phase_timer(self) -> Timer:
        """Return the clock of a ``train`` call: a no-op one unless profiling."""
        if not self.compute.profile:
            return NULL_TIMER
        # Profile mode only: CUDA runs asynchronously, so each reading of the
        # clock waits for the queued kernels; otherwise a phase would be charged
        # to whichever later call happens to block.
        if self.device.type == "cuda":
            return PhaseTimer(sync=lambda: torch.cuda.synchronize(self.device))
        if self.device.type == "mps":
            return PhaseTimer(sync=torch.mps.synchronize)
        return PhaseTimer()

    # -------------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate(
        self, data: TokenizedDataset, *, progress: bool | None = None
    ) -> dict[str, float]:
        """Loss and accuracy (classification) or perplexity (causal LM) on ``data``.

        The loss is averaged per example for classification and per predicted token
        for causal LM, so perplexity is ``exp(loss)``.
        """
        if len(data) == 0:
            raise ValueError("Cannot evaluate on an empty dataset")
        was_training = self.model.training
        self.model.eval()
        show = sys.stderr.isatty() if progress is None else progress
        loss_sum = 0.0
        count = 0
        correct = 0
        start = time.perf_counter()
        for batch in progress_bar(
            iter_batches(
                data,
                self.eval_batch_size,
                shuffle=False,
                sort_by_length=True,
            ),
            show,
            "eval",
        ):
            batch = self._to_device(batch)
            with self._autocast():
                logits = self.model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits.float()
            labels = batch["labels"]
            if self.task == "seq_cls":
                loss_sum += float(
                    nn.functional.cross_entropy(logits, labels, reduction="sum")
                )
                correct += int((logits.argmax(-1) == labels).sum())
                count += int(labels.shape[0])
            else:
                shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
                shift_labels = labels[:, 1:].reshape(-1)
                loss_sum += float(
                    nn.functional.cross_entropy(
                        shift_logits, shift_labels, ignore_index=-100, reduction="sum"
                    )
                )
                count += int((shift_labels != -100).sum())
        self.model.train(was_training)
        if count == 0:
            raise ValueError("Evaluation data holds no predictable tokens")
        loss = loss_sum / count
        metrics = {EVAL_LOSS: loss, NUM_EXAMPLES: float(len(data))}
        if self.task == "seq_cls":
            metrics[ACCURACY] = correct / count
        else:
            metrics[PERPLEXITY] = math.exp(min(loss, 700.0))
        metrics[SECONDS] = time.perf_counter() - start
        self._log("evaluate", metrics)
        return metrics

    @torch.no_grad()
    def head_inputs(
        self, data: TokenizedDataset, layer: nn.Module
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Return what ``layer`` (the head's output layer) receives per example.

        The model runs in eval mode (no dropout) over ``data``; returns the inputs
        ``(n, d)`` in float32 and the labels ``(n,)`` (seq_cls only): the
        features the server's LDA head is fitted to (``head.calibration``).
        """
        if self.task != "seq_cls":
            raise ValueError("head features exist for classification (seq_cls) only")
        if len(data) == 0:
            return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
        was_training = self.model.training
        self.model.eval()
        seen: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []

        def grab(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen.append(args[0].detach().float().cpu())

        handle = layer.register_forward_pre_hook(grab)
        try:
            for batch in iter_batches(
                data, self.eval_batch_size, shuffle=False, sort_by_length=True
            ):
                batch = self._to_device(batch)
                with self._autocast():
                    self.model(
                        input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"],
                    )
                labels.append(batch["labels"].cpu())
        finally:
            handle.remove()
            self.model.train(was_training)
        if len(seen) != len(labels):
            raise RuntimeError(
                f"the head layer ran {len(seen)} times for {len(labels)} batches"
            )
        x = torch.cat(seen).numpy().astype(np.float32, copy=False)
        y = torch.cat(labels).numpy().astype(np.int64, copy=False)
        return x, y

    def _log(self, kind: str, metrics: dict[str, float]) -> None:
        if self.work_dir is None:
            return
        line = json.dumps({"event": kind, "time": time.time(), **metrics})
        with (self.work_dir / "metrics.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
