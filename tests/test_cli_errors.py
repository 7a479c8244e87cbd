"""Everyday mistakes end in one line naming the address or setting and the cause, exit status 2,
no traceback: ports in use, an aggregator that is not running, a misconfigured edge node (TLS
server name, plaintext against TLS, an address without a port), the placeholder enrolment token.
Each case runs the real `fedgradnorm` command as a process."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from fedgradnorm.certs import make_certificates
from fedgradnorm.errors import FatalError
from fedgradnorm.launch import cli, client_tls_flags, start_aggregator
from fedgradnorm.services.aggregator.config import CoordinatorConfig, ServiceConfig
from fedgradnorm.services.aggregator.server import start_aggregator as start_in_process
from tests.faults_helpers import Processes, aggregator_process, safe_structlog


def run_cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """Run `fedgradnorm ARGS`; (exit status, the last line of stderr, seconds). The process is
    killed by subprocess.run if it outlives ``timeout``."""
    t0 = time.monotonic()
    res = subprocess.run(cli(*args), capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    return res.returncode, lines[-1] if lines else "", time.monotonic() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki") / "certs"
    make_certificates(out)
    return out


# -- the aggregator's ports ---------------------------------------------------------------------


def test_a_second_aggregator_on_the_same_grpc_port_says_so(procs: Processes, tmp_path: Path) -> None:
    _, ready = aggregator_process(procs, tmp_path, ["--federation", "mtfl", "--state-dir", str(tmp_path / "a")])
    address = f"127.0.0.1:{ready['grpc_port']}"
    rc, line, _ = run_cli(
        "aggregator", "--insecure", "true", "--state-dir", str(tmp_path / "b"), "--listen", address,
        "--metrics-listen", "127.0.0.1:0",
    )  # fmt: skip
    assert rc == 2
    assert line == (
        f"fedgradnorm aggregator: error: cannot listen on {address} (--listen): address already in use "
        "(another process listens there); stop the other process or give another --listen (port 0 picks a free one)"
    )


def test_a_second_aggregator_on_the_same_metrics_port_says_so(procs: Processes, tmp_path: Path) -> None:
    _, ready = aggregator_process(procs, tmp_path, ["--federation", "mtfl", "--state-dir", str(tmp_path / "a")])
    address = f"127.0.0.1:{ready['metrics_port']}"
    rc, line, _ = run_cli(
        "aggregator", "--insecure", "true", "--state-dir", str(tmp_path / "b"), "--listen", "127.0.0.1:0",
        "--metrics-listen", address,
    )  # fmt: skip
    assert rc == 2
    assert line.startswith(
        f"fedgradnorm aggregator: error: cannot listen on {address} (--metrics-listen): address already in use"
    ), line
    assert line.endswith('or --metrics-listen "" to serve no metrics'), line


@pytest.mark.parametrize("busy", ["metrics_listen", "health_listen", "listen"])
def test_a_failed_start_leaves_no_port_bound(tmp_path: Path, busy: str) -> None:
    """Every port bound before the one that fails is released (in-process, to look at the ports)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = f"127.0.0.1:{holder.getsockname()[1]}"
        ports = {name: free_port() for name in ("listen", "metrics_listen", "health_listen")}
        addresses = {name: taken if name == busy else f"127.0.0.1:{port}" for name, port in ports.items()}
        service = ServiceConfig(**addresses, state_dir=str(tmp_path / "s"), insecure=True)
        with safe_structlog(), pytest.raises(FatalError, match=f"cannot listen on {taken}"):
            start_in_process(service, CoordinatorConfig(federation="mtfl"))
    for name, port in ports.items():
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free again: nothing of the failed start holds it
        assert name != busy or port != 0


def test_listen_addresses_are_checked_at_config_time(tmp_path: Path) -> None:
    rc, line, _ = run_cli("aggregator", "--insecure", "true", "--state-dir", str(tmp_path), "--metrics-listen", "9464")
    assert rc == 2
    assert line.startswith(
        "fedgradnorm aggregator: error: invalid ServiceConfig: metrics_listen (--metrics-listen, "
        "FEDGRADNORM_METRICS_LISTEN) must be HOST:PORT"
    ), line


# -- fedgradnorm state ----------------------------------------------------------------------------


def test_state_against_a_stopped_aggregator_says_so() -> None:
    address = f"127.0.0.1:{free_port()}"
    rc, line, _ = run_cli("state", "--aggregator", address, "--insecure", "true", "--timeout", "5")
    assert rc == 2
    assert line == (
        f"fedgradnorm state: error: cannot reach the aggregator at {address}: connection refused "
        "(is it running? check --aggregator)"
    )


def test_state_without_a_port_names_the_flag() -> None:
    rc, line, _ = run_cli("state", "--aggregator", "localhost", "--insecure", "true")
    assert rc == 2
    assert line == (
        "fedgradnorm state: error: --aggregator must be HOST:PORT (e.g. 127.0.0.1:50051; IPv6 as [::1]:50051), "
        "not 'localhost' (without a port gRPC dials port 443)"
    )


# -- a misconfigured edge node --------------------------------------------------------------------

NODE = ["--federation", "radcom", "--task", "modulation", "--synthetic-size", "10", "--torch-threads", "1"]


def test_an_edge_node_without_a_port_stops_at_once_naming_the_flag(tmp_path: Path) -> None:
    rc, line, seconds = run_cli("edge-node", "--aggregator", "localhost", "--insecure", "true", *NODE)
    assert rc == 2
    assert line == (
        "fedgradnorm edge-node: error: invalid EdgeConfig: aggregator (--aggregator, FEDGRADNORM_AGGREGATOR) "
        "must be HOST:PORT (e.g. 127.0.0.1:50051; IPv6 as [::1]:50051), not 'localhost' "
        "(without a port gRPC dials port 443)"
    )
    assert seconds < 30


@pytest.mark.parametrize("factor", ["-1", "nan", "inf"])
def test_an_edge_node_with_a_bad_loss_scale_stops_at_once(factor: str) -> None:
    rc, line, _ = run_cli("edge-node", "--insecure", "true", "--loss-scale", factor, *NODE)
    assert rc == 2
    assert line == (
        "fedgradnorm edge-node: error: invalid EdgeConfig: loss_scale must be 0 (as the federation declares) "
        f"or a finite factor above 0, not {float(factor)}"
    )


def test_the_demo_refuses_a_loss_scale_of_a_task_its_federation_lacks() -> None:
    rc, line, _ = run_cli("demo", "--federation", "radcom")  # the default scales the MTFL landmarks
    assert rc == 2
    assert line == (
        "fedgradnorm demo: error: invalid DemoConfig: loss_scale 'landmarks=100' names landmarks, not a task "
        "of radcom (modulation, signal, anomaly); give --loss-scale '' for none"
    )


def test_an_error_cuts_a_huge_value_it_echoes() -> None:
    """A 100,000-character task name in a flag: the one error line names the problem and stays short."""
    huge = "a" * 100_000
    rc, line, _ = run_cli("demo", "--loss-scale", f"{huge}=1")
    assert rc == 2
    assert line.startswith("fedgradnorm demo: error: invalid DemoConfig: loss_scale 'aaaa"), line[:200]
    assert len(line) < 2200 and line.endswith(" more characters)"), line[-200:]


@pytest.mark.parametrize("federation", ["mtfl", "radcom"])
def test_a_synthetic_set_too_large_for_the_machine_is_refused_before_writing(tmp_path: Path, federation: str) -> None:
    """--synthetic-size 10^12: refused at once, naming the size and the room there is; nothing is
    written to the cache (it would otherwise fill the disk, face by face)."""
    cache = tmp_path / "cache"
    env = {"FEDGRADNORM_CACHE_DIR": str(cache)}
    argv = ("simulate", "--federation", federation, "--synthetic-size", str(10**12), "--out", str(tmp_path / "o"))
    rc, line, _ = run_cli(*argv, env=env)
    assert rc == 2
    assert line.startswith(f"fedgradnorm simulate: error: {cache}/"), line
    assert f"a synthetic set of size {10**12} needs about " in line and "give a smaller --synthetic-size" in line
    assert not cache.exists() or list(cache.iterdir()) == []


@pytest.fixture
def tls_aggregator(procs: Processes, tmp_path: Path, certs: Path) -> str:
    proc, ready = start_aggregator(
        tmp_path, ["--federation", "radcom", "--state-dir", str(tmp_path / "agg")], certs=certs
    )
    procs.add(proc)
    return f"127.0.0.1:{ready['grpc_port']}"


def test_an_edge_node_with_the_wrong_tls_server_name_stops(tls_aggregator: str, certs: Path, tmp_path: Path) -> None:
    flags = [*client_tls_flags(certs)[:-1], "wrong.example"]  # --tls-server-name wrong.example
    rc, line, seconds = run_cli(
        "edge-node", "--aggregator", tls_aggregator, "--state-dir", str(tmp_path / "n"), *flags, *NODE
    )
    assert rc == 2
    assert line.startswith(
        f"fedgradnorm edge-node: error: cannot connect to the aggregator at {tls_aggregator}, TLS does not match (5 attempts): "
        "the aggregator's certificate does not carry the name this node checks: set --tls-server-name"
    ), line
    assert "Hostname Verification Check failed" in line
    assert seconds < 30


@pytest.mark.long  # waits for real retries: make test-faults, run by CI
def test_a_plaintext_edge_node_against_a_tls_aggregator_stops(tls_aggregator: str, tmp_path: Path) -> None:
    rc, line, seconds = run_cli(
        "edge-node", "--aggregator", tls_aggregator, "--state-dir", str(tmp_path / "n"), "--insecure", "true", *NODE
    )
    assert rc == 2
    assert line.startswith(
        f"fedgradnorm edge-node: error: cannot connect to the aggregator at {tls_aggregator}, TLS does not match (5 attempts): "
        "the aggregator speaks TLS and this node plaintext: give --tls-ca (and --tls-cert/--tls-key)"
    ), line
    assert seconds < 30


@pytest.mark.long  # waits for real retries: make test-faults, run by CI
def test_an_edge_node_with_a_certificate_of_another_ca_stops(
    tls_aggregator: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, certs: Path
) -> None:
    rogue = tmp_path_factory.mktemp("rogue")
    make_certificates(rogue)
    flags = ["--tls-ca", str(certs / "ca.pem"), "--tls-cert", str(rogue / "client.pem")]
    flags += ["--tls-key", str(rogue / "client.key"), "--tls-server-name", "localhost"]
    rc, line, seconds = run_cli(
        "edge-node", "--aggregator", tls_aggregator, "--state-dir", str(tmp_path / "n"), *flags, *NODE
    )
    assert rc == 2
    assert line.startswith(
        f"fedgradnorm edge-node: error: cannot connect to the aggregator at {tls_aggregator}, TLS does not match (5 attempts): "
        "the aggregator closed the connection after the TLS handshake: it refused this node's client certificate; "
        "give --tls-cert/--tls-key signed by the CA the aggregator trusts (its --tls-client-ca)"
    ), line
    assert seconds < 30


@pytest.mark.long  # waits for real retries: make test-faults, run by CI
def test_an_edge_node_keeps_retrying_an_aggregator_that_is_away(tmp_path: Path) -> None:
    """Connection refused is not a misconfiguration: the node keeps trying, and says where it dials."""
    address = f"127.0.0.1:{free_port()}"
    argv = cli("edge-node", "--aggregator", address, "--state-dir", str(tmp_path / "n"), "--insecure", "true", *NODE)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(12)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert f'"target": "{address}"' in err and "Connection refused" in err, err[-3000:]


# -- the enrolment token --------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["change-me-before-deploying", " CHANGE-ME "])
def test_the_aggregator_refuses_the_placeholder_enrolment_token(tmp_path: Path, token: str) -> None:
    rc, line, _ = run_cli(
        "aggregator", "--insecure", "true", "--state-dir", str(tmp_path), "--metrics-listen", "",
        env={"FEDGRADNORM_ENROLLMENT_TOKEN": token},
    )  # fmt: skip
    assert rc == 2
    assert line == (
        "fedgradnorm aggregator: error: invalid CoordinatorConfig: the enrolment token (FEDGRADNORM_ENROLLMENT_TOKEN "
        f"or --enrollment-token) is the placeholder {token!r}, public in the manifests' history: set a random one, "
        "e.g. $(openssl rand -hex 32) (docs/operations.md, 'Rotate the enrollment token')"
    )
    assert not (tmp_path / "aggregator-state.pt").exists()
