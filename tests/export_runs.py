"""A finished run on disk, written as the project writes one (shared test helper).

The server saves ``<run>/adapter`` with ``save_peft`` and the base named by
``base_model_source``; :func:`make_run` does the same on a given model, and keeps
the project's own model with that adapter for the tests to compare against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_flwr.atomic import write_text_atomic
from lora_flwr.config import ExperimentConfig, LoraConfig, ModelConfig, Task
from lora_flwr.lora import LoRAAdapter, save_peft
from lora_flwr.lora.io import PEFT_TASK_TYPES
from lora_flwr.models import base_model_source, load_model

TEXT = "To be, or not to be"
NUM_LABELS = 3


@dataclass
class Run:
    """A finished run on disk and the project's own model with its adapter."""

    run_dir: Path
    cfg: ExperimentConfig
    model: Any
    adapter: LoRAAdapter
    tokenizer: Any
    task: Task


def make_run(
    root: Path,
    model_name: str,
    task: Task,
    targets: tuple[str, ...],
    saved: tuple[str, ...] = (),
    *,
    save_base: str | None = None,
    std: float = 0.1,
) -> Run:
    """Write ``root/run`` (config.toml + adapter/) as a run on ``model_name`` does.

    ``save_base``: save that tiny built-in to ``root/base`` first and use the
    directory as the model (a local model directory, as users pass one).
    ``std``: of the seeded random adapter values (B included).
    """
    if save_base is not None:
        tiny = load_model(ModelConfig(name=save_base, task=task, num_labels=NUM_LABELS))
        tiny.model.save_pretrained(root / "base")
        tiny.tokenizer.save_pretrained(root / "base")
        model_name = str(root / "base")
    cfg = ExperimentConfig(
        name="run",
        output_dir=str(root),
        seed=7,
        model=ModelConfig(name=model_name, task=task, num_labels=NUM_LABELS),
        lora=LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=targets,
            modules_to_save=saved,
        ),
    )
    run_dir = root / "run"
    run_dir.mkdir()
    write_text_atomic(run_dir / "config.toml", cfg.to_toml())
    bundle = load_model(cfg.model, seed=cfg.seed)
    adapter = LoRAAdapter(cfg.lora, seed=cfg.seed)
    adapter.apply(bundle.model)
    randomize_adapter(adapter, seed=3, std=std)
    # What the server saves as <run>/adapter at the end of the last round.
    save_peft(
        adapter,
        run_dir / "adapter",
        base_model_name_or_path=base_model_source(cfg.model.name),
        task_type=PEFT_TASK_TYPES[bundle.task],
    )
    return Run(run_dir, cfg, bundle.model, adapter, bundle.tokenizer, bundle.task)


def randomize_adapter(adapter: LoRAAdapter, seed: int, std: float = 0.1) -> None:
    """Give every adapter tensor (B and the saved modules too) seeded values."""
    generator = torch.Generator().manual_seed(seed)
    adapter.set_weights(
        [
            (torch.randn(shape, generator=generator) * std).numpy()
            for shape in adapter.weight_shapes()
        ]
    )


def token_batch(tokenizer: Any) -> list[list[int]]:
    """Two rows of ids, no padding: the text and its reversal."""
    ids = list(tokenizer(TEXT)["input_ids"])
    return [ids, ids[::-1]]


def logits(model: Any, batch: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor(batch)).logits
