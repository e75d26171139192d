"""Device check: the CUDA (+ bf16 autocast) path of LoRA, the plan runner, the trainer.

Three FLoRA rounds on the smoke config (tiny BERT built in code, synthetic text) on
whatever device ``compute.device = "auto"`` picks, at rank 4, 2 and 4, with FedProx:
training loss, time, aggregation error, held-out loss before/after, and whether the
node's folded base delta has the same bits as the server's. Needs no Flower, Ray or
downloads, so it runs on a bare GPU machine:

    PYTHONPATH=. python benchmarks/device_check.py
"""

import json
import time

import numpy as np
import torch

from lora_flwr.aggregation import ClientInfo, ClientReply, get_rule
from lora_flwr.config import ExperimentConfig
from lora_flwr.experiment import centralized_train_data, get_workspace, heldout_data
from lora_flwr.fl.runner import MemoryStore, finish, layout_of, prepare

out = {
    "torch": torch.__version__,
    "cuda": torch.cuda.is_available(),
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
}
for precision in ("fp32", "bf16"):
    cfg = ExperimentConfig.from_toml("configs/smoke.toml").with_overrides(
        ["compute.device=auto", f"compute.precision={precision}", "lora.r=4"]
    )
    ws = get_workspace(cfg)
    ws.reset_adapter()
    dev = str(next(ws.bundle.model.parameters()).device)
    train, test = centralized_train_data(ws, cfg), heldout_data(ws, cfg)
    layout = layout_of(ws.adapter)
    rule = get_rule("flora")(layout, ws.initial, cfg.lora.scaling)
    state = rule.init_state()
    store = MemoryStore()
    rec = {"device": dev}
    before = ws.trainer.evaluate(test, progress=False)["loss"]
    for rnd in (1, 2, 3):
        plan = rule.plan(
            state, ClientInfo(0, 2 if rnd == 2 else 4, store.base_version()), rnd
        )
        prepare(ws.adapter, ws.initial, plan, rule.payload(state, plan), store)
        t = time.perf_counter()
        m = ws.trainer.train(train, steps=20, seed=rnd, progress=False, prox_mu=0.01)
        rec[f"round{rnd}_s"] = time.perf_counter() - t
        rec[f"round{rnd}_loss"] = m["train_loss"]
        arrays = dict(
            zip(
                [n for n, _ in rule.reply_spec(plan)],
                finish(ws.adapter, plan, store),
                strict=True,
            )
        )
        reply = ClientReply(0, plan, arrays, 100, rule.start_arrays(state, plan))
        held = {m: d.copy() for m, d in state.base_delta.items()}
        new = rule.aggregate(state, [reply], rnd)
        rec[f"round{rnd}_agg_error"] = rule.aggregation_error(state, new, [reply])
        state = new
    # server-side evaluation of the folded global vs the node's delta (same bits?)
    ws.adapter.set_base_delta(dict(state.base_delta))
    ws.adapter.set_named_weights(rule.global_arrays(state))
    rec["after_loss"] = ws.trainer.evaluate(test, progress=False)["loss"]
    rec["before_loss"] = before
    # The node holds the version it trained on (the server folded one more since).
    rec["node_delta_equals_server_version"] = all(
        np.array_equal(store.base_delta()[m], held[m]) for m in held
    )
    out[precision] = rec
print(json.dumps(out, indent=1))
