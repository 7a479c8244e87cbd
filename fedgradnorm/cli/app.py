"""The ``fedgradnorm`` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from fedgradnorm import config as cfgmod
from fedgradnorm.config import ConfigError
from fedgradnorm.data.base import DataError
from fedgradnorm.errors import FatalError
from fedgradnorm.hyperparameters import ALGORITHMS, Algorithm
from fedgradnorm.logs import configure_logging

if TYPE_CHECKING:
    from fedgradnorm.simulation_config import SimulationConfig


# The simulator's flags: one per field of SimulationConfig (each also a FEDGRADNORM_* variable).
SIMULATION_HELP = {
    "federation": "the federation: radcom (Network 2), mtfl (Network 1), or a spec file of your own (.toml)",
    "data": "its data: one pool shared out (the federation reader's format), or task=path,... one file per task "
    "(default: the federation's synthetic set from --seed)",
    "algorithm": "the server step",
    "rounds": "global rounds K",
    "seed": "seed of data, partition, models and batches",
    "tau_h": "head updates per round (minibatches)",
    "tau_omega": "shared-network updates per round (minibatches)",
    "batch_size": "minibatch size (samples)",
    "allocation": "balanced | imbalanced (Table II: gender, glasses 500, others 3000) | task=N,...,*=N",
    "test_fraction": "test share of each client's data (RadCom; a fraction in (0, 1))",
    "gamma": "GradNorm's asymmetry (restoring force)",
    "alpha": "learning rate of the weights p",
    "beta": "learning rate of the networks",
    "omega_tilde": "comma-separated shared parameter names for the gradient norm (empty: the last layer's)",
    "synthetic_size": "synthetic set size: RadCom samples per key, MTFL training faces",
    "tasks": "comma-separated subset of the federation's tasks (empty: all)",
    "loss_scale": "task=factor,...: multiply those tasks' losses (and gradients) by the factor, the dial of "
    "docs/results.md (empty: as the federation declares)",
    "workers": "processes the clients of a round run in: 1 runs them in turn in this process, N in N worker "
    "processes that each keep a fixed share of the clients (at most one per client; more are not started)",
    "client_threads": "torch threads of every client step and of the server step; the same count gives the same "
    "numbers whatever --workers (0: this process's count with --workers 1, that count shared out among the "
    "workers otherwise)",
}


def _add_training_flags(p: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    from fedgradnorm.simulation_config import SimulationConfig

    cfgmod.add_flags(p, SimulationConfig, SIMULATION_HELP, choices={"algorithm": ALGORITHMS}, skip=skip)


def _sim_config(args: argparse.Namespace, algorithm: Algorithm | None = None) -> SimulationConfig:
    """The simulator's configuration from the flags, then FEDGRADNORM_* variables, then defaults."""
    from fedgradnorm.simulation_config import SimulationConfig

    config = cfgmod.build(SimulationConfig, args)
    return config if algorithm is None else replace(config, algorithm=algorithm)


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedgradnorm.simulator import run_simulation

    run_simulation(_sim_config(args), args.out, progress=not args.quiet)
    print(f"wrote {Path(args.out) / 'metrics.jsonl'} and {Path(args.out) / 'training.png'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Both algorithms on the same configuration, a table of the final rounds and one plot."""
    from fedgradnorm.plotting import plot_comparison
    from fedgradnorm.report import final_table
    from fedgradnorm.simulator import run_simulation

    out = Path(args.out)
    runs: dict[str, Path] = {}
    for algorithm in ALGORITHMS:
        runs[algorithm] = run_simulation(_sim_config(args, algorithm), out / algorithm, progress=not args.quiet)
    png = plot_comparison(runs, out / "comparison.png")
    print(final_table(runs))
    print(f"\nplot: {png}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from fedgradnorm.plotting import plot_comparison

    runs = {}
    for item in args.metrics:
        label, sep, path = item.partition("=")
        runs[label if sep else Path(item).parent.name or item] = path if sep else item
    print(plot_comparison(runs, args.out, args.quantity))
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    if args.which == "radcom":
        from fedgradnorm.data.synthetic_radcom import generate_radcom

        path = generate_radcom(args.out, samples_per_key=args.samples_per_key, seed=args.seed)
    else:
        from fedgradnorm.data.synthetic_mtfl import generate_mtfl

        path = generate_mtfl(args.out, n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    print(f"wrote {path}")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    """The clients' shares of a pool as per-node files (what each edge node's --data takes)."""
    from fedgradnorm.data.partition import Allocation, DataSource, write_partition
    from fedgradnorm.federation import load_federation

    fed = load_federation(args.federation)
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip()) or fed.task_names
    for t in tasks:
        fed.task(t)
    source = DataSource(fed, args.data or None, synthetic_seed=args.seed, synthetic_size=args.synthetic_size)
    written = write_partition(source, tasks, Allocation.parse(args.allocation, args.test_fraction), args.seed, args.out)
    for task, path in written.items():
        print(f"{task}: {path}")
    return 0


Command = Callable[[argparse.Namespace], int]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedgradnorm")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedgradnorm", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--log-format",
        choices=("auto", "console", "json"),
        default=os.environ.get("FEDGRADNORM_LOG_FORMAT", "auto"),
        help="log lines: console on a terminal, JSON otherwise [env FEDGRADNORM_LOG_FORMAT; default auto]",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("FEDGRADNORM_LOG_LEVEL", "info"),
        help="debug, info, warning, error [env FEDGRADNORM_LOG_LEVEL; default info]",
    )
    parser.add_argument("--version", action="version", version=f"fedgradnorm {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "simulate",
        help="run the simulator (every client and the server on this machine; --workers spreads the clients)",
    )
    _add_training_flags(p)
    p.add_argument("--out", required=True, help="output folder: metrics.jsonl, summary.json, training.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("compare", help="simulate FedGradNorm and FedRep on the same setup; table and plot")
    _add_training_flags(p, skip=("algorithm",))
    p.add_argument("--out", required=True, help="output folder (one subfolder per algorithm)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("plot", help="draw runs side by side from metrics.jsonl files")
    p.add_argument("metrics", nargs="+", help="metrics.jsonl files, optionally LABEL=PATH")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument(
        "--quantity",
        default="auto",
        choices=("auto", "test_loss", "train_loss", "metric", "loss_ratio"),
        help="per-task curve: accuracy for RadCom and test loss for MTFL by default",
    )
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser(
        "partition",
        help="share a pool out among a federation's tasks, one arrays file per node (an edge node's --data)",
    )
    p.add_argument(
        "--federation",
        default="radcom",
        help="radcom, mtfl, or a federation spec file (.toml) of yours (default radcom)",
    )
    p.add_argument(
        "--data", default="", help="the pool, in the federation reader's format (default: its synthetic set)"
    )
    p.add_argument("--out", required=True, help="folder to write TASK.npz files to")
    p.add_argument(
        "--allocation",
        default="balanced",
        help="balanced | imbalanced (Table II) | task=N,...,*=N | iid | dirichlet:ALPHA[:COLUMN] (default balanced)",
    )
    p.add_argument("--test-fraction", type=float, default=0.2, help="test share when the pool has no test part")
    p.add_argument("--tasks", default="", help="comma-separated tasks (default: all of the federation's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the partition and of the synthetic set (default 0)")
    p.add_argument("--synthetic-size", type=int, default=100, help="size of the synthetic set (default 100)")
    p.set_defaults(func=cmd_partition)

    p = sub.add_parser("datasets", help="write synthetic data sets in the published formats")
    ds = p.add_subparsers(dest="which", required=True, metavar="DATASET")
    r = ds.add_parser("radcom", help="RadComDynamic-format HDF5 file")
    r.add_argument("--out", required=True, help="HDF5 file to write")
    r.add_argument(
        "--samples-per-key", type=int, default=700, help="samples per (modulation, signal, SNR); 700 as published"
    )
    r.add_argument("--seed", type=int, default=0, help="seed of the generator (default 0)")
    r.set_defaults(func=cmd_datasets)
    m = ds.add_parser("mtfl", help="MTFL-format folder (images and training.txt / testing.txt)")
    m.add_argument("--out", required=True, help="folder to write")
    m.add_argument("--n-train", type=int, default=10000, help="training faces (default 10000)")
    m.add_argument("--n-test", type=int, default=3000, help="test faces (default 3000)")
    m.add_argument("--seed", type=int, default=0, help="seed of the generator (default 0)")
    m.set_defaults(func=cmd_datasets)

    for register in _service_commands():
        register(sub)
    return parser


def _service_commands() -> list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]]:
    """Subcommands contributed by the services and the demo (imported lazily, no gRPC at import)."""
    from fedgradnorm.cli import models, services

    return [*services.REGISTRARS, *models.REGISTRARS]


MAX_ERROR_CHARS = 2000  # an error echoes what it refuses: a 100 kB flag value is cut, not printed back


def _bounded(message: str) -> str:
    if len(message) <= MAX_ERROR_CHARS:
        return message
    return f"{message[:MAX_ERROR_CHARS]}... ({len(message) - MAX_ERROR_CHARS} more characters)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    try:
        return int(args.func(args))
    except (ConfigError, DataError, FatalError, ValueError, FileNotFoundError) as e:
        print(f"fedgradnorm {args.command}: error: {_bounded(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
