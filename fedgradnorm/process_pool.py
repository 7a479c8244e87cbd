"""A simulated round's clients in persistent worker processes, with the sequential simulator's result.

Each worker (a ``spawn`` process) pins its torch threads, then builds a fixed share of the clients once
(round robin over the clients' order) and keeps them for the whole run: data, head, Adam moments, F_0.
Per round the parent writes omega_k into one shared-memory buffer and sends each worker the round
number; a worker runs its clients one after the other exactly as :class:`~fedgradnorm.client_pool.InProcessPool`
does (omega loaded into its own shared-network module, ``LocalClient.run_round``), writes each
client's gradient into that client's shared buffer and sends back its loss, loss ratio and evaluation
(a few floats). Nothing of 15 MB is pickled per round: pickling a Network 2 gradient there and back
took ten times as long as the two in-place copies.

A worker that raises or dies fails the round with a :class:`ClientProcessError` naming the client: the
parent waits on every worker's pipe and process sentinel at once, so a death wakes it at once (no
timeout that a long round could outrun). :meth:`ProcessPool.close` stops every worker: a ``stop``
message between rounds, SIGTERM then SIGKILL otherwise (an error, Ctrl+C). Workers ignore SIGINT
(Ctrl+C reaches the whole process group; the parent decides), and a worker whose parent is gone
finds its pipe closed and exits.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedgradnorm.client import LocalClient
from fedgradnorm.client_pool import ClientInfo, ClientRoundResult, run_client_round
from fedgradnorm.errors import FatalError

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from fedgradnorm.algorithm import ClientConfig
    from fedgradnorm.data.partition import ClientData
    from fedgradnorm.federation import Federation

ALIGN_BYTES = 64  # every tensor of a flat buffer starts on a cache line, as torch's own allocations do
STOP_GRACE_S = 10.0  # a worker told to stop between rounds exits at once; this bounds the wait
TERMINATE_GRACE_S = 5.0  # after SIGTERM, before SIGKILL


class ClientProcessError(FatalError):
    """A client's worker process raised or died; the simulation cannot go on."""

    def __init__(self, client: str, message: str) -> None:
        self.client = client
        super().__init__(message)


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker process (the cause of a ClientProcessError)."""

    def __str__(self) -> str:
        return "\n" + str(self.args[0])


@dataclass(frozen=True)
class FlatLayout:
    """Named tensors packed into one flat buffer per dtype, each at a 64-byte aligned offset."""

    entries: tuple[tuple[str, tuple[int, ...], torch.dtype, int], ...]  # name, shape, dtype, offset
    sizes: tuple[tuple[torch.dtype, int], ...]  # elements per dtype's buffer

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> FlatLayout:
        ends: dict[torch.dtype, int] = {}
        entries = []
        for name, t in tensors.items():
            step = max(1, ALIGN_BYTES // t.element_size())
            at = -(-ends.get(t.dtype, 0) // step) * step
            entries.append((name, tuple(t.shape), t.dtype, at))
            ends[t.dtype] = at + t.numel()
        return cls(tuple(entries), tuple(ends.items()))

    def shared_buffers(self) -> dict[torch.dtype, torch.Tensor]:
        """Fresh buffers in shared memory (with torch's default sharing on Linux, unlinked file descriptors:
        nothing is left in /dev/shm whatever way the processes end)."""
        return {dtype: _shared_empty(size, dtype) for dtype, size in self.sizes}

    def views(self, buffers: Mapping[torch.dtype, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: buffers[dtype][at : at + math.prod(shape)].view(shape) for name, shape, dtype, at in self.entries}


def _shared_empty(size: int, dtype: torch.dtype) -> torch.Tensor:
    t = torch.empty(max(1, size), dtype=dtype)
    t.share_memory_()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
    return t


@dataclass(frozen=True)
class _Setup:
    """What a worker builds its clients from (sent once, after it has pinned its threads)."""

    federation: Federation
    data: dict[str, ClientData]
    client_config: ClientConfig
    seed: int
    omega_layout: FlatLayout
    omega_buffers: dict[torch.dtype, torch.Tensor]
    gradient_layout: FlatLayout
    gradient_buffers: dict[str, dict[torch.dtype, torch.Tensor]]


def shares(names: tuple[str, ...], workers: int) -> list[tuple[str, ...]]:
    """The clients each of ``workers`` workers holds: round robin over the clients' order."""
    return [names[index::workers] for index in range(workers)]


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    conn: Connection
    names: tuple[str, ...]


class ProcessPool:
    """The clients of ``data`` (in its order) in ``workers`` processes of ``threads`` torch threads each.

    ``omega`` gives the names, shapes and dtypes of the global model (the server state's tensors) and
    ``shared`` those of the gradients (the network's parameters); both only shape the shared buffers."""

    def __init__(
        self,
        federation: Federation,
        data: Mapping[str, ClientData],
        client_config: ClientConfig,
        seed: int,
        *,
        workers: int,
        threads: int,
        omega: Mapping[str, torch.Tensor],
        shared: nn.Module,
    ) -> None:
        if not 1 <= workers <= len(data):
            raise ValueError(f"workers must be between 1 and the number of clients ({len(data)}), not {workers}")
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        self._names = tuple(data)
        self._workers: list[_Worker] = []
        self._in_flight = True  # until every worker has built its clients
        self._closed = False
        self._failed = False
        self._members: dict[str, ClientInfo] = {}
        omega_layout = FlatLayout.of(omega)
        omega_buffers = omega_layout.shared_buffers()
        self._omega = omega_layout.views(omega_buffers)
        gradient_layout = FlatLayout.of(dict(shared.named_parameters()))
        gradient_buffers = {name: gradient_layout.shared_buffers() for name in self._names}
        self._gradients = {name: gradient_layout.views(b) for name, b in gradient_buffers.items()}
        ctx = multiprocessing.get_context("spawn")
        try:
            for index, names in enumerate(shares(self._names, workers)):
                parent_end, child_end = ctx.Pipe()
                process = ctx.Process(
                    target=_worker_main,
                    args=(child_end, threads),
                    name=f"fedgradnorm-clients-{index}",
                    daemon=True,  # multiprocessing terminates it at exit should close() never run
                )
                process.start()
                child_end.close()
                self._workers.append(_Worker(index, process, parent_end, names))
            for w in self._workers:
                setup = _Setup(
                    federation=federation,
                    data={n: data[n] for n in w.names},
                    client_config=client_config,
                    seed=seed,
                    omega_layout=omega_layout,
                    omega_buffers=omega_buffers,
                    gradient_layout=gradient_layout,
                    gradient_buffers={n: gradient_buffers[n] for n in w.names},
                )
                self._send(w, setup, "before building its clients")
            infos = self._collect("while building its clients")
            self._members = {n: infos[n] for n in self._names}
            self._in_flight = False
        except BaseException:
            self.close()
            raise

    @property
    def members(self) -> Mapping[str, ClientInfo]:
        return self._members

    @property
    def pids(self) -> tuple[int, ...]:
        """The worker processes' ids (for tests and operators)."""
        return tuple(w.process.pid or 0 for w in self._workers)

    def run_round(self, omega: Mapping[str, torch.Tensor], round_: int) -> list[ClientRoundResult]:
        """As :meth:`ClientPool.run_round`; the gradients are views of this pool's shared buffers."""
        if self._closed or self._failed:
            raise FatalError("the client worker processes are " + ("closed" if self._closed else "stopped by an error"))
        self._in_flight = True
        try:
            for name, view in self._omega.items():
                view.copy_(omega[name])
            during = f"in round {round_}"
            for w in self._workers:
                self._send(w, ("round", round_), during)
            payloads = self._collect(during)
        except BaseException:
            self._failed = True
            raise
        self._in_flight = False
        return [ClientRoundResult(n, self._gradients[n], *payloads[n]) for n in self._names]

    def close(self) -> None:
        """Stop every worker: between rounds by a message, else (a round in flight, an error) by SIGTERM,
        then SIGKILL; every process is reaped."""
        if self._closed:
            return
        self._closed = True
        graceful = not self._in_flight and not self._failed
        if graceful:
            for w in self._workers:
                with contextlib.suppress(OSError):
                    w.conn.send(("stop",))
        deadline = time.monotonic() + (STOP_GRACE_S if graceful else 0.0)
        for w in self._workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.exitcode is None:
                w.process.terminate()
                w.process.join(TERMINATE_GRACE_S)
            if w.process.exitcode is None:
                w.process.kill()
                w.process.join()
            w.conn.close()

    # -- the parent's side of the pipes ------------------------------------------------------------

    def _send(self, w: _Worker, message: object, during: str) -> None:
        try:
            w.conn.send(message)
        except OSError:  # the worker is gone: its end of the pipe is closed
            raise self._died(w, w.names[0], during) from None

    def _collect(self, during: str) -> dict[str, Any]:
        """Every worker's ``done`` payloads, one per client; raises on the first error or death."""
        todo = {w.index: list(w.names) for w in self._workers}
        payloads: dict[str, Any] = {}
        while any(todo.values()):
            busy = [w for w in self._workers if todo[w.index]]
            ready = multiprocessing.connection.wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
            for w in busy:
                left = todo[w.index]  # a worker runs its clients in order: left[0] is the one at work
                try:
                    while left and w.conn.poll():
                        kind, name, payload = w.conn.recv()
                        if kind == "error":
                            summary, remote = payload
                            raise ClientProcessError(
                                name, f"client {name!r} failed {during} (worker process {w.process.pid}): {summary}"
                            ) from RemoteTraceback(remote)
                        payloads[name] = payload
                        left.remove(name)
                except (EOFError, OSError):
                    raise self._died(w, left[0], during) from None
                if left and w.process.sentinel in ready:
                    raise self._died(w, left[0], during)
        return payloads

    def _died(self, w: _Worker, client: str, during: str) -> ClientProcessError:
        w.process.join(TERMINATE_GRACE_S)
        code = w.process.exitcode
        if code is None:
            how = "closed its pipe"
        elif code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
        else:
            how = f"exited with status {code}"
        hint = ""
        if not self._members and code is not None and code > 0:  # failed to start
            hint = (
                " (its error is above; a script that runs a simulation with workers > 1 needs an "
                '`if __name__ == "__main__":` guard, as worker processes import the main module)'
            )
        others = [n for n in w.names if n != client]
        sharing = f"; the same worker held {', '.join(repr(n) for n in others)}" if others else ""
        return ClientProcessError(
            client, f"client {client!r}: its worker process {w.process.pid} {how} {during}{sharing}{hint}"
        )


# -- the worker's side -----------------------------------------------------------------------------


def _worker_main(conn: Connection, threads: int) -> None:
    """A worker process: pin the torch threads first, serve, then leave at once (``os._exit`` once stdout
    and stderr are flushed: the interpreter's teardown of torch took about a second that close() waited)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    with contextlib.suppress(EOFError, BrokenPipeError):  # the parent is gone: nobody to answer
        _serve(conn)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _serve(conn: Connection) -> None:
    """Build the clients, then run rounds until ``stop``; an error is reported, naming the client."""
    setup: _Setup = conn.recv()
    # The spec's own folders (python_path) are on sys.path already: a spawned process starts
    # with its parent's sys.path.
    omega = setup.omega_layout.views(setup.omega_buffers)
    gradients = {n: setup.gradient_layout.views(b) for n, b in setup.gradient_buffers.items()}
    try:
        shared = setup.federation.build_shared(setup.seed)
    except Exception as err:
        _report(conn, next(iter(setup.data)), err)
        return
    clients: dict[str, LocalClient] = {}
    for name, data in setup.data.items():
        try:
            client = LocalClient(name, setup.federation, data, setup.client_config, setup.seed)
        except Exception as err:
            _report(conn, name, err)
            return
        clients[name] = client
        conn.send(("done", name, ClientInfo(name, client.task.name, client.num_samples)))
    while True:
        message = conn.recv()
        if message[0] == "stop":
            return
        round_ = message[1]
        for name, client in clients.items():
            try:
                r = run_client_round(client, shared, omega, round_)
                for key, view in gradients[name].items():
                    view.copy_(r.gradient[key])
            except Exception as err:
                _report(conn, name, err)
                return
            conn.send(("done", name, (r.loss, r.loss_ratio, r.evaluation, r.seconds)))


def _report(conn: Connection, client: str, err: Exception) -> None:
    conn.send(("error", client, (f"{type(err).__name__}: {err}", traceback.format_exc())))
