"""metrics.jsonl of the aggregator: one JSON line per closed round and node (the simulator's shape).

Every committed round has exactly one set of rows. The rows are appended after the round's state
commit; the committed state also carries them (Snapshot.records), so a crash between the commit
and the append is repaired at the next start by :meth:`RoundLog.reconcile`, which also drops a
line torn by a crash in the middle of an append.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from fedgradnorm.atomic import atomic_write_text
from fedgradnorm.records import append_jsonl, round_record

if TYPE_CHECKING:
    from fedgradnorm.services.domain import RoundSummary

log = structlog.get_logger("fedgradnorm.aggregator")


def round_records(s: RoundSummary) -> list[dict[str, Any]]:
    """The rows of one closed round, with its phase timings (commit_seconds once it is known)."""
    timing = {
        "round_seconds": s.duration_seconds,
        "collect_seconds": s.collect_seconds,
        "step_seconds": s.step_seconds,
        "commit_seconds": s.commit_seconds,
        "closed_unix": s.closed_unix,
    }
    records = []
    for node, sub in sorted(s.submitted.items()):
        metric = next(iter(sub.test_metrics), None)
        row = round_record(
            round_=s.round,
            client=node,
            task=s.members[node].task,
            algorithm=s.algorithm,
            report=s.step.reports[node],
            f_grad=s.step.f_grad,
            train_loss=sub.loss,
            test_loss=sub.test_loss,
            test_metric=metric,
            test_value=sub.test_metrics.get(metric) if metric else None,
            num_samples=sub.num_samples,
        )
        records.append({**row, **timing})
    return records


class RoundLog:
    """Appends the rows of every committed round (a listener of the coordinator)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, s: RoundSummary) -> None:
        append_jsonl(self.path, round_records(s))

    def reconcile(self, committed: list[dict[str, Any]]) -> None:
        """Make the file agree with the committed state: the last committed round's rows
        (``committed``) present exactly once, no torn line, no row of a later round."""
        if not committed or not self.path.exists():
            if committed:
                append_jsonl(self.path, committed)
                log.warning("metrics_log.repaired", round=committed[0]["round"], rows=len(committed))
            return
        last = committed[0]["round"]
        rows: list[dict[str, Any]] = []
        torn = 0
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                torn += 1
        have = sorted(r.get("client", "") for r in rows if r.get("round") == last)
        want = sorted(r["client"] for r in committed)
        later = sum(1 for r in rows if isinstance(r.get("round"), int) and r["round"] > last)
        if have == want and not torn and not later:
            return
        kept = [r for r in rows if isinstance(r.get("round"), int) and r["round"] < last]
        if have == want:  # the appended rows are complete: keep them (they carry commit_seconds)
            kept += [r for r in rows if r.get("round") == last]
        else:
            kept += committed
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        atomic_write_text(self.path, text)
        log.warning("metrics_log.repaired", round=last, torn_lines=torn, rows_of_later_rounds=later)
