"""Benchmark one LoRA training step: lora_flwr's LoRALinear vs Hugging Face PEFT.

Not a test. Both sides train the same thing on MiniLM-L6 (BERT, seq_cls): LoRA r=8,
alpha 16, dropout 0.1 on ``query``/``value``, plus the classifier head (PEFT:
``modules_to_save=["classifier"]``). One step is ``zero_grad``, forward, backward
and an AdamW step on the trainable parameters; no gradient clipping on either side.

* Inputs: real Rotten Tomatoes snippets (train split, seed 0), tokenized with
  ``truncation=True, padding="max_length", max_length=64``; every batch is exactly
  ``batch x 64`` tokens. Padded positions are computed like the others, so the
  throughput counts processed tokens (the real share is printed too).
* Both models are separate instances loaded from the same files
  (``load_model(ModelConfig(name="minilm"), seed=0)``, so the same new head), and
  PEFT's ``lora_A`` is overwritten with ours: the start weights are identical.
* Steps are interleaved in one process (A B, then B A, ...), warm-up steps are
  dropped, and the dropout RNG is reseeded with the same value before each side's
  step, so both draw the same masks. The ratio ours/PEFT is computed per pair of
  neighbouring steps, which cancels most of the load from other processes.

Usage::

    python benchmarks/bench_lora_step.py [--steps 30] [--threads 2] [--json out.json]

``--threads 1 2`` runs both thread counts in one go.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lora_flwr.config import DataConfig, LoraConfig, ModelConfig
from lora_flwr.data import load_splits
from lora_flwr.lora import LoRAAdapter
from lora_flwr.machine import cpu_model_name
from lora_flwr.models import load_model

R = 8
ALPHA = 16.0
DROPOUT = 0.1
TARGETS = ("query", "value")
LR = 5e-4
SANITY_STEPS = 3


# ----------------------------------------------------------------- setup
def make_batches(
    tokenizer: object, batch: int, seq: int, count: int
) -> list[dict[str, torch.Tensor]]:
    """Tokenize ``count`` batches of real snippets, padded to exactly ``seq``."""
    splits = load_splits(DataConfig(name="rotten_tomatoes"), seed=0)
    texts = list(splits.train.texts[: batch * count])
    labels = splits.train.labels
    assert labels is not None
    enc = tokenizer(  # type: ignore[operator]
        texts,
        truncation=True,
        max_length=seq,
        padding="max_length",
        return_tensors="pt",
    )
    out = []
    for i in range(count):
        sl = slice(i * batch, (i + 1) * batch)
        out.append(
            {
                "input_ids": enc["input_ids"][sl],
                "attention_mask": enc["attention_mask"][sl],
                "token_type_ids": enc["token_type_ids"][sl],
                "labels": torch.tensor(labels[sl], dtype=torch.long),
            }
        )
    return out


def build_ours() -> tuple[nn.Module, list[nn.Parameter], object]:
    """MiniLM with lora_flwr's adapter; returns model, trainable params, tokenizer."""
    bundle = load_model(ModelConfig(name="minilm"), seed=0)
    adapter = LoRAAdapter(
        LoraConfig(
            r=R,
            lora_alpha=ALPHA,
            lora_dropout=DROPOUT,
            target_modules=TARGETS,
            modules_to_save=("classifier",),
        ),
        seed=0,
    )
    model = adapter.apply(bundle.model)
    return model, adapter.parameters(), bundle.tokenizer


def build_peft(ours: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
    """MiniLM with PEFT's LoRA, its ``lora_A`` copied from ``ours``."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    base = load_model(ModelConfig(name="minilm"), seed=0).model
    # transformers 5 deprecates an attribute PEFT still reads; not ours to fix.
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
    cfg = PeftLoraConfig(
        r=R,
        lora_alpha=ALPHA,
        lora_dropout=DROPOUT,
        target_modules=list(TARGETS),
        modules_to_save=["classifier"],
        bias="none",
    )
    model = get_peft_model(base, cfg)
    ours_sd = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    copied = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" not in name:
                continue
            # base_model.model.<module>.lora_A.default.weight -> <module>.lora_A.weight
            key = name.removeprefix("base_model.model.").replace(".default.", ".")
            param.copy_(ours_sd[key])
            copied += 1
    assert copied == len(ours_sd), (copied, len(ours_sd))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params


@dataclass
class Side:
    """One model under test and its optimiser."""

    name: str
    model: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer


def make_side(name: str, model: nn.Module, params: list[nn.Parameter]) -> Side:
    """Put ``model`` in train mode and give it an AdamW on ``params``."""
    model.train()
    return Side(name, model, params, torch.optim.AdamW(params, lr=LR))


def train_step(side: Side, batch: dict[str, torch.Tensor]) -> float:
    """One zero_grad + forward + backward + AdamW step; returns the loss."""
    side.optimizer.zero_grad(set_to_none=True)
    loss = side.model(**batch).loss
    loss.backward()
    side.optimizer.step()
    return float(loss.detach())


def timed_step(
    side: Side, batch: dict[str, torch.Tensor], seed: int
) -> tuple[float, float]:
    """Wall and process-CPU seconds of :func:`train_step`, RNG reseeded first.

    CPU time counts only while the process runs, so it is less disturbed by other
    processes taking the cores; it includes OpenMP threads spin-waiting.
    """
    torch.manual_seed(seed)
    c0 = time.process_time()
    t0 = time.perf_counter()
    train_step(side, batch)
    return time.perf_counter() - t0, time.process_time() - c0


# ------------------------------------------------------------- reference
def matmul_gflops(n: int, k: int, m: int, reps: int = 20) -> float:
    """Best-of-``reps`` fp32 GFLOP/s of ``(n, k) @ (k, m)`` at the current threads.

    The best, not the median: on a shared machine the fastest run is the one least
    disturbed by other processes, i.e. the closest to what the cores can do.
    """
    a = torch.randn(n, k)
    b = torch.randn(k, m)
    out = torch.empty(n, m)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        times.append(time.perf_counter() - t0)
    return 2 * n * k * m / min(times) / 1e9


def step_flops(model: nn.Module, batch: int, seq: int) -> dict[str, float]:
    """FLOPs of one training step of the trained path (matmuls only).

    Per token, a frozen linear layer with ``N`` weights costs ``2N`` forward and
    ``2N`` for the input gradient (no weight gradient): ``4N``. A trainable one
    (LoRA A and B) also needs the weight gradient: ``6N``. Attention adds
    ``QK^T`` and ``PV`` (``4 T d`` per token per layer forward) and twice that
    backward. The pooler and classifier act on one token per sequence (ignored).
    This slightly over-counts: layer 0's query/key/value need no input gradient.
    """
    cfg = model.config  # type: ignore[union-attr]
    d, layers, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    tokens = batch * seq
    frozen = layers * (4 * d * d + 2 * d * inter)
    lora = layers * len(TARGETS) * R * (d + d)
    attn = layers * 4 * seq * d  # per token, forward
    total = tokens * (4 * frozen + 6 * lora + 3 * attn)
    return {
        "frozen_linear_params": float(frozen),
        "lora_params": float(lora),
        "flops_per_step": float(total),
    }


# ------------------------------------------------------------- statistics
def summarise(times: list[float]) -> dict[str, float]:
    """Median, quartiles, min of a list of seconds."""
    q1, med, q3 = np.percentile(times, [25, 50, 75])
    return {
        "median_s": float(med),
        "q1_s": float(q1),
        "q3_s": float(q3),
        "iqr_s": float(q3 - q1),
        "min_s": float(min(times)),
    }


def bootstrap_ci(
    values: np.ndarray, stat: Callable[[np.ndarray], float], reps: int = 2000
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of ``stat(values)`` (fixed seed)."""
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(values), size=(reps, len(values)))
    boot = np.array([stat(values[i]) for i in idx])
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(lo), float(hi)


# ------------------------------------------------------------------ main
def sanity_check(
    ours: Side, peft: Side, batches: list[dict[str, torch.Tensor]]
) -> list[tuple[float, float]]:
    """Same seed, same batch: the first steps' losses of both sides."""
    losses = []
    for step in range(SANITY_STEPS):
        batch = batches[step % len(batches)]
        torch.manual_seed(1000 + step)
        a = train_step(ours, batch)
        torch.manual_seed(1000 + step)
        b = train_step(peft, batch)
        losses.append((a, b))
    return losses


def run(threads: int, steps: int, warmup: int, batch: int, seq: int) -> dict:
    """Build both models, check the losses agree, then time interleaved steps."""
    torch.set_num_threads(threads)
    ours_model, ours_params, tokenizer = build_ours()
    peft_model, peft_params = build_peft(ours_model)
    ours = make_side("ours", ours_model, ours_params)
    peft = make_side("peft", peft_model, peft_params)
    n_ours = sum(p.numel() for p in ours.params)
    n_peft = sum(p.numel() for p in peft.params)
    assert n_ours == n_peft, (n_ours, n_peft)

    batches = make_batches(tokenizer, batch, seq, count=8)
    real_share = float(
        torch.stack([b["attention_mask"].float().mean() for b in batches]).mean()
    )
    sanity = sanity_check(ours, peft, batches)
    hidden = ours_model.config.hidden_size
    gemm = [matmul_gflops(1024, 1024, 1024)]
    gemm_model = [matmul_gflops(batch * seq, hidden, 4 * hidden)]

    times: dict[str, list[float]] = {"ours": [], "peft": []}
    cpu: dict[str, list[float]] = {"ours": [], "peft": []}
    for rep in range(warmup + steps):
        data = batches[rep % len(batches)]
        pair = (ours, peft) if rep % 2 == 0 else (peft, ours)
        for side in pair:
            wall, used = timed_step(side, data, seed=rep)
            if rep >= warmup:
                times[side.name].append(wall)
                cpu[side.name].append(used)
        if (rep + 1) % 5 == 0:
            print(f"  threads={threads}: {rep + 1}/{warmup + steps}", file=sys.stderr)

    # Measured before and after the steps; the better of the two is kept.
    gemm.append(matmul_gflops(1024, 1024, 1024))
    gemm_model.append(matmul_gflops(batch * seq, hidden, 4 * hidden))
    flops = step_flops(ours_model, batch, seq)
    tokens = batch * seq
    result: dict = {
        "threads": threads,
        "steps": steps,
        "warmup": warmup,
        "batch": batch,
        "seq": seq,
        "real_token_share": real_share,
        "trainable_params": n_ours,
        "sanity_losses": sanity,
        "matmul_1024_gflops": max(gemm),
        "matmul_model_shape_gflops": max(gemm_model),
        **flops,
    }
    for name, ts in times.items():
        s = summarise(ts)
        s["tokens_per_s"] = tokens / s["median_s"]
        s["gflops"] = flops["flops_per_step"] / s["median_s"] / 1e9
        s["best_gflops"] = flops["flops_per_step"] / s["min_s"] / 1e9
        # Best step against the best matmul: both the least disturbed.
        s["pct_of_matmul"] = 100 * s["best_gflops"] / max(gemm)
        s["cpu_median_s"] = float(np.median(cpu[name]))
        s["times_s"] = ts
        s["cpu_times_s"] = cpu[name]
        result[name] = s
    ratios = np.array(times["ours"]) / np.array(times["peft"])
    result["ratio_median_of_pairs"] = float(np.median(ratios))
    result["ratio_ci95"] = bootstrap_ci(ratios, lambda v: float(np.median(v)))
    cpu_ratios = np.array(cpu["ours"]) / np.array(cpu["peft"])
    result["cpu_ratio_median_of_pairs"] = float(np.median(cpu_ratios))
    result["cpu_ratio_ci95"] = bootstrap_ci(cpu_ratios, lambda v: float(np.median(v)))
    result["ratio_of_medians"] = result["ours"]["median_s"] / result["peft"]["median_s"]
    result["ratio_of_mins"] = result["ours"]["min_s"] / result["peft"]["min_s"]
    return result


def print_report(res: dict) -> None:
    """Print one thread count's table."""
    print(
        f"\n== threads={res['threads']}  batch {res['batch']} x {res['seq']} tokens "
        f"(real {100 * res['real_token_share']:.0f}%), {res['warmup']} warm-up + "
        f"{res['steps']} measured steps each, interleaved"
    )
    print(
        f"fp32 matmul: 1024^3 {res['matmul_1024_gflops']:.1f} GFLOP/s, "
        f"FFN shape ({res['batch'] * res['seq']}x384 @ 384x1536) "
        f"{res['matmul_model_shape_gflops']:.1f} GFLOP/s; "
        f"model FLOPs/step {res['flops_per_step'] / 1e9:.2f} G"
    )
    # tok/s and GFLOP/s at the median step; "best" at the fastest step, whose
    # share of the best matmul rate is the last column.
    print(
        f"{'impl':6} {'median s':>8} {'IQR s':>7} {'min s':>7} {'CPU s':>7} "
        f"{'tok/s':>6} {'GFLOP/s':>7} {'best':>6} {'%matmul':>7}"
    )
    for name in ("ours", "peft"):
        s = res[name]
        print(
            f"{name:6} {s['median_s']:8.3f} {s['iqr_s']:7.3f} {s['min_s']:7.3f} "
            f"{s['cpu_median_s']:7.3f} {s['tokens_per_s']:6.0f} {s['gflops']:7.1f} "
            f"{s['best_gflops']:6.1f} {s['pct_of_matmul']:7.1f}"
        )
    lo, hi = res["ratio_ci95"]
    print(
        f"ours/PEFT: median of paired ratios {res['ratio_median_of_pairs']:.3f} "
        f"(95% bootstrap CI {lo:.3f}-{hi:.3f}); ratio of medians "
        f"{res['ratio_of_medians']:.3f}; ratio of mins {res['ratio_of_mins']:.3f}"
    )
    lo, hi = res["cpu_ratio_ci95"]
    print(
        f"ours/PEFT, process CPU time: median of paired ratios "
        f"{res['cpu_ratio_median_of_pairs']:.3f} (95% bootstrap CI {lo:.3f}-{hi:.3f})"
    )
    pairs = ", ".join(f"{a:.6f} / {b:.6f}" for a, b in res["sanity_losses"])
    print(f"sanity, loss ours / PEFT on steps 1-{len(res['sanity_losses'])}: {pairs}")


def machine() -> dict[str, str]:
    """CPU model name and library versions."""
    cpu = cpu_model_name()
    import peft
    import transformers

    return {
        "cpu": cpu,
        "cpus": str(torch.multiprocessing.cpu_count()),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run each thread count, print and optionally save."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="measured steps each")
    parser.add_argument("--warmup", type=int, default=5, help="discarded steps each")
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    try:
        import peft  # noqa: F401
    except ImportError:
        sys.exit("This benchmark needs peft: pip install -e '.[test]'")
    info = machine()
    print(
        f"{info['cpu']} ({info['cpus']} CPUs), torch {info['torch']}, "
        f"transformers {info['transformers']}, peft {info['peft']}"
    )
    results = []
    for threads in args.threads:
        res = run(threads, args.steps, args.warmup, args.batch, args.seq)
        print_report(res)
        results.append(res)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"machine": info, "runs": results}, fh, indent=2)


if __name__ == "__main__":
    main()
