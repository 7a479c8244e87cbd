"""Prometheus metrics of the aggregator, on a port of their own (``/metrics``).

Per-node series carry ``node`` and ``task`` labels; when a node leaves, its series are removed
rather than frozen at their last value.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fedgradnorm.reasons import Reason
from fedgradnorm.services.domain import RoundSummary

NODE_LABELS = ("node", "task")
ROUND_PHASES = ("collect", "step", "commit")
# Every outcome label exists from the start (at 0): success, and every machine-readable reason.
UPDATE_OUTCOMES = ("accepted", *Reason)
REGISTRATION_OUTCOMES = ("registered", "resumed", *Reason)


class Totals:
    """Counters that mirror totals kept as plain numbers elsewhere (the coordinator's, a stream
    guard's, a relay's): each sync adds what a total grew by since the last one. A total that went
    down (its owner started over, e.g. a relay's new session) is taken as the new starting point."""

    def __init__(self) -> None:
        self._seen: dict[object, float] = {}

    def advance(self, key: object, counter: Counter, total: float) -> None:
        delta = total - self._seen.get(key, 0)
        if delta > 0:
            counter.inc(delta)
        self._seen[key] = total

    def seen(self) -> list[object]:
        return list(self._seen)


class NodeTrafficMetrics:
    """What a node-facing servicer counts (the aggregator's, and a relay's under its own prefix)."""

    def __init__(self, registry: CollectorRegistry | None = None, prefix: str = "fedgradnorm") -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.registered = Gauge(f"{prefix}_registered_nodes", "Registered nodes", registry=r)
        self.updates = Counter(f"{prefix}_updates_total", "Submitted updates by outcome", ("outcome",), registry=r)
        self.bytes = Counter(f"{prefix}_bytes_total", "Payload bytes on the wire", ("direction",), registry=r)
        self.registrations = Counter(
            f"{prefix}_registrations_total", "Register calls by outcome", ("outcome",), registry=r
        )
        # Every known label exists from the start at 0, so rate() and increase() see the first event.
        for outcome in UPDATE_OUTCOMES:
            self.updates.labels(outcome)
        for outcome in REGISTRATION_OUTCOMES:
            self.registrations.labels(outcome)
        for direction in ("sent", "received"):
            self.bytes.labels(direction)

    def forget(self, node: str) -> None:
        """Remove a departed node's series (none here)."""


class AggregatorMetrics(NodeTrafficMetrics):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r = self.registry
        self.weight = Gauge("fedgradnorm_task_weight", "Loss weight p of the node's task", NODE_LABELS, registry=r)
        self.loss_ratio = Gauge(
            "fedgradnorm_task_loss_ratio", "Inverse training rate F~ = F_k / F_0", NODE_LABELS, registry=r
        )
        self.train_loss = Gauge(
            "fedgradnorm_task_train_loss", "Training loss F_k of the last round", NODE_LABELS, registry=r
        )
        self.test_metric = Gauge(
            "fedgradnorm_task_test_metric", "Test metric reported by the node", (*NODE_LABELS, "metric"), registry=r
        )
        self.test_loss = Gauge("fedgradnorm_task_test_loss", "Test loss reported by the node", NODE_LABELS, registry=r)
        self.grad_norm = Gauge(
            "fedgradnorm_task_grad_norm", "Gradient norm on the last shared layer", NODE_LABELS, registry=r
        )
        self.round = Gauge("fedgradnorm_round", "The current round number", registry=r)
        self.round_duration = Histogram(
            "fedgradnorm_round_duration_seconds",
            "Wall time from a round's opening to the end of its server step (the next round can open)",
            buckets=(0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.round_phase = Histogram(
            "fedgradnorm_round_phase_seconds",
            "Wall time of each phase of a round: collect (opening to the last update), step, commit (beside the next round)",
            ("phase",),
            buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.participants = Gauge(
            "fedgradnorm_round_participants", "Nodes whose update the last round used", registry=r
        )
        self.f_grad = Gauge("fedgradnorm_f_grad", "GradNorm auxiliary loss F_grad of the last round", registry=r)
        self.halted = Gauge(
            "fedgradnorm_halted", "1 while rounds do not advance (state commits fail, or the driver failed)", registry=r
        )
        self.rounds_refused = Counter(
            "fedgradnorm_rounds_refused_total",
            "Rounds whose server step would have made omega or its Adam moments non-finite (state kept)",
            registry=r,
        )
        self.streams_cancelled = Counter(
            "fedgradnorm_streams_cancelled_total",
            "FetchRound/SubmitUpdate streams the aggregator cut off: replaced by the node's newer one, or past the deadline",
            ("reason",),
            registry=r,
        )
        self.relays = Gauge("fedgradnorm_relays", "Relays attached (a session in use)", registry=r)
        self.relay_nodes = Gauge(
            "fedgradnorm_relay_nodes", "Registered edge nodes enrolled through each relay", ("relay",), registry=r
        )
        self.relay_partial_sums = Counter(
            "fedgradnorm_relay_partial_sums_total", "Partial sums accepted from each relay", ("relay",), registry=r
        )
        self._totals = Totals()
        self.relay_lost_rounds = Counter(
            "fedgradnorm_relay_lost_rounds_total",
            "Rounds whose partial sum from the relay did not arrive within relay_timeout (its nodes left out)",
            ("relay",),
            registry=r,
        )
        for phase in ROUND_PHASES:
            self.round_phase.labels(phase)
        for reason in ("replaced", "deadline"):
            self.streams_cancelled.labels(reason)
        self._series: dict[str, tuple[str, set[str]]] = {}  # node -> (task, metric names)

    def on_round(self, summary: RoundSummary) -> None:
        self.round.set(summary.round + 1)
        self.round_duration.observe(summary.duration_seconds)
        self.round_phase.labels("collect").observe(summary.collect_seconds)
        self.round_phase.labels("step").observe(summary.step_seconds)
        if summary.commit_seconds:
            self.round_phase.labels("commit").observe(summary.commit_seconds)
        self.participants.set(len(summary.submitted))
        self.f_grad.set(summary.step.f_grad)
        for node, sub in summary.submitted.items():
            task = summary.members[node].task
            rep = summary.step.reports[node]
            self.weight.labels(node, task).set(rep.weight)
            self.loss_ratio.labels(node, task).set(rep.loss_ratio)
            self.grad_norm.labels(node, task).set(rep.grad_norm)
            self.train_loss.labels(node, task).set(sub.loss)
            if sub.test_loss is not None:
                self.test_loss.labels(node, task).set(sub.test_loss)
            for metric, value in sub.test_metrics.items():
                self.test_metric.labels(node, task, metric).set(value)
            self._series[node] = (task, set(sub.test_metrics) | self._series.get(node, (task, set()))[1])
        for node, member in summary.members.items():
            if not member.registered:
                self.forget(node)

    def sync_counts(self, counts: dict[str, int]) -> None:
        """Bring counters kept as plain totals elsewhere (coordinator, stream guard) up to date."""
        targets = {
            "rounds_refused": self.rounds_refused,
            "dropped_updates": self.updates.labels(Reason.DROPPED_NORM),
            "relay_lost": self.updates.labels(Reason.RELAY_LOST),
            "streams_replaced": self.streams_cancelled.labels("replaced"),
            "streams_deadline": self.streams_cancelled.labels("deadline"),
        }
        for key, total in counts.items():
            self._totals.advance(key, targets[key], total)

    def sync_relays(self, stats: dict[str, tuple[int, int, int]]) -> None:
        """Per relay (attached now): (nodes behind it, partial sums accepted, rounds lost) as totals."""
        self.relays.set(len(stats))
        for relay, (nodes, sums, lost) in stats.items():
            self.relay_nodes.labels(relay).set(nodes)
            # The relay's series exist from its attach on, at 0, so increase() sees its first lost round.
            self._totals.advance((relay, "sums"), self.relay_partial_sums.labels(relay), sums)
            self._totals.advance((relay, "lost"), self.relay_lost_rounds.labels(relay), lost)
        for key in self._totals.seen():
            if isinstance(key, tuple) and key[0] not in stats:
                with contextlib.suppress(KeyError):
                    self.relay_nodes.remove(key[0])

    def forget(self, node: str) -> None:
        """Remove a departed node's series."""
        if node not in self._series:
            return
        task, metrics = self._series.pop(node)
        for gauge in (self.weight, self.loss_ratio, self.grad_norm, self.train_loss, self.test_loss):
            with contextlib.suppress(KeyError):
                gauge.remove(node, task)
        for metric in metrics:
            with contextlib.suppress(KeyError):
                self.test_metric.remove(node, task, metric)
