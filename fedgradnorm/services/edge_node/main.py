"""Run an edge node process until the federation finishes (or, with --after-training stay, until
SIGTERM after it) or SIGTERM arrives."""

from __future__ import annotations

import signal
import threading

import structlog
from prometheus_client import start_http_server

from fedgradnorm.errors import FatalError
from fedgradnorm.services.edge_node.config import EdgeConfig
from fedgradnorm.services.edge_node.node import EdgeNode

log = structlog.get_logger("fedgradnorm.edge_node")


def serve_edge_node(config: EdgeConfig, max_rounds: int = 0) -> int:
    node = EdgeNode(config)
    stopping = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        log.info("node.stopping", signal=signal.Signals(signum).name)
        stopping.set()
        node.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if config.metrics_listen:
        host, _, port = config.metrics_listen.rpartition(":")
        try:
            start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=node.metrics.registry)
        except OSError as e:
            node.channel.close()
            raise FatalError(
                f"cannot listen on {config.metrics_listen} (--metrics-listen): {(e.strerror or str(e)).lower()}; "
                'give another --metrics-listen, or "" to serve no metrics'
            ) from e
    rounds = node.run(max_rounds=max_rounds)
    done = log.warning if node.updates_left_out else log.info
    done("node.done", rounds=rounds, left_out=node.updates_left_out, model=node.model_written)
    if config.after_training == "stay" and not stopping.is_set():
        log.info("node.staying", until="SIGTERM", metrics=config.metrics_listen or None)
        while not stopping.wait(1.0):  # a timed wait: the signal handler runs between waits
            pass
    return 0
