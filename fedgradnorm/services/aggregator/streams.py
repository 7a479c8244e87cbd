"""Node streams: at most one FetchRound and one SubmitUpdate in flight per node, each with a deadline.

Every waiting or sending stream holds a worker thread of the gRPC server. Bounding them per node
bounds them in all (two per node, so 2 x max_nodes), and the server sizes its pool with threads to
spare for health, GetState, Register and Heartbeat (server.py), whatever one node opens. A watchdog
thread cancels a stream that outlives its deadline (a client that stops reading its FetchRound, or
uploads at a trickle) and the older FetchRound of a node that opened a newer one (a node that
reconnects before its dead stream was noticed takes over at once).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import structlog

log = structlog.get_logger("fedgradnorm.aggregator")

FETCH, SUBMIT = "fetch", "submit"


class StreamBusy(Exception):
    """The node already has a stream of this kind in flight."""


@dataclass(eq=False)
class Stream:
    node_id: str
    kind: str
    context: grpc.ServicerContext
    deadline: float = math.inf  # time.monotonic() after which the watchdog cancels the stream
    cancelled: str = ""  # why the guard cancelled it ("" while it runs)

    def expire_at_unix(self, deadline_unix: float, grace: float) -> None:
        """Set the deadline from a wall-clock instant (a round's deadline) plus ``grace`` seconds."""
        self.deadline = time.monotonic() + (deadline_unix - time.time()) + grace


class StreamGuard:
    def __init__(self, tick: float = 0.25) -> None:
        self.tick = tick
        self.cancelled = {"replaced": 0, "deadline": 0}
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], Stream] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stream-guard", daemon=True)
        self._thread.start()

    @contextmanager
    def fetch(self, node_id: str, context: grpc.ServicerContext) -> Iterator[Stream]:
        """The node's FetchRound; an older one of the same node is cancelled."""
        stream = Stream(node_id, FETCH, context)
        with self._lock:
            older = self._open.get((node_id, FETCH))
            self._open[(node_id, FETCH)] = stream
        if older is not None:
            self._cancel(older, "replaced")
        try:
            yield stream
        finally:
            self._release(stream)

    @contextmanager
    def submit(
        self, node_id: str, context: grpc.ServicerContext, deadline_unix: float, grace: float
    ) -> Iterator[Stream]:
        """The node's SubmitUpdate; StreamBusy while another one of the node is in flight."""
        stream = Stream(node_id, SUBMIT, context)
        stream.expire_at_unix(deadline_unix, grace)
        with self._lock:
            if (node_id, SUBMIT) in self._open:
                raise StreamBusy(f"node {node_id!r} already has a SubmitUpdate in flight")
            self._open[(node_id, SUBMIT)] = stream
        try:
            yield stream
        finally:
            self._release(stream)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _release(self, stream: Stream) -> None:
        with self._lock:
            if self._open.get((stream.node_id, stream.kind)) is stream:
                del self._open[(stream.node_id, stream.kind)]

    def _cancel(self, stream: Stream, why: str) -> None:
        with self._lock:
            if stream.cancelled:
                return
            stream.cancelled = why
            self.cancelled[why] += 1
        log.warning("stream.cancelled", node=stream.node_id, rpc=stream.kind, why=why)
        stream.context.cancel()  # wakes a handler blocked on a send or a receive of this stream

    def _watch(self) -> None:
        while not self._stop.wait(self.tick):
            now = time.monotonic()
            with self._lock:
                overdue = [s for s in self._open.values() if s.deadline < now and not s.cancelled]
            for s in overdue:
                self._cancel(s, "deadline")
