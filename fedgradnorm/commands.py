"""Subcommands beyond the library's own: the main job (demo) and, as they land, the services."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from fedgradnorm.cli import cmd_compare

    ns = argparse.Namespace(
        dataset="radcom",
        data=None,
        rounds=args.rounds,
        seed=args.seed,
        tau_h=5,
        tau_omega=5,
        batch_size=64,
        allocation="balanced",
        test_fraction=0.2,
        gamma=0.9,
        alpha=0.004,
        beta=0.0002,
        omega_tilde="",
        synthetic_size=args.synthetic_size,
        tasks="",
        out=str(Path(args.out)),
        quiet=False,
    )
    return cmd_compare(ns)


def register_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job: FedGradNorm against FedRep on synthetic RadCom")
    p.add_argument("--out", default="runs/main", help="output folder (default runs/main)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--synthetic-size", type=int, default=60, help="RadCom samples per key (default 60)")
    p.set_defaults(func=_demo)


REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [register_demo]
