"""Reproduce the paper's experiments on synthetic data and write ``docs/results.md``.

    python -m experiments.reproduce --doc docs/results.md            # the full plan (make reproduce)
    python -m experiments.reproduce --scale smoke --out /tmp/x ...    # a couple of rounds, for tests

Three experiments, each FedRep against FedGradNorm on the same seeds:

* ``mtfl-imbalanced`` - Table II: MTFL, gender and glasses clients with 500 faces, the others 3,000;
* ``mtfl-balanced``   - Fig. 2: MTFL, the training faces shared equally;
* ``radcom``          - Fig. 3: RadCom, three tasks on Network 2, plus accuracy against SNR.

Runs are independent processes (one torch thread each, ``--workers`` at a time); every run
writes ``metrics.jsonl`` and ``result.json`` under ``--out``, and ``--reuse`` picks up finished
runs of an identical specification instead of training them again. The document is
``experiments/results_template.md`` with its slots filled by :mod:`experiments.document`.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from experiments import analysis as an
from experiments.document import render
from experiments.runs import ALGORITHMS, RunSpec, load_records, prepare_data, run_one
from fedgradnorm.hyperparameters import BATCH_SIZE, TAU_H, TAU_OMEGA
from fedgradnorm.machine import machine_info, torch_threads


@dataclass(frozen=True)
class Plan:
    """The size of every experiment; FULL is what ``make reproduce`` runs."""

    name: str
    seeds: tuple[int, ...] = (0, 1, 2)  # Table II and Fig. 3
    balanced_seeds: tuple[int, ...] = (0,)  # Fig. 2 (one seed, as the paper's figure; bounds the run time)
    mtfl_rounds: int = 100
    radcom_rounds: int = 100
    mtfl_size: int = 13000  # training faces; the generator adds 30 % as test faces
    radcom_size: int = 150  # samples per (modulation, signal, SNR) key
    mtfl_eval_test: int = 260  # per-round evaluation subset per client (of 780 test faces)
    radcom_eval_test: int = 600  # per-round evaluation subset per client (of 1,800 test vectors)
    tau_h: int = TAU_H
    tau_omega: int = TAU_OMEGA
    batch_size: int = BATCH_SIZE
    data_seed: int = 0

    def specs(self) -> list[RunSpec]:
        common = {
            "tau_h": self.tau_h,
            "tau_omega": self.tau_omega,
            "batch_size": self.batch_size,
            "data_seed": self.data_seed,
        }
        experiments = [
            (
                "mtfl-imbalanced",
                "mtfl",
                "imbalanced",
                self.mtfl_rounds,
                self.mtfl_size,
                self.mtfl_eval_test,
                self.seeds,
            ),
            (
                "mtfl-balanced",
                "mtfl",
                "balanced",
                self.mtfl_rounds,
                self.mtfl_size,
                self.mtfl_eval_test,
                self.balanced_seeds,
            ),
            ("radcom", "radcom", "balanced", self.radcom_rounds, self.radcom_size, self.radcom_eval_test, self.seeds),
        ]
        out = []
        for name, dataset, allocation, rounds, size, eval_test, seeds in experiments:
            for seed in seeds:
                for algorithm in ALGORITHMS:
                    out.append(
                        RunSpec(
                            experiment=name,
                            dataset=dataset,
                            allocation=allocation,
                            algorithm=algorithm,
                            seed=seed,
                            rounds=rounds,
                            synthetic_size=size,
                            eval_test=eval_test,
                            **common,  # type: ignore[arg-type]
                        )
                    )
        return out


FULL = Plan("full")
SMOKE = Plan(
    "smoke",
    seeds=(0, 1),
    balanced_seeds=(0,),
    mtfl_rounds=2,
    radcom_rounds=2,
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
    """Every run, ``workers`` processes at a time (in this process when ``workers`` is 1)."""
    # Longest first: MTFL runs cost about twice a RadCom run per round.
    ordered = sorted(specs, key=lambda s: (s.dataset != "mtfl", s.experiment, s.seed, s.algorithm))
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
    """Which invocations trained the runs behind the current results (kept across ``--reuse``)."""
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--doc", default="docs/results.md", help="markdown file to write (default docs/results.md)")
    parser.add_argument("--img-dir", default=None, help="figures folder (default: <doc folder>/img)")
    parser.add_argument("--img-prefix", default="results-", help="figure file name prefix (default results-)")
    parser.add_argument("--out", default="runs/reproduce", help="run folders (default runs/reproduce)")
    parser.add_argument("--scale", choices=sorted(PLANS), default="full", help="full (default) or smoke")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (default 2; 1 runs in-process)")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs with an identical specification")
    args = parser.parse_args(argv)

    plan = PLANS[args.scale]
    doc = Path(args.doc)
    img_dir = Path(args.img_dir) if args.img_dir else doc.parent / "img"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    info["loadavg_start"] = info.pop("loadavg")
    info["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.perf_counter()

    specs = plan.specs()
    data_seconds = 0.0
    for spec in {replace(s, algorithm="fedrep", seed=0, experiment="", allocation="balanced") for s in specs}:
        took = prepare_data(spec)
        data_seconds += took
        print(f"data {spec.source().describe()}: {took:.1f} s", flush=True)

    t1 = time.perf_counter()
    results = run_plan(specs, out, args.workers, args.reuse, log=lambda m: print(m, flush=True))
    train_seconds = time.perf_counter() - t1
    grouped = an.group([(r, load_records(r)) for r in results])
    info["loadavg_end"] = os.getloadavg()
    timing = {
        "workers": max(1, args.workers),
        "data_seconds": data_seconds,
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - t0,
        "cpu_seconds": sum(r["cpu_seconds"] for r in results),
        "reused": sum(1 for r in results if r.get("reused")),
        "runs": [
            {"key": RunSpec(**r["spec"]).key, "wall": r["wall_seconds"], "cpu": r["cpu_seconds"]} for r in results
        ],
    }
    timing["trained_by"] = _trained_by(out / "timing.json", info, timing)
    command = "python -m experiments.reproduce " + " ".join(sys.argv[1:] if argv is None else argv)
    text = render(grouped, plan, info, timing, img_dir, args.img_prefix, command.strip())
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    (out / "timing.json").write_text(json.dumps({"info": info, "timing": timing}, indent=1))
    print(f"wrote {doc} and figures in {img_dir} ({timing['total_seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
