"""The command line explains itself: every flag has a sentence, choices are listed, booleans are
switches, benchmark switches stay out of the everyday help, and --version answers."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from fedgradnorm.cli import build_parser
from fedgradnorm.config import build
from fedgradnorm.services.aggregator.config import ServiceConfig
from fedgradnorm.services.edge_node.config import EdgeConfig


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize(
    "command", ["simulate", "compare", "aggregator", "relay", "edge-node", "state", "demo", "certs"]
)
def test_every_flag_has_a_sentence(command: str) -> None:
    for action in subcommands()[command]._actions:
        if action.help == argparse.SUPPRESS or not action.option_strings or action.dest == "help":
            continue
        words = (action.help or "").split("[env")[0].split()
        assert len(words) >= 3, f"{command} {action.option_strings}: help {action.help!r}"


def test_choices_are_listed_and_benchmark_switches_hidden() -> None:
    commands = subcommands()
    for command in ("simulate", "aggregator", "edge-node", "demo", "partition"):
        federation = next(a for a in commands[command]._actions if a.dest == "federation")
        assert federation.choices is None, command  # a shipped name or a spec file of the user's
        assert "radcom" in (federation.help or "") and "mtfl" in (federation.help or ""), command
        assert ".toml" in (federation.help or ""), command
    algorithm = next(a for a in commands["aggregator"]._actions if a.dest == "algorithm")
    assert list(algorithm.choices or []) == ["fedgradnorm", "fedrep"]
    help_text = commands["edge-node"].format_help()
    assert "--no-train" not in help_text and "--ready-file" not in commands["aggregator"].format_help()


def test_booleans_are_switches() -> None:
    args = build_parser().parse_args(["aggregator", "--insecure"])
    assert build(ServiceConfig, args).insecure is True
    args = build_parser().parse_args(["edge-node", "--insecure", "--task", "signal"])
    assert build(EdgeConfig, args, env={}).insecure is True
    args = build_parser().parse_args(["aggregator", "--insecure", "false", "--tls-cert", "c", "--tls-key", "k"])
    assert build(ServiceConfig, args).insecure is False


def test_version() -> None:
    res = subprocess.run([sys.executable, "-m", "fedgradnorm.cli", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("fedgradnorm "), res


def test_help_loads_no_torch() -> None:
    """--help of every command lists the flags without importing torch (it took 5 s)."""
    code = (
        "import sys\n"
        "from fedgradnorm.cli import build_parser\n"
        "parser = build_parser()\n"
        "for command in ('simulate', 'aggregator', 'relay', 'edge-node', 'state', 'demo'):\n"
        "    try:\n"
        "        parser.parse_args([command, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
