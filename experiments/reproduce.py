"""Reproduce the paper's experiments on synthetic data and write ``docs/results.md``.

    python -m experiments.reproduce --doc docs/results.md            # the full plan (make reproduce)
    python -m experiments.reproduce --only dial --doc ...             # train some experiments only
    python -m experiments.reproduce --no-train --doc ...              # the document from finished runs
    python -m experiments.reproduce --scale smoke --out /tmp/x ...    # a couple of rounds, for tests

The plan (:class:`Plan`), each arm on the same seeds, 100 epochs unless said otherwise:

* ``mtfl-imbalanced`` - Table II: MTFL, gender and glasses clients with 500 faces, the others 3,000;
* ``radcom``          - Fig. 3: RadCom, three tasks on Network 2, plus accuracy against SNR;
* ``mtfl-balanced``   - Fig. 2: MTFL, the training faces shared equally;
* controls: ``mtfl-without-landmarks`` (FedRep without the dominant task: masking) and
  ``alone-<federation>-<task>`` (each client trained by itself: learnability);
* ``dial-x<s>``       - the landmark loss scaled by s, FedRep against FedGradNorm (shorter horizon);
* ``sweep-a<alpha>-g<gamma>`` - FedGradNorm over a grid of alpha and gamma (every cell reported).

Runs are independent processes (one torch thread each, ``--workers`` at a time); every run writes
``metrics.jsonl`` and ``result.json`` under ``--out``. An invocation keeps every finished run of an
identical specification (on data of the same generator) and trains the others, first seed first, so
an interrupted ``make reproduce`` resumes; ``--fresh`` trains everything again. The document
(:mod:`experiments.document`) is written from every finished run of the plan and says which
sections are still pending.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments import analysis as an
from experiments.document import render
from experiments.runs import (
    ALGORITHMS,
    DIAL_TASK,
    MASKING,
    RunSpec,
    alone_name,
    client_data,
    dial_name,
    federation_tasks,
    finished,
    load_records,
    run_one,
    sweep_name,
)
from fedgradnorm.hyperparameters import ALPHA, BATCH_SIZE, GAMMA, TAU_H, TAU_OMEGA
from fedgradnorm.machine import machine_info, torch_threads

# The experiments of a plan, in the order their runs start (the first seed of every experiment
# before the next seeds, so that an interrupted invocation has left the most informative runs).
MAIN = ("mtfl-imbalanced", "radcom", "mtfl-balanced")


@dataclass(frozen=True)
class Plan:
    """The size of every experiment; FULL is what ``make reproduce`` runs.

    Training length is in epochs of the largest client (one epoch: one pass over its training data
    at tau_h + tau_omega minibatches per round), as the paper states it; :meth:`specs` turns it into
    rounds from the clients' sizes."""

    name: str
    epochs: float = 100  # Table II, Fig. 2 and 3, the controls
    dial_epochs: float = 20  # the dial and the alpha/gamma sweep (a stated, shorter horizon: 32 runs)
    seeds: tuple[int, ...] = (0, 1, 2)  # Table II, Fig. 3, the masking control, the dial
    balanced_seeds: tuple[int, ...] = (0,)  # Fig. 2 (one seed, as the paper's figure)
    alone_seeds: tuple[int, ...] = (0,)  # each task alone (learnability)
    sweep_seeds: tuple[int, ...] = (0,)
    loss_scales: tuple[float, ...] = (1, 10, 100, 1000)
    alphas: tuple[float, ...] = (0.0004, ALPHA, 0.04)
    gammas: tuple[float, ...] = (0.5, GAMMA, 1.5)
    mtfl_size: int = 13000  # training faces; the generator adds 30 % as test faces
    radcom_size: int = 150  # samples per (modulation, signal, SNR) key
    mtfl_eval_test: int = 260  # per-round evaluation subset per client (of 780 test faces)
    radcom_eval_test: int = 600  # per-round evaluation subset per client (of 1,800 test vectors)
    tau_h: int = TAU_H
    tau_omega: int = TAU_OMEGA
    batch_size: int = BATCH_SIZE
    data_seed: int = 0

    def rounds(self, epochs: float, largest_client: int) -> int:
        """Rounds for ``epochs`` passes over ``largest_client`` training samples."""
        per_round = self.batch_size * (self.tau_h + self.tau_omega)
        return max(1, math.ceil(epochs * largest_client / per_round - 1e-9))

    def settings(self) -> dict[str, tuple[str, str, int, int]]:
        """experiment family -> (federation, allocation, synthetic size, per-round evaluation subset)."""
        return {
            "mtfl-imbalanced": ("mtfl", "imbalanced", self.mtfl_size, self.mtfl_eval_test),
            "mtfl-balanced": ("mtfl", "balanced", self.mtfl_size, self.mtfl_eval_test),
            "radcom": ("radcom", "balanced", self.radcom_size, self.radcom_eval_test),
        }

    def specs(self, largest: dict[str, int]) -> list[RunSpec]:
        """Every run, in start order; ``largest``: setting -> its largest client's training samples."""
        common: dict[str, Any] = {
            "tau_h": self.tau_h,
            "tau_omega": self.tau_omega,
            "batch_size": self.batch_size,
            "data_seed": self.data_seed,
        }

        def run(name: str, setting: str, algorithm: str, seed: int, epochs: float, **extra: Any) -> RunSpec:
            dataset, allocation, size, eval_test = self.settings()[setting]
            return RunSpec(
                experiment=name,
                dataset=dataset,
                allocation=allocation,
                algorithm=algorithm,
                seed=seed,
                rounds=self.rounds(epochs, largest[setting]),
                synthetic_size=size,
                eval_test=eval_test,
                **common,
                **extra,
            )

        out: list[RunSpec] = []
        for name in MAIN:
            seeds = self.balanced_seeds if name == "mtfl-balanced" else self.seeds
            out += [run(name, name, a, s, self.epochs) for s in seeds for a in ALGORITHMS]
        others = [t for t in federation_tasks("mtfl") if t != DIAL_TASK]
        out += [run(MASKING, "mtfl-imbalanced", "fedrep", s, self.epochs, tasks=",".join(others)) for s in self.seeds]
        for setting in ("mtfl-imbalanced", "radcom"):
            dataset = self.settings()[setting][0]
            out += [
                run(alone_name(dataset, t), setting, "fedrep", s, self.epochs, tasks=t)
                for s in self.alone_seeds
                for t in federation_tasks(dataset)
            ]
        for scale in self.loss_scales:
            out += [
                run(dial_name(scale), "mtfl-imbalanced", a, s, self.dial_epochs, loss_scale=f"{DIAL_TASK}={scale:g}")
                for s in self.seeds
                for a in ALGORITHMS
            ]
        for alpha in self.alphas:
            for gamma in self.gammas:
                if (alpha, gamma) == (ALPHA, GAMMA):
                    continue  # the primary cell is the dial's x1 FedGradNorm run
                out += [
                    run(
                        sweep_name(alpha, gamma),
                        "mtfl-imbalanced",
                        "fedgradnorm",
                        s,
                        self.dial_epochs,
                        alpha=alpha,
                        gamma=gamma,
                        loss_scale=f"{DIAL_TASK}=1",
                    )
                    for s in self.sweep_seeds
                ]
        seed_rank = {s: i for i, s in enumerate(dict.fromkeys(self.seeds + self.alone_seeds + self.sweep_seeds))}
        return sorted(out, key=lambda r: seed_rank.get(r.seed, len(seed_rank)))  # stable: keeps the order above


FULL = Plan("full")
SMOKE = Plan(
    "smoke",
    epochs=0.2,
    dial_epochs=0.1,
    seeds=(0, 1),
    balanced_seeds=(0,),
    alone_seeds=(0,),
    sweep_seeds=(0,),
    loss_scales=(1, 100),
    alphas=(ALPHA, 0.04),
    gammas=(GAMMA,),
    mtfl_size=40,
    radcom_size=2,
    mtfl_eval_test=5,
    radcom_eval_test=10,
    tau_h=1,
    tau_omega=2,
    batch_size=16,
)
PLANS = {"full": FULL, "smoke": SMOKE}


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def _worker_init(threads: int) -> None:
    """Initializer of a pool's worker process (the setting lives as long as that process)."""
    import torch

    torch.set_num_threads(threads)


def _run(spec: RunSpec, out: str, reuse: bool) -> dict[str, Any]:
    return run_one(spec, out, reuse=reuse)


def run_plan(specs: Sequence[RunSpec], out: Path, workers: int, reuse: bool, log: Any = print) -> list[dict[str, Any]]:
    """Every run, ``workers`` processes at a time (in this process when ``workers`` is 1), in the given order."""
    ordered = list(specs)
    results: list[dict[str, Any]] = []
    if workers <= 1:
        with torch_threads(1):  # as a worker process has; the caller's count is restored after
            for i, spec in enumerate(ordered, 1):
                results.append(run_one(spec, out, reuse=reuse))
                log(f"[{i}/{len(ordered)}] {spec.key}: {results[-1]['wall_seconds']:.0f} s")
        return results
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(1,)) as pool:
        futures = {pool.submit(_run, spec, str(out), reuse): spec for spec in ordered}
        for i, fut in enumerate(cf.as_completed(futures), 1):
            result = fut.result()
            results.append(result)
            reused = " (reused)" if result.get("reused") else ""
            log(f"[{i}/{len(ordered)}] {futures[fut].key}: {result['wall_seconds']:.0f} s{reused}")
    return results


def _trained_by(path: Path, info: dict[str, Any], timing: dict[str, Any]) -> list[dict[str, Any]]:
    """Which invocations trained the runs behind the current results (kept across invocations)."""
    history: list[dict[str, Any]] = []
    if timing["reused"] and path.exists():
        prev = json.loads(path.read_text())
        if "trained_by" in prev.get("timing", {}):
            history = list(prev["timing"]["trained_by"])
        elif "timing" in prev:  # a timing.json written before this history was kept
            t, i = prev["timing"], prev["info"]
            history = [
                {
                    "date": i["date"],
                    "runs_trained": len(t["runs"]) - t["reused"],
                    "minutes": t["total_seconds"] / 60,
                    "workers": t["workers"],
                    "niceness": i.get("niceness", 0),
                    "loadavg_start": i["loadavg_start"],
                    "loadavg_end": i["loadavg_end"],
                }
            ]
    trained = len(timing["runs"]) - timing["reused"]
    if trained:
        history.append(
            {
                "date": info["date"],
                "runs_trained": trained,
                "minutes": timing["total_seconds"] / 60,
                "workers": timing["workers"],
                "niceness": info["niceness"],
                "loadavg_start": info["loadavg_start"],
                "loadavg_end": info["loadavg_end"],
            }
        )
    return history


def largest_clients(plan: Plan) -> dict[str, int]:
    """Per setting of ``plan``, its largest client's training samples (generating the data if needed)."""
    out = {}
    for setting, (dataset, allocation, size, _) in plan.settings().items():
        probe = RunSpec(setting, dataset, allocation, "fedrep", 0, 1, size, data_seed=plan.data_seed)
        out[setting] = max(len(d.train) for d in client_data(probe).values())
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--doc", default="docs/results.md", help="markdown file to write (default docs/results.md)")
    parser.add_argument("--img-dir", default=None, help="figures folder (default: <doc folder>/img)")
    parser.add_argument("--img-prefix", default="results-", help="figure file name prefix (default results-)")
    parser.add_argument("--out", default="runs/reproduce", help="run folders (default runs/reproduce)")
    parser.add_argument("--scale", choices=sorted(PLANS), default="full", help="full (default) or smoke")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (default 2; 1 runs in-process)")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="train every run again (default: finished runs of an identical "
        "specification in --out are kept, so an interrupted invocation resumes)",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated experiment name prefixes to train (radcom,alone-radcom,...); "
        "the document still shows every finished run of the plan",
    )
    parser.add_argument("--no-train", action="store_true", help="train nothing: write the document from finished runs")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, not {args.workers}")

    plan = PLANS[args.scale]
    doc = Path(args.doc)
    img_dir = Path(args.img_dir) if args.img_dir else doc.parent / "img"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    info["loadavg_start"] = info.pop("loadavg")
    info["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.perf_counter()

    largest = largest_clients(plan)  # generates (or reads from the cache) every synthetic set
    data_seconds = time.perf_counter() - t0
    print(f"data: {data_seconds:.1f} s; largest clients {largest}", flush=True)
    specs = plan.specs(largest)
    prefixes = tuple(p for p in args.only.split(",") if p)
    selected = [] if args.no_train else [s for s in specs if not prefixes or s.experiment.startswith(prefixes)]

    t1 = time.perf_counter()
    results = run_plan(selected, out, args.workers, not args.fresh, log=lambda m: print(m, flush=True))
    train_seconds = time.perf_counter() - t1
    stored = {RunSpec(**r["spec"]).key: r for r in results}
    for spec in specs:
        if spec.key not in stored and (found := finished(spec, out)) is not None:
            stored[spec.key] = found
    done = [stored[s.key] for s in specs if s.key in stored]
    grouped = an.group([(r, load_records(r)) for r in done])
    info["loadavg_end"] = os.getloadavg()
    timing = {
        "workers": args.workers,
        "data_seconds": data_seconds,
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - t0,
        "cpu_seconds": sum(r["cpu_seconds"] for r in done),
        "reused": sum(1 for r in done if r.get("reused")),
        "planned": len(specs),
        "runs": [{"key": RunSpec(**r["spec"]).key, "wall": r["wall_seconds"], "cpu": r["cpu_seconds"]} for r in done],
    }
    timing["trained_by"] = _trained_by(out / "timing.json", info, timing)
    command = "python -m experiments.reproduce " + " ".join(sys.argv[1:] if argv is None else argv)
    text = render(grouped, plan, specs, info, timing, img_dir, args.img_prefix, command.strip())
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    (out / "timing.json").write_text(json.dumps({"info": info, "timing": timing}, indent=1))
    print(
        f"wrote {doc} and figures in {img_dir}: {len(done)} of {len(specs)} runs ({timing['total_seconds'] / 60:.1f} min)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
