"""The label-skew head refit's messages: every node's class statistics, in parallel.

The decisions (when, which answers count, the LDA fit) are the round core's
(:mod:`lora_flwr.server.head`); this module asks the nodes and counts the bytes.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flwr.common import Code, EvaluateIns, EvaluateRes
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy

from lora_flwr.fl.handshake import Handshake
from lora_flwr.fl.messages import Instruction, send_plans
from lora_flwr.protocol import HEAD_STATS
from lora_flwr.server.core import RoundCore
from lora_flwr.server.head import StatsAnswer
from lora_flwr.server.sampling import EVALUATE_STREAM


def refit_head(
    core: RoundCore,
    handshake: Handshake,
    client_manager: ClientManager,
    server_round: int,
) -> dict[str, Any]:
    """Ask every node for its head statistics; refit the global head.

    Returns
    -------
    dict
        History fields: ``calib_clients``, ``calib_examples``, ``calib_seconds``,
        ``bytes_up_calib``, ``bytes_down_calib`` and, if the head was kept,
        ``calib_error``.
    """
    start = time.perf_counter()
    clients = handshake.sample(
        client_manager,
        server_round,
        1.0,
        core.cfg.sampling.min_available,
        EVALUATE_STREAM,
    )
    instructions, sent = send_plans(core, clients, server_round, evaluate=True)

    def ask(item: Instruction) -> tuple[ClientProxy, EvaluateRes | BaseException]:
        proxy, parameters, config = item
        ins = EvaluateIns(parameters, {**config, HEAD_STATS: True})
        try:
            return proxy, proxy.evaluate(ins, timeout=None, group_id=server_round)
        except Exception as exc:  # a node that cannot answer is left out
            return proxy, exc

    with ThreadPoolExecutor(max_workers=max(1, min(32, len(instructions)))) as ex:
        answers = list(ex.map(ask, instructions))
    up = 0
    stats: list[StatsAnswer] = []
    for proxy, res in answers:
        pid = sent[proxy.cid].partition if proxy.cid in sent else None
        if isinstance(res, EvaluateRes):
            raw = res.metrics.get(HEAD_STATS)
            up += len(raw) if isinstance(raw, bytes) else 0
        stats.append(_stats_answer(proxy.cid, pid, res))
    out = core.refit_head(server_round, stats)
    out["bytes_down_calib"] = sum(s.nbytes for s in sent.values())
    out["bytes_up_calib"] = up
    out["calib_seconds"] = time.perf_counter() - start
    return out


def _stats_answer(
    node: str, partition: int | None, res: EvaluateRes | BaseException
) -> StatsAnswer:
    """Return a node's ``head_stats`` answer in plain values."""
    if isinstance(res, BaseException):
        return StatsAnswer(node, partition, error=f"no reply: {res!r}")
    if res.status.code != Code.OK:
        error = f"status {res.status.code}: {res.status.message}"
        return StatsAnswer(node, partition, error=error)
    return StatsAnswer(node, partition, None, res.num_examples, res.metrics)
