"""Process hygiene at fixed moments of a run, in one place.

The apps call these hooks and nothing else of :mod:`lora_flwr.heap`:

* :func:`on_process_start` where a process takes up its role: the simulation's
  driver before the engine starts (``"server"``), and every ``client_fn`` call
  (``"client"``; a worker process builds many clients, and the hook is cheap and
  idempotent, so it runs each time rather than once).
* :func:`after_round` after a process's heavy share of a round: a client's ``fit``,
  the server's centralised evaluation.

Both roles get the same treatment today (one malloc arena, a heap trim); the role
says which moment is meant, so a role can change without touching the apps.
"""

from __future__ import annotations

from typing import Literal

from lora_flwr.heap import limit_arenas, trim_heap

Role = Literal["server", "client"]
ROLES: tuple[Role, ...] = ("server", "client")


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"`role` should be one of {list(ROLES)}, not {role!r}")


def on_process_start(role: Role) -> None:
    """Prepare this process for ``role`` before it allocates much.

    One glibc malloc arena (:func:`lora_flwr.heap.limit_arenas`): freed
    activations then go back to the system on :func:`after_round` instead of
    staying in per-thread arenas. Takes effect for arenas created afterwards.

    Raises
    ------
    ValueError
        For a role other than ``"server"`` or ``"client"``.
    """
    _check_role(role)
    limit_arenas(1)


def after_round(role: Role) -> None:
    """Give the heap's free pages back after ``role``'s heavy work of a round.

    A worker serves client after client and the server evaluates every round in
    one process; glibc would otherwise keep the freed pages
    (:func:`lora_flwr.heap.trim_heap`).

    Raises
    ------
    ValueError
        For a role other than ``"server"`` or ``"client"``.
    """
    _check_role(role)
    trim_heap()
