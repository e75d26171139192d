"""Peak memory and step time with and without checkpointing and a quantized base.

``compute.gradient_checkpointing`` on and off, for each ``model.quantization``
(none, int8, nf4: bitsandbytes' layers under the LoRA factors).

Not a test. SmolLM2-135M-Instruct (built-in ``smollm2-135m``), LoRA r=8 on
``q_proj``/``v_proj`` (the project's defaults), batches of 8 x 256 tokens drawn
from the vocabulary (every position real, so no padding shrinks the work), AdamW
through :class:`~lora_flwr.training.LoRATrainer`, the client's own loop.

Each setting runs in a fresh subprocess, so its peak is its own: ``tracemalloc``
does not see torch's allocations, so the peak is the process's maximum resident
set (``resource.getrusage``), next to the resident set after the model is built
(the training's own share is the difference). On CUDA the peak is
``torch.cuda.max_memory_allocated`` instead. Step time is the median over the
steps after the first (warm-up).

Usage::

    PYTHONPATH=. python benchmarks/checkpointing.py [--steps 4] [--threads 2]
        [--implementation native transformers] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BATCH, SEQ = 8, 256


def _rss_mb() -> float:
    """Resident set of this process now (Linux /proc), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(
    implementation: str,
    checkpointing: bool,
    steps: int,
    threads: int,
    quantization: str = "none",
) -> dict[str, Any]:
    """Train ``steps`` steps in this process; return its memory and step times."""
    import torch

    from lora_flwr.config import ComputeConfig, LoraConfig, ModelConfig, TrainConfig
    from lora_flwr.data import TokenizedDataset
    from lora_flwr.lora import LoRAAdapter
    from lora_flwr.models import load_model
    from lora_flwr.models.quantize import quantize_linears
    from lora_flwr.training import LoRATrainer

    torch.set_num_threads(threads)
    cfg = ModelConfig(
        name="smollm2-135m", task="causal_lm", implementation=implementation
    )
    bundle = load_model(cfg, seed=0)
    if quantization != "none":
        quantize_linears(bundle.model, quantization)
    adapter = LoRAAdapter(LoraConfig(r=8, lora_alpha=16.0, lora_dropout=0.05), seed=0)
    adapter.apply(bundle.model)
    vocab = int(bundle.model.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, vocab, (BATCH * steps, SEQ), generator=generator)
    data = TokenizedDataset(tuple(rows), None, "causal_lm", 0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    trainer = LoRATrainer(
        adapter,
        "causal_lm",
        TrainConfig(lr=1e-4, batch_size=BATCH, local_steps=steps),
        compute=ComputeConfig(
            device=device, gradient_checkpointing=checkpointing, progress_every=0.0
        ),
    )
    loaded = _rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stamps = [time.perf_counter()]

    def on_step(step: int, loss: float) -> None:
        if device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    metrics = trainer.train(data, seed=0, progress=False, on_step=on_step)
    times = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    out = {
        "implementation": implementation,
        "quantization": quantization,
        "gradient_checkpointing": checkpointing,
        "rss_after_load_mib": round(loaded, 1),
        # ru_maxrss is in KiB on Linux
        "peak_rss_mib": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
        ),
        "step_seconds": [round(t, 3) for t in times],
        "median_step_seconds": round(statistics.median(times[1:] or times), 3),
        "train_loss": metrics["train_loss"],
    }
    if device == "cuda":
        out["cuda_peak_allocated_mib"] = round(
            torch.cuda.max_memory_allocated() / 2**20, 1
        )
    return out


def _child(
    args: argparse.Namespace, implementation: str, quantization: str, on: bool
) -> dict[str, Any]:
    """Run one setting in a fresh interpreter; return its JSON line."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        implementation,
        quantization,
        "on" if on else "off",
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
    ]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    """Run every setting in its own process; print a table (and ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--implementation",
        nargs="+",
        default=["native"],
        choices=["native", "transformers"],
    )
    parser.add_argument(
        "--quantization",
        nargs="+",
        default=["none", "int8", "nf4"],
        choices=["none", "int8", "nf4"],
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, quant, on = args.child
        print(json.dumps(measure(impl, on == "on", args.steps, args.threads, quant)))
        return
    from lora_flwr.machine import cpu_model_name

    head = ("implementation", "quant", "ckpt", "load MiB", "peak MiB", "s/step")
    print(
        f"{head[0]:<13} {head[1]:<5} {head[2]:<5} {head[3]:>9} {head[4]:>9} "
        f"{head[5]:>7}  loss"
    )
    rows = []
    settings = [
        (impl, quant, on)
        for impl in args.implementation
        for quant in args.quantization
        for on in (False, True)
    ]
    for impl, quant, on in settings:
        r = _child(args, impl, quant, on)  # each row as it comes: minutes each
        rows.append(r)
        print(
            f"{r['implementation']:<13} {r['quantization']:<5} "
            f"{str(r['gradient_checkpointing']):<5} "
            f"{r['rss_after_load_mib']:>9.0f} {r['peak_rss_mib']:>9.0f} "
            f"{r['median_step_seconds']:>7.2f}  {r['train_loss']:.6f}",
            flush=True,
        )
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": cpu_model_name(),
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "batch": BATCH,
        "seq": SEQ,
        "steps": args.steps,
        "threads": args.threads,
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
