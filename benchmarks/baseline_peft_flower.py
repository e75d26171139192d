"""The comparison app: PEFT + plain Flower FedAvg, as the usual template builds it.

    PYTHONPATH=. python benchmarks/baseline_peft_flower.py
        [--config configs/default.toml] [--out baseline.json] [--precision fp32|bf16]
        [--seed N]

Only public APIs: ``transformers`` loads the model, PEFT's ``get_peft_model`` adds
LoRA (same rank, alpha, dropout, targets and trained head as the config), Flower's
``FedAvg`` averages every tensor the client returns, and each client call rebuilds
the model from disk (the FlowerTune template's way: a ClientApp keeps nothing
between messages). Same data (partitions, held-out subset), same local steps,
batch size, lr, optimizer (AdamW) and gradient clipping as ``lora_flwr``, and the
same number of Ray actors, so that ``time_to_accuracy.py`` can set the two side by
side. This file is a measurement, not part of the package.

Writes a JSON list of rounds: ``round``, ``test_accuracy``, ``test_loss``,
``round_seconds`` (from the end of one round's evaluation to the end of the next,
as lora_flwr's history counts it) and the process wall time.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.simulation import run_simulation
from peft import (
    LoraConfig,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lora_flwr.assets import fetch_asset
from lora_flwr.config import ExperimentConfig
from lora_flwr.data.datasets import eval_subset, load_splits
from lora_flwr.data.partition import client_data
from lora_flwr.server.record import ROUND, ROUND_SECONDS, TEST_ACCURACY, TEST_LOSS

ROOT = Path(__file__).resolve().parents[1]


def build_model(cfg: ExperimentConfig) -> tuple[Any, Any]:
    """Load MiniLM from disk and wrap it with PEFT LoRA, seeded like a user would."""
    torch.manual_seed(cfg.seed)
    path = fetch_asset("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=cfg.model.num_labels, ignore_mismatched_sizes=True
    )
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=int(cfg.lora.lora_alpha),
        lora_dropout=cfg.lora.lora_dropout,
        target_modules=list(cfg.lora.target_modules),
        modules_to_save=list(cfg.lora.modules_to_save),
        task_type="SEQ_CLS",
    )
    return get_peft_model(base, lora), tokenizer


def _state(model: Any) -> list[np.ndarray]:
    return [v.detach().cpu().numpy() for v in get_peft_model_state_dict(model).values()]


def _load(model: Any, arrays: Sequence[np.ndarray]) -> None:
    keys = list(get_peft_model_state_dict(model).keys())
    state = {
        k: torch.from_numpy(np.array(a)) for k, a in zip(keys, arrays, strict=True)
    }
    set_peft_model_state_dict(model, state)


def _autocast(precision: str) -> Any:
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def evaluate(
    model: Any, tokenizer: Any, texts: Sequence[str], labels: Sequence[int], cfg: Any
) -> tuple[float, float]:
    """Held-out loss and accuracy, batched like lora_flwr's evaluation."""
    model.eval()
    loss_sum, correct = 0.0, 0
    bs = cfg.eval.batch_size
    with torch.no_grad(), _autocast(cfg.compute.precision):
        for i in range(0, len(texts), bs):
            batch = tokenizer(
                list(texts[i : i + bs]),
                truncation=True,
                max_length=cfg.model.max_length,
                padding=True,
                return_tensors="pt",
            )
            y = torch.tensor(labels[i : i + bs])
            out = model(**batch, labels=y)
            loss_sum += float(out.loss) * len(y)
            correct += int((out.logits.argmax(-1) == y).sum())
    return loss_sum / len(texts), correct / len(texts)


class Client(NumPyClient):
    """Rebuilds the model in each call, trains ``local_steps`` AdamW steps."""

    def __init__(self, cfg: ExperimentConfig, pid: int, num: int) -> None:
        self.cfg, self.pid, self.num = cfg, pid, num

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        cfg = self.cfg
        model, tokenizer = build_model(cfg)
        _load(model, parameters)
        train, _ = client_data(cfg.data, self.pid, self.num, seed=cfg.seed)
        labels = list(train.labels or ())
        rng = np.random.default_rng([cfg.seed, int(config["round"]), self.pid])
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=0.0)
        model.train()
        for _ in range(cfg.train.local_steps):
            idx = rng.choice(len(labels), size=cfg.train.batch_size, replace=False)
            batch = tokenizer(
                [train.texts[i] for i in idx],
                truncation=True,
                max_length=cfg.model.max_length,
                padding=True,
                return_tensors="pt",
            )
            with _autocast(cfg.compute.precision):
                loss = model(
                    **batch, labels=torch.tensor([labels[i] for i in idx])
                ).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            optimizer.step()
        return _state(model), len(labels), {}


def main() -> None:
    """Run the baseline federation and write its per-round history."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs/default.toml")
    parser.add_argument("--out", type=Path, default=Path("baseline.json"))
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--seed", type=int, default=None, help="default: the config's")
    args = parser.parse_args()
    overrides = [f"compute.precision={args.precision}"]
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    cfg = ExperimentConfig.from_toml(args.config).with_overrides(overrides)
    if cfg.model.name != "minilm" or cfg.model.task not in ("auto", "seq_cls"):
        raise SystemExit(
            f"the comparison app builds MiniLM for classification; {args.config} asks "
            f"for model {cfg.model.name!r} ({cfg.model.task})"
        )
    fed = cfg.fed
    start = time.perf_counter()
    model, tokenizer = build_model(cfg)
    splits = load_splits(cfg.data, seed=cfg.seed)
    test = eval_subset(splits.test, cfg.eval.max_examples, seed=cfg.seed)
    history: list[dict[str, Any]] = []
    last = [time.perf_counter()]

    def evaluate_fn(
        server_round: int, arrays: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, dict[str, float]]:
        _load(model, arrays)
        loss, acc = evaluate(model, tokenizer, test.texts, list(test.labels or ()), cfg)
        now = time.perf_counter()
        history.append(
            {
                ROUND: server_round,
                TEST_LOSS: loss,
                TEST_ACCURACY: acc,
                ROUND_SECONDS: now - last[0] if server_round else None,
                "wall": now - start,
            }
        )
        last[0] = now
        print(f"round {server_round}: accuracy {acc:.4f} loss {loss:.4f}", flush=True)
        return loss, {"accuracy": acc}

    def server_fn(context: Context) -> ServerAppComponents:
        strategy = FedAvg(
            fraction_fit=cfg.sampling.fraction,
            fraction_evaluate=0.0,
            min_fit_clients=cfg.sampling.min_clients,
            min_available_clients=cfg.sampling.min_available,
            initial_parameters=ndarrays_to_parameters(_state(model)),
            evaluate_fn=evaluate_fn,
            on_fit_config_fn=lambda rnd: {"round": rnd},
        )
        return ServerAppComponents(
            strategy=strategy, config=ServerConfig(num_rounds=fed.num_rounds)
        )

    def client_fn(context: Context) -> Any:
        pid = int(context.node_config["partition-id"])
        num = int(context.node_config["num-partitions"])
        return Client(cfg, pid, num).to_client()

    run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=ClientApp(client_fn=client_fn),
        num_supernodes=fed.num_clients,
        backend_config={
            "client_resources": {"num_cpus": cfg.compute.client_cpus, "num_gpus": 0}
        },
    )
    for rec in history:
        rec["process_wall"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(history, indent=1))
    print(f"wrote {args.out} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
