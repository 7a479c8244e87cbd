"""The ``fedgradnorm`` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

from fedgradnorm.algorithm import ALGORITHMS, Algorithm
from fedgradnorm.config import ConfigError
from fedgradnorm.data.base import DataError
from fedgradnorm.errors import FatalError
from fedgradnorm.logs import configure_logging

if TYPE_CHECKING:
    from fedgradnorm.simulator import SimulationConfig


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=("radcom", "mtfl"), default="radcom", help="federation (default radcom)")
    p.add_argument(
        "--data",
        default=None,
        help="real data: RadComDynamic .hdf5 file or unzipped MTFL folder "
        "(default: a synthetic set generated from --seed)",
    )
    p.add_argument("--rounds", type=int, default=20, help="global rounds K (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, partition, models and batches (default 0)")
    p.add_argument("--tau-h", type=int, default=5, help="head updates per round (default 5)")
    p.add_argument("--tau-omega", type=int, default=5, help="shared-network updates per round (default 5)")
    p.add_argument("--batch-size", type=int, default=64, help="minibatch size (default 64)")
    p.add_argument(
        "--allocation",
        default="balanced",
        help="balanced | imbalanced (Table II: gender, glasses 500, others 3000) | task=N,...,*=N",
    )
    p.add_argument("--test-fraction", type=float, default=0.2, help="test share of each client's data (RadCom)")
    p.add_argument("--gamma", type=float, default=0.9, help="GradNorm restoring force (default 0.9)")
    p.add_argument("--alpha", type=float, default=0.004, help="learning rate of the weights p (default 0.004)")
    p.add_argument("--beta", type=float, default=0.0002, help="learning rate of the networks (default 0.0002)")
    p.add_argument(
        "--omega-tilde",
        default="",
        help="comma-separated shared parameter names for the gradient norm (default: the last layer's weight and bias)",
    )
    p.add_argument(
        "--synthetic-size",
        type=int,
        default=100,
        help="synthetic set size: RadCom samples per key, MTFL training faces (default 100)",
    )
    p.add_argument("--tasks", default="", help="comma-separated subset of the data set's tasks (default: all)")


def _sim_config(args: argparse.Namespace, algorithm: Algorithm) -> SimulationConfig:
    from fedgradnorm.simulator import SimulationConfig

    return SimulationConfig(
        dataset=args.dataset,
        data=args.data,
        algorithm=algorithm,
        rounds=args.rounds,
        seed=args.seed,
        tau_h=args.tau_h,
        tau_omega=args.tau_omega,
        batch_size=args.batch_size,
        allocation=args.allocation,
        test_fraction=args.test_fraction,
        gamma=args.gamma,
        alpha=args.alpha,
        beta=args.beta,
        omega_tilde=tuple(n for n in args.omega_tilde.split(",") if n),
        synthetic_size=args.synthetic_size,
        tasks=tuple(t for t in args.tasks.split(",") if t),
    )


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedgradnorm.simulator import run_simulation

    run_simulation(_sim_config(args, cast(Algorithm, args.algorithm)), args.out, progress=not args.quiet)
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


Command = Callable[[argparse.Namespace], int]


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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("simulate", help="run the in-process simulator (all clients and the server in one process)")
    _add_training_flags(p)
    p.add_argument("--algorithm", choices=ALGORITHMS, default="fedgradnorm")
    p.add_argument("--out", required=True, help="output folder: metrics.jsonl, summary.json, training.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("compare", help="simulate FedGradNorm and FedRep on the same setup; table and plot")
    _add_training_flags(p)
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

    p = sub.add_parser("datasets", help="write synthetic data sets in the published formats")
    ds = p.add_subparsers(dest="which", required=True, metavar="DATASET")
    r = ds.add_parser("radcom", help="RadComDynamic-format HDF5 file")
    r.add_argument("--out", required=True, help="HDF5 file to write")
    r.add_argument(
        "--samples-per-key", type=int, default=700, help="samples per (modulation, signal, SNR); 700 as published"
    )
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=cmd_datasets)
    m = ds.add_parser("mtfl", help="MTFL-format folder (images and training.txt / testing.txt)")
    m.add_argument("--out", required=True, help="folder to write")
    m.add_argument("--n-train", type=int, default=10000)
    m.add_argument("--n-test", type=int, default=3000)
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_datasets)

    for register in _service_commands():
        register(sub)
    return parser


def _service_commands() -> list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]]:
    """Subcommands contributed by the services and the demo (imported lazily, no gRPC at import)."""
    from fedgradnorm.cli import services

    return services.REGISTRARS


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    try:
        return int(args.func(args))
    except (ConfigError, DataError, FatalError, ValueError, FileNotFoundError) as e:
        print(f"fedgradnorm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
