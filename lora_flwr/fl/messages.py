"""The core's plans as Flower messages: serialized payloads, counted in bytes."""

from __future__ import annotations

from collections.abc import Sequence

from flwr.common import Parameters, Scalar, ndarrays_to_parameters
from flwr.server.client_proxy import ClientProxy

from lora_flwr.server.core import RoundCore
from lora_flwr.server.replies import Sent

Instruction = tuple[ClientProxy, Parameters, dict[str, Scalar]]


def parameters_nbytes(parameters: Parameters) -> int:
    """Bytes of the serialized tensors in ``parameters``."""
    return sum(len(t) for t in parameters.tensors)


def send_plans(
    core: RoundCore,
    clients: Sequence[tuple[ClientProxy, int]],
    server_round: int,
    *,
    evaluate: bool,
) -> tuple[list[Instruction], dict[str, Sent]]:
    """Serialize each sampled client's plan; return the messages and what was sent.

    ``clients`` are ``(node, partition)`` pairs; the returned map says, per node,
    the plan, the arrays it starts from and the bytes of its payload, which its
    reply is checked against.
    """
    planned = core.plans(server_round, [pid for _, pid in clients], evaluate=evaluate)
    out: list[Instruction] = []
    sent: dict[str, Sent] = {}
    for (proxy, _), plan in zip(clients, planned, strict=True):
        with core.phase("server_serialization"):
            parameters = ndarrays_to_parameters(plan.payload)
        nbytes = parameters_nbytes(parameters)
        sent[proxy.cid] = Sent(plan.partition, plan.plan, plan.start, nbytes)
        out.append((proxy, parameters, plan.config))
    return out, sent
