"""LoRATrainer: it learns, it is reproducible, its metrics and files are right."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch

from lora_flwr.config import (
    ComputeConfig,
    DataConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    TrainConfig,
)
from lora_flwr.data import TokenizedDataset, collate, load_splits, tokenize
from lora_flwr.lora import LoRAAdapter
from lora_flwr.models import load_model
from lora_flwr.training import (
    ACCURACY,
    EVAL_LOSS,
    NUM_EXAMPLES,
    NUM_STEPS,
    NUM_TOKENS,
    PERPLEXITY,
    SECONDS,
    TOKENS_PER_S,
    TRAIN_LOSS,
    LoRATrainer,
    lr_factor,
    resolve_device,
)
from lora_flwr.training.adamw import SGD, AdamW

MAX_LENGTH = 32


@dataclass
class Setup:
    trainer: LoRATrainer
    adapter: LoRAAdapter
    train: TokenizedDataset
    test: TokenizedDataset


def _setup(
    model: str = "tiny-bert",
    seed: int = 0,
    *,
    loss: dict[str, Any] | None = None,
    compute: dict[str, Any] | None = None,
    **train: Any,
) -> Setup:
    """A fresh model, adapter and trainer on the matching synthetic corpus.

    ``train`` is merged over the TrainConfig defaults below, ``loss`` builds the
    LossConfig, ``compute`` is merged over the ComputeConfig defaults (the CPU).
    """
    causal = model != "tiny-bert"
    bundle = load_model(ModelConfig(name=model, max_length=MAX_LENGTH), seed=seed)
    lora = LoraConfig(
        r=4,
        lora_alpha=8.0,
        lora_dropout=0.0,
        target_modules=("q_proj", "v_proj") if causal else ("query", "value"),
        modules_to_save=() if causal else ("classifier",),
    )
    adapter = LoRAAdapter(lora, seed=seed)
    adapter.apply(bundle.model)
    options: dict[str, Any] = {"lr": 1e-2, "batch_size": 16, **train}
    trainer = LoRATrainer(
        adapter,
        bundle.task,
        TrainConfig(**options),
        loss=LossConfig(**(loss or {})),
        compute=ComputeConfig(**{"device": "cpu", **(compute or {})}),
    )
    splits = load_splits(
        DataConfig(name="synthetic_lm" if causal else "synthetic"), seed=0
    )
    return Setup(
        trainer=trainer,
        adapter=adapter,
        train=tokenize(splits.train, bundle.tokenizer, bundle.task, MAX_LENGTH),
        test=tokenize(splits.test, bundle.tokenizer, bundle.task, MAX_LENGTH),
    )


# -------------------------------------------------------------------- learns
def test_training_learns_the_synthetic_task() -> None:
    # Prepare: a random tiny BERT plateaus near ln 2 for ~20 steps, then learns
    # (80 steps at 2e-2 reached loss <= 0.45 and accuracy >= 0.80 for seeds 0-4).
    s = _setup(lr=2e-2)
    before = s.trainer.evaluate(s.test)

    # Execute
    metrics = s.trainer.train(s.train, steps=80, seed=0)
    after = s.trainer.evaluate(s.test)

    # Assert
    assert before[EVAL_LOSS] == pytest.approx(math.log(2), abs=0.05)
    assert after[EVAL_LOSS] < before[EVAL_LOSS] - 0.2
    assert after[ACCURACY] >= 0.8
    assert metrics[NUM_STEPS] == 80
    assert metrics[NUM_EXAMPLES] == 80 * 16
    assert metrics[TRAIN_LOSS] < before[EVAL_LOSS]


def test_train_metrics_count_examples_and_tokens() -> None:
    # Prepare: 3 steps of 16 over 320 examples: no epoch boundary.
    s = _setup()
    steps: list[tuple[int, float]] = []

    # Execute
    metrics = s.trainer.train(
        s.train, steps=3, seed=5, on_step=lambda i, lo: steps.append((i, lo))
    )

    # Assert
    assert set(metrics) == {
        TRAIN_LOSS,
        NUM_EXAMPLES,
        NUM_STEPS,
        NUM_TOKENS,
        SECONDS,
        TOKENS_PER_S,
    }
    assert [i for i, _ in steps] == [1, 2, 3]
    assert metrics[TRAIN_LOSS] == pytest.approx(np.mean([lo for _, lo in steps]))
    assert metrics[NUM_EXAMPLES] == 48.0
    # Tokens of exactly the 48 examples the seeded order visits first.
    order = torch.randperm(len(s.train), generator=torch.Generator().manual_seed(5))
    expected = sum(int(s.train.input_ids[int(i)].numel()) for i in order[:48])
    assert metrics[NUM_TOKENS] == expected
    assert metrics[TOKENS_PER_S] > 0


def test_only_the_adapter_changes() -> None:
    # Prepare
    s = _setup()
    frozen = {
        n: p.detach().clone()
        for n, p in s.adapter.model.named_parameters()
        if not p.requires_grad
    }
    start = s.adapter.get_weights()

    # Execute
    s.trainer.train(s.train, steps=3, seed=0)

    # Assert
    assert frozen
    for name, param in s.adapter.model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(start, s.adapter.get_weights(), strict=True)
    ]
    assert all(changed)


# ----------------------------------------------------------- reproducibility
def test_training_is_bit_reproducible_with_the_same_seed() -> None:
    # Prepare: two independently built models, adapters and trainers.
    first, second = _setup(seed=1), _setup(seed=1)

    # Execute
    m1 = first.trainer.train(first.train, steps=5, seed=11)
    m2 = second.trainer.train(second.train, steps=5, seed=11)

    # Assert
    assert m1[TRAIN_LOSS] == m2[TRAIN_LOSS]
    for a, b in zip(
        first.adapter.get_weights(), second.adapter.get_weights(), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_training_seed_changes_the_result() -> None:
    # Prepare
    first, second = _setup(seed=1), _setup(seed=1)

    # Execute
    first.trainer.train(first.train, steps=5, seed=11)
    second.trainer.train(second.train, steps=5, seed=12)

    # Assert
    pairs = zip(first.adapter.get_weights(), second.adapter.get_weights(), strict=True)
    assert not any(np.array_equal(a, b) for a, b in pairs)


def test_training_leaves_the_global_rng_alone() -> None:
    # Prepare
    s = _setup()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)

    # Execute
    s.trainer.train(s.train, steps=2, seed=0)

    # Assert
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------- lr schedule
@pytest.mark.parametrize(
    ("step", "total", "warmup", "schedule", "expected"),
    [
        (0, 10, 0, "constant", 1.0),
        (9, 10, 0, "constant", 1.0),
        (0, 10, 4, "constant", 0.25),
        (1, 10, 4, "constant", 0.5),
        (3, 10, 4, "constant", 1.0),
        (7, 10, 4, "constant", 1.0),
        (0, 10, 0, "cosine", 1.0),
        (5, 10, 0, "cosine", 0.5),
        (10, 10, 0, "cosine", 0.0),
        (25, 10, 0, "cosine", 0.0),
        (1, 10, 2, "cosine", 1.0),
        (2, 10, 2, "cosine", 1.0),
        (6, 10, 2, "cosine", 0.5),
        (4, 10, 2, "cosine", 0.5 * (1 + math.cos(math.pi / 4))),
        (0, 1, 0, "cosine", 1.0),
    ],
)
def test_lr_factor(
    step: int, total: int, warmup: int, schedule: str, expected: float
) -> None:
    # Prepare / Execute
    factor = lr_factor(step, total, warmup, schedule)

    # Assert
    assert factor == pytest.approx(expected, abs=1e-12)


def test_lr_factor_cosine_decreases_monotonically() -> None:
    # Prepare / Execute
    factors = [lr_factor(i, 20, 3, "cosine") for i in range(20)]

    # Assert
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(a >= b for a, b in zip(factors[2:], factors[3:], strict=False))
    assert 0.0 < factors[-1] < 0.01


def test_num_steps_for_epochs() -> None:
    # Prepare: 320 examples / 16 = 20 batches per epoch.
    s = _setup(local_epochs=1.5)
    steps = _setup(local_steps=7)

    # Execute / Assert
    assert len(s.train) == 320
    assert s.trainer.num_steps_for(s.train) == 30
    assert steps.trainer.num_steps_for(steps.train) == 7


# --------------------------------------------------------------- evaluation
def test_evaluate_classification_matches_per_example_values() -> None:
    # Prepare
    s = _setup()
    s.trainer.train(s.train, steps=3, seed=0)
    model = s.adapter.model

    # Execute
    metrics = s.trainer.evaluate(s.test)

    # Assert: the mean cross-entropy and accuracy, one example at a time.
    losses, hits = [], []
    with torch.no_grad():
        for i in range(len(s.test)):
            batch = collate(s.test, [i])
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            losses.append(
                float(torch.nn.functional.cross_entropy(logits, batch["labels"]))
            )
            hits.append(int(logits.argmax(-1).item() == batch["labels"].item()))
    assert metrics[NUM_EXAMPLES] == len(s.test) == 80
    assert metrics[EVAL_LOSS] == pytest.approx(np.mean(losses), rel=1e-5)
    assert metrics[ACCURACY] == np.mean(hits)
    assert PERPLEXITY not in metrics


def test_evaluate_causal_lm_gives_perplexity_exp_loss() -> None:
    # Prepare
    s = _setup("tiny-llama")
    model = s.adapter.model

    # Execute
    metrics = s.trainer.evaluate(s.test)

    # Assert: loss per predicted token (HF's per-example mean, token-weighted).
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(s.test)):
            batch = collate(s.test, [i])
            n_pred = int(batch["input_ids"].shape[1]) - 1
            total += float(model(**batch).loss) * n_pred
            count += n_pred
    assert ACCURACY not in metrics
    assert metrics[EVAL_LOSS] == pytest.approx(total / count, rel=1e-5)
    assert metrics[PERPLEXITY] == pytest.approx(math.exp(metrics[EVAL_LOSS]), rel=1e-12)
    # A random model of a ~100-token vocabulary: perplexity of that order.
    assert 20 < metrics[PERPLEXITY] < 400


def test_causal_lm_training_lowers_perplexity() -> None:
    # Prepare
    s = _setup("tiny-llama", lr=2e-2)
    before = s.trainer.evaluate(s.test)

    # Execute
    s.trainer.train(s.train, steps=20, seed=0)
    after = s.trainer.evaluate(s.test)

    # Assert: ~100 -> ~84 for seeds 0-2.
    assert after[PERPLEXITY] < 0.9 * before[PERPLEXITY]
    assert after[EVAL_LOSS] < before[EVAL_LOSS]


def test_evaluate_restores_training_mode() -> None:
    # Prepare
    s = _setup()
    s.adapter.model.train()

    # Execute
    s.trainer.evaluate(s.test)

    # Assert
    assert s.adapter.model.training


# ------------------------------------------------------------------- errors
def _empty() -> TokenizedDataset:
    return TokenizedDataset(
        input_ids=(),
        labels=torch.zeros(0, dtype=torch.long),
        task="seq_cls",
        pad_token_id=0,
    )


def test_train_on_empty_data_raises() -> None:
    # Prepare
    s = _setup()

    # Execute / Assert
    with pytest.raises(ValueError, match="Cannot train on an empty dataset"):
        s.trainer.train(_empty(), steps=1)


def test_evaluate_on_empty_data_raises() -> None:
    # Prepare
    s = _setup()

    # Execute / Assert
    with pytest.raises(ValueError, match="Cannot evaluate on an empty dataset"):
        s.trainer.evaluate(_empty())


def test_train_rejects_zero_steps() -> None:
    # Prepare
    s = _setup()

    # Execute / Assert
    with pytest.raises(
        ValueError, match="`steps` should be >= 1 but the value passed is 0"
    ):
        s.trainer.train(s.train, steps=0)


def test_nan_loss_raises_floating_point_error() -> None:
    # Prepare: poison the trainable head.
    s = _setup()
    with torch.no_grad():
        cast(Any, s.adapter.model).classifier.weight.fill_(float("nan"))

    # Execute / Assert
    with pytest.raises(FloatingPointError, match="Training loss became nan at step 0"):
        s.trainer.train(s.train, steps=3, seed=0)


def test_trainer_rejects_an_unknown_task() -> None:
    # Prepare
    s = _setup()

    # Execute / Assert
    with pytest.raises(ValueError, match="`task` should be 'seq_cls' or 'causal_lm'"):
        LoRATrainer(s.adapter, "regression", TrainConfig())


def test_trainer_rejects_fp16_on_cpu() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="fp16"):
        _setup(compute={"precision": "fp16"})


def test_resolve_device() -> None:
    # Prepare / Execute / Assert
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
        if not torch.backends.mps.is_available():
            assert resolve_device("auto") == torch.device("cpu")


# -------------------------------------------------------------------- files
def test_metrics_log_gets_one_line_per_call(tmp_path: Path) -> None:
    # Prepare
    s = _setup()
    s.trainer.set_work_dir(tmp_path / "work")

    # Execute
    train = s.trainer.train(s.train, steps=2, seed=0)
    evaluation = s.trainer.evaluate(s.test)

    # Assert
    lines = (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["event"] for r in records] == ["train", "evaluate"]
    assert records[0][TRAIN_LOSS] == train[TRAIN_LOSS]
    assert records[1][EVAL_LOSS] == evaluation[EVAL_LOSS]
    assert records[1][ACCURACY] == evaluation[ACCURACY]
    assert all(isinstance(r["time"], float) for r in records)


def test_no_metrics_log_without_a_work_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.chdir(tmp_path)
    s = _setup()

    # Execute
    s.trainer.train(s.train, steps=1, seed=0)

    # Assert
    assert list(tmp_path.iterdir()) == []


def test_save_adapter_writes_a_peft_directory(tmp_path: Path) -> None:
    # Prepare
    s = _setup()
    s.trainer.train(s.train, steps=2, seed=0)
    s.trainer.set_work_dir(tmp_path)

    # Execute
    path = s.trainer.save_adapter("final")

    # Assert: the PEFT files, and they load back into a fresh model identically.
    assert path == tmp_path / "final"
    assert sorted(p.name for p in path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == 4
    other = _setup(seed=9)
    other.adapter.load(path)
    for a, b in zip(other.adapter.get_weights(), s.adapter.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_save_adapter_without_a_work_dir_raises() -> None:
    # Prepare
    s = _setup()

    # Execute / Assert
    with pytest.raises(ValueError, match="No work dir set"):
        s.trainer.save_adapter()


def test_set_adapter_weights_round_trip() -> None:
    # Prepare
    s = _setup()
    arrays = [np.full(shape, 0.5, np.float32) for shape in s.adapter.weight_shapes()]

    # Execute
    s.trainer.set_adapter_weights(arrays)

    # Assert
    for got, want in zip(s.trainer.get_adapter_weights(), arrays, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_cpu_adamw_is_bit_identical_to_torch_adamw(weight_decay: float) -> None:
    # Prepare: two copies of the same parameters, a schedule and a frozen step
    generator = torch.Generator().manual_seed(0)
    start = [
        torch.randn(5, 3, generator=generator),
        torch.randn(7, generator=generator),
    ]
    ours_params = [torch.nn.Parameter(t.clone()) for t in start]
    torch_params = [torch.nn.Parameter(t.clone()) for t in start]
    ours = AdamW(ours_params, lr=0.01, weight_decay=weight_decay)
    reference = torch.optim.AdamW(torch_params, lr=0.01, weight_decay=weight_decay)

    # Execute
    for step in range(6):
        grads = [torch.randn(t.shape, generator=generator) for t in start]
        for opt, params in ((ours, ours_params), (reference, torch_params)):
            opt.param_groups[0]["lr"] = 0.01 * (step + 1)
            opt.zero_grad(set_to_none=True)
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                if not (step == 2 and i == 1):  # a parameter without a gradient
                    p.grad = g.clone()
            opt.step()

    # Assert
    for mine, theirs in zip(ours_params, torch_params, strict=True):
        assert torch.equal(mine, theirs)
    assert not torch.equal(ours_params[0], start[0])


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.05)])
def test_cpu_sgd_is_bit_identical_to_torch_sgd(
    momentum: float, weight_decay: float
) -> None:
    # Prepare: as for AdamW, with a schedule and a step without a gradient
    generator = torch.Generator().manual_seed(1)
    start = [
        torch.randn(4, 6, generator=generator),
        torch.randn(3, generator=generator),
    ]
    ours_params = [torch.nn.Parameter(t.clone()) for t in start]
    torch_params = [torch.nn.Parameter(t.clone()) for t in start]
    ours = SGD(ours_params, lr=0.1, momentum=momentum, weight_decay=weight_decay)
    reference = torch.optim.SGD(
        torch_params, lr=0.1, momentum=momentum, weight_decay=weight_decay
    )

    # Execute
    for step in range(6):
        grads = [torch.randn(t.shape, generator=generator) for t in start]
        for opt, params in ((ours, ours_params), (reference, torch_params)):
            opt.param_groups[0]["lr"] = 0.1 / (step + 1)
            opt.zero_grad(set_to_none=True)
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                if not (step == 2 and i == 1):
                    p.grad = g.clone()
            opt.step()

    # Assert
    for mine, theirs in zip(ours_params, torch_params, strict=True):
        assert torch.equal(mine, theirs)
    assert not torch.equal(ours_params[0], start[0])


def test_sgd_training_steps_against_the_gradient() -> None:
    # Prepare: one plain SGD step without clipping is p - lr * grad.
    s = _setup(optimizer="sgd", lr=0.5, max_grad_norm=0.0)
    before = [p.detach().clone() for p in s.adapter.trainable_parameters()]
    grads: list[torch.Tensor] = []

    def keep_grads(step: int, loss: float) -> None:
        grads.extend(
            p.grad.detach().clone()
            for p in s.adapter.trainable_parameters()
            if p.grad is not None
        )

    # Execute
    s.trainer.train(s.train, steps=1, seed=0, on_step=keep_grads)

    # Assert
    after = list(s.adapter.trainable_parameters())
    assert len(grads) == len(after)
    for b, a, g in zip(before, after, grads, strict=True):
        torch.testing.assert_close(a.detach(), b - 0.5 * g)


def test_cpu_training_imports_no_torch_dynamo() -> None:
    # Prepare: torch.optim optimizers import torch._dynamo (seconds) on first use
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from lora_flwr.training.adamw import AdamW\n"
        "p = torch.nn.Parameter(torch.ones(3))\n"
        "opt = AdamW([p], lr=0.1)\n"
        "p.sum().backward(); torch.nn.utils.clip_grad_norm_([p], 1.0); opt.step()\n"
        "print('torch._dynamo' in sys.modules)"
    )

    # Execute
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )

    # Assert
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------ profiling
def test_training_without_profile_builds_no_phase_timer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: a PhaseTimer built (or a device synchronised) fails the run
    from lora_flwr.training import trainer as trainer_module

    def no_timer(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a phase timer was built with profiling off")

    monkeypatch.setattr(trainer_module, "PhaseTimer", no_timer)
    s = _setup()

    # Execute
    metrics = s.trainer.train(s.train, steps=2, seed=1, progress=False)

    # Assert
    assert not any(k.startswith("prof_") for k in metrics)
    assert metrics[NUM_STEPS] == 2.0


def test_profiled_training_is_bit_identical_and_times_each_phase() -> None:
    # Prepare: two trainers from the same start, profile off and on
    off, on = _setup(), _setup(compute={"profile": True})

    # Execute
    m_off = off.trainer.train(off.train, steps=3, seed=4, progress=False)
    m_on = on.trainer.train(on.train, steps=3, seed=4, progress=False)

    # Assert
    assert m_on[TRAIN_LOSS] == m_off[TRAIN_LOSS]
    for a, b in zip(off.adapter.get_weights(), on.adapter.get_weights(), strict=True):
        assert np.array_equal(a, b)
    phases = {"prof_data_s", "prof_forward_s", "prof_backward_s", "prof_optimizer_s"}
    assert set(m_on) - set(m_off) == phases
    assert all(m_on[k] > 0 for k in phases)
