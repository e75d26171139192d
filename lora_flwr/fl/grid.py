"""A Grid that collects replies soon after they arrive.

Flower 1.42's gRPC grid (what a ServerApp gets in a deployment) pushes a message
and then asks the SuperLink for the reply every 3 s, so each client call's reply
waits 1.5 s on average after it arrived, once per call and round. The legacy server
loop calls ``send_and_receive`` once per client. :class:`PromptGrid` wraps the
grid it is given and polls instead at a fixed fraction of the time waited so far
(``fraction * elapsed``, between ``first`` and ``longest`` seconds): a reply that
lands after ``t`` seconds is collected within about ``fraction * t`` of it, and a
call waiting ``T`` seconds makes about ``1 / fraction`` requests in its first
``first / fraction`` seconds and ``log(T fraction / first) / log(1 + fraction)``
after (≈ 70 for 10 s with the defaults; one small gRPC call each). Every other
method is the wrapped grid's own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.server import Grid
from flwr.supercore.run import Run


class PromptGrid(Grid):
    """Wrap ``grid``; poll for replies at ``fraction`` of the time waited.

    Parameters
    ----------
    grid
        The grid Flower handed the ServerApp.
    first, longest
        Shortest and longest wait between two pulls, seconds.
    fraction
        Wait this share of the time waited so far before the next pull.
    sleep, clock
        Injected for tests; ``time.sleep`` and ``time.monotonic`` by default.
    """

    def __init__(
        self,
        grid: Grid,
        *,
        first: float = 0.05,
        fraction: float = 0.05,
        longest: float = 3.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < first <= longest:
            raise ValueError(
                f"PromptGrid needs 0 < first <= longest, got first={first}, "
                f"longest={longest}"
            )
        if fraction <= 0:
            raise ValueError(f"`fraction` should be > 0 but the value is {fraction}")
        self.inner = grid
        self.first, self.fraction, self.longest = first, fraction, longest
        self._sleep, self._clock = sleep, clock
        self.pulls = 0  # requests made by send_and_receive, for tests and profiles

    def set_run(self, run: Run) -> None:
        """Set the run on the wrapped grid."""
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        """The wrapped grid's run."""
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Create a message on the wrapped grid."""
        return self.inner.create_message(
            content, message_type, dst_node_id, group_id, ttl
        )

    def get_node_ids(self) -> Iterable[int]:
        """Return the wrapped grid's node ids."""
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        """Return the wrapped grid's nodes."""
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push through the wrapped grid."""
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull through the wrapped grid."""
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``; pull until every reply is in or ``timeout`` passed."""
        waiting = set(self.push_messages(messages))
        start = self._clock()
        replies: list[Message] = []
        while waiting:
            self.pulls += 1
            got = list(self.pull_messages(waiting))
            replies.extend(got)
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if not waiting:
                break
            elapsed = self._clock() - start
            if timeout is not None and elapsed >= timeout:
                break
            wait = min(self.longest, max(self.first, self.fraction * elapsed))
            if timeout is not None:
                wait = min(wait, timeout - elapsed)
            self._sleep(wait)
        return replies
