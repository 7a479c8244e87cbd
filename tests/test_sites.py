"""Sites: relays and their edge nodes in network namespaces of their own (``ip netns``), one site
cut from the aggregator mid-round and healed again.

Topology (every name carries the test's pid, so concurrent runs do not clash)::

    root namespace (the test) --veth-- aggregator namespace (aggregator on 0.0.0.0:PORT)
                                          |                      |
                                        veth                   veth
                                          |                      |
                          site A namespace                site B namespace
                          relay site-a, 127.0.0.1:50061   relay site-b, 127.0.0.1:50061
                          edge nodes a-mod, a-sig         edge nodes b-ano, b-mod
                          (they dial the relay on the site's loopback)

Each link is a /30 of 10.200.K.0/24 (K free in the root namespace). Partitioning site B takes its
uplink interface down (``ip -n SITE_B link set IF down``): relay B loses the aggregator, its nodes
still reach relay B. Healing brings it up again. The test reads the aggregator's GetState over its
own link, and its log and metrics.jsonl from the shared file system.

What it shows: the round open when site B is cut closes by its deadline (plus relay_timeout when
B's scalars were already in) with site A's updates only; later rounds keep closing without B;
the aggregator drops B's nodes and relay B's session; after the heal relay B attaches again at
once, and B's nodes resume (same ids, same F_0) and take part in rounds again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from fedgradnorm.data.sources import synthetic_radcom
from fedgradnorm.launch import ServiceProcess, start_aggregator, start_edge_node, start_relay
from tests.faults_helpers import Processes, log_events, metrics_records, nodes_of, wait_until
from tests.grpc_client import connect, state

ROUND_TIMEOUT = 8.0
RELAY_TIMEOUT = 3.0
HEARTBEAT_TIMEOUT = 10.0  # above a node's start-up (register to first heartbeat) on a busy machine
PARTITION = 20.0  # at least: beyond heartbeat_timeout, so the aggregator ends relay B's session too
SLACK = 3.0  # a step, a commit and scheduling on a busy 2-core machine
STARTUP = 240.0  # seven processes importing torch at once: 25 s here, minutes when the machine is swamped
AGGREGATOR = [
    "--federation", "radcom", "--tau-h", "2", "--tau-omega", "2", "--batch-size", "8", "--seed", "0",
    "--min-nodes", "2", "--round-timeout", str(ROUND_TIMEOUT), "--relay-timeout", str(RELAY_TIMEOUT),
    "--heartbeat-interval", "0.5", "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT), "--torch-threads", "1",
]  # fmt: skip
RELAY = ["--torch-threads", "1", "--max-backoff", "1", "--max-fetch-wait", "5"]
NODE = [
    "--federation", "radcom", "--seed", "0", "--synthetic-size", "20", "--torch-threads", "1",
    "--fetch-wait", "2", "--max-backoff", "1",
]  # fmt: skip
RELAY_PORT = 50061  # on each site's own loopback
SITE_NODES = {"a": {"a-mod": "modulation", "a-sig": "signal"}, "b": {"b-ano": "anomaly", "b-mod": "modulation"}}


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@dataclass
class Sites:
    """The namespaces and links of one test run, and every process started in them."""

    tag: str
    subnet: int  # K of 10.200.K.0/24
    workdir: Path
    procs: Processes = field(default_factory=Processes)
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # root-namespace ends, deleted explicitly

    def ns(self, site: str) -> str:
        return f"fgn{self.tag}-{site}"

    def uplink(self, site: str) -> str:
        """The site's end of its link to the aggregator (the interface a partition takes down)."""
        return f"fg{self.tag}s{site}"

    def addr(self, host: int) -> str:
        return f"10.200.{self.subnet}.{host}"

    def wrap(self, site: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(site)]

    def aggregator_from(self, site: str) -> str:
        """The aggregator's address on a site's link ("root": the test's own link)."""
        return self.addr({"a": 1, "b": 5, "root": 9}[site])

    def build(self) -> None:
        self.namespaces.append(self.ns("agg"))
        ip("netns", "add", self.ns("agg"))
        ip("-n", self.ns("agg"), "link", "set", "lo", "up")
        # (site, aggregator-side host, site-side host); the root end stays in the root namespace.
        for site, base in (("a", 0), ("b", 4), ("root", 8)):
            agg_end, site_end = f"fg{self.tag}a{site[0]}", f"fg{self.tag}s{site[0]}"
            if site == "root":
                site_end = f"fg{self.tag}rr"
                self.links.append(site_end)
            ip("link", "add", agg_end, "type", "veth", "peer", "name", site_end)
            if site != "root":
                self.links.append(site_end)  # until it moves into its namespace
                self.namespaces.append(self.ns(site))
                ip("netns", "add", self.ns(site))
                ip("-n", self.ns(site), "link", "set", "lo", "up")
                ip("link", "set", site_end, "netns", self.ns(site))
                self.links.remove(site_end)
            ip("link", "set", agg_end, "netns", self.ns("agg"))
            ip("-n", self.ns("agg"), "addr", "add", f"{self.addr(base + 1)}/30", "dev", agg_end)
            ip("-n", self.ns("agg"), "link", "set", agg_end, "up")
            target = [] if site == "root" else ["-n", self.ns(site)]
            ip(*target, "addr", "add", f"{self.addr(base + 2)}/30", "dev", site_end)
            ip(*target, "link", "set", site_end, "up")

    def teardown(self) -> None:
        """Stop every process first (a namespace lives on while a process is in it), then delete
        the namespaces (their veths go with them) and the root end of the test's link. The nodes,
        then the relays, then the aggregator: each tier signalled at once (one at a time, seven
        processes took a minute to exit on a busy machine)."""
        tiers = (
            [p for p in self.procs.procs if not p.name.startswith(("relay-", "aggregator"))],
            [p for p in self.procs.procs if p.name.startswith("relay-")],
            [p for p in self.procs.procs if p.name.startswith("aggregator")],
        )
        errors: list[BaseException] = []
        for tier in tiers:
            for p in tier:
                if p.proc is not None and p.proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.proc.send_signal(signal.SIGTERM)
            for p in tier:
                try:
                    p.stop(timeout=15)
                except BaseException as e:  # whatever happens, nothing is left running: raised below
                    errors.append(e)
                    if p.proc is not None and p.proc.returncode is None:  # not reaped: still its pid
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(p.pid, signal.SIGKILL)
        for ns in reversed(self.namespaces):
            ip("netns", "del", ns, check=False)
        for link in self.links:
            ip("link", "del", link, check=False)
        if errors:
            raise errors[0]

    def partition(self, site: str) -> None:
        ip("-n", self.ns(site), "link", "set", self.uplink(site), "down")

    def heal(self, site: str) -> None:
        ip("-n", self.ns(site), "link", "set", self.uplink(site), "up")


def free_subnet(start: int) -> int:
    """A K whose 10.200.K.0/24 has no address in the root namespace (the only one shared)."""
    used = ip("-4", "-o", "addr", "show").stdout
    for i in range(250):
        k = 3 + (start + i) % 250
        if f" 10.200.{k}." not in used:
            return k
    raise RuntimeError("no free 10.200.K.0/24 in the root namespace")


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[Sites]:
    """The namespaces and links; always torn down (processes stopped, namespaces deleted)."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("iproute2's ip is not installed")
    tag = str(os.getpid())
    probe = f"fgn{tag}-probe"
    res = ip("netns", "add", probe, check=False)
    if res.returncode != 0:
        pytest.skip(f"ip netns is not available here: {res.stderr.strip()}")
    try:
        res = ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1", check=False)
        if res.returncode != 0:
            pytest.skip(f"veth links are not available here: {res.stderr.strip()}")
    finally:
        ip("netns", "del", probe, check=False)
    s = Sites(tag=tag, subnet=free_subnet(os.getpid()), workdir=tmp_path)
    for ns in (s.ns("agg"), s.ns("a"), s.ns("b")):  # left over by a killed run with the same pid
        ip("netns", "del", ns, check=False)
    ip("link", "del", f"fg{tag}rr", check=False)
    try:
        s.build()
        yield s
    finally:
        s.teardown()


def events(proc: ServiceProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in log_events(proc) if e.get("event") == name]


def unix(event: dict[str, Any]) -> float:
    """The wall time of a log event (its ISO timestamp, UTC)."""
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def rows(state_dir: Path, round_: int) -> list[dict[str, Any]]:
    return [x for x in metrics_records(state_dir) if x["round"] == round_]


def clients(state_dir: Path, round_: int) -> set[str]:
    return {x["client"] for x in rows(state_dir, round_)}


def full_rounds(state_dir: Path) -> list[set[str]]:
    """The nodes of each closed round."""
    by_round: dict[int, set[str]] = {}
    for x in metrics_records(state_dir):
        by_round.setdefault(x["round"], set()).add(x["client"])
    return list(by_round.values())


@pytest.mark.long
@pytest.mark.timeout(600)  # about a minute here; start-up alone took four on a swamped machine
def test_partitioned_site_costs_only_its_nodes_and_rejoins_after_the_partition_heals(sites: Sites) -> None:
    t_start = time.monotonic()
    work, procs = sites.workdir, sites.procs
    state_dir = work / "state"
    synthetic_radcom(0, 20)  # the nodes' data set, made once here rather than by four nodes at once
    agg, ready = start_aggregator(
        work, [*AGGREGATOR, "--listen", "0.0.0.0:0", "--state-dir", str(state_dir)], wrap=sites.wrap("agg")
    )
    procs.add(agg)
    port = ready["grpc_port"]
    # A site's loopback is its own: each relay takes the default port, so the nodes need not wait
    # for their relay's ready file, and everything starts at once (the nodes retry until it serves).
    with ThreadPoolExecutor(len(SITE_NODES)) as pool:
        starting = {
            site: pool.submit(
                start_relay,
                work,
                f"{sites.aggregator_from(site)}:{port}",
                f"site-{site}",
                RELAY,
                listen=f"127.0.0.1:{RELAY_PORT}",
                wrap=sites.wrap(site),
                timeout=STARTUP,
            )
            for site in SITE_NODES
        }
        nodes = {
            name: procs.add(start_edge_node(work, RELAY_PORT, task, NODE, name=name, wrap=sites.wrap(site)))
            for site, members in SITE_NODES.items()
            for name, task in members.items()
        }
        relays: dict[str, ServiceProcess] = {}
        for site, future in starting.items():  # every relay that started is stopped at the end
            with contextlib.suppress(Exception):
                relays[site] = procs.add(future.result()[0])
        for future in starting.values():
            future.result()  # raises the first relay's failure, if any
    a_nodes, b_nodes = set(SITE_NODES["a"]), set(SITE_NODES["b"])

    def alive() -> None:
        for p in procs.procs:
            assert p.alive(), f"{p.name} exited:\n{p.log_text()[-3000:]}"

    def until(pred: Callable[[], Any], timeout: float, what: str) -> Any:
        return wait_until(lambda: alive() or pred(), timeout, what, interval=0.2)

    channel, stub = connect(port, host=sites.aggregator_from("root"))  # over the test's own link
    try:
        # Every node takes part, through its site's relay.
        until(lambda: a_nodes | b_nodes in full_rounds(state_dir), STARTUP, "a round with every node")
        members = nodes_of(stub)
        assert {n: m.relay for n, m in members.items()} == {
            **dict.fromkeys(a_nodes, "site-a"),
            **dict.fromkeys(b_nodes, "site-b"),
        }
        f0 = {n: members[n].initial_loss for n in b_nodes}
        t_ready = time.monotonic()

        # Cut site B mid-round: as soon as relay B has fetched a new round's omega for its nodes.
        fetched = len(events(relays["b"], "relay.round"))
        wait_until(lambda: len(events(relays["b"], "relay.round")) > fetched, 60, "relay B to fetch a round")
        sites.partition("b")
        t_cut, cut_unix = time.monotonic(), time.time()
        k = events(relays["b"], "relay.round")[fetched]["round"]
        opened = [e for e in events(agg, "round.open") if e["round"] == k][-1]
        assert b_nodes <= set(opened["participants"]), opened  # B's nodes were in the round when cut
        unreachable = {n: len(events(nodes[n], "aggregator.unreachable")) for n in b_nodes}

        # Round k closes by its deadline with site A's updates and without B's: at the deadline,
        # or (B's scalars already reported) relay_timeout after the last update came in.
        until(lambda: rows(state_dir, k), ROUND_TIMEOUT + RELAY_TIMEOUT + 30, f"round {k} to close")
        closed = rows(state_dir, k)
        emptied = [e for e in events(agg, "round.empty") if e["round"] == k and unix(e) > cut_unix]
        assert not emptied, f"the opening of round {k} cut mid-round closed without any update: {emptied}"
        assert closed[0]["closed_unix"] - closed[0]["round_seconds"] < cut_unix + 0.5  # that same opening
        assert {x["client"] for x in closed} == a_nodes, closed
        assert sum(x["weight"] for x in closed) == pytest.approx(len(closed))
        lost = [e for e in events(agg, "relay.lost") if e["round"] == k and unix(e) > cut_unix]
        assert {e["relay"] for e in lost} <= {"site-b"}, lost
        closing = [e for e in events(agg, "round.closed") if e["round"] == k][-1]
        assert lost or b_nodes <= set(closing["stragglers"]), (closing, lost)
        bound = ROUND_TIMEOUT + (RELAY_TIMEOUT if lost else 0.0) + SLACK
        assert closed[0]["round_seconds"] <= bound, (closed[0]["round_seconds"], bound, lost)

        # Later rounds keep closing, without B; the aggregator drops B's nodes (silent for
        # heartbeat_timeout) and ends relay B's session.
        until(lambda: rows(state_dir, k + 2), 2 * ROUND_TIMEOUT + 30, f"rounds {k + 1} and {k + 2}")
        for r in (k + 1, k + 2):
            assert clients(state_dir, r) == a_nodes, rows(state_dir, r)
            assert rows(state_dir, r)[0]["round_seconds"] <= ROUND_TIMEOUT + SLACK
        until(lambda: not any(nodes_of(stub)[n].active for n in b_nodes), HEARTBEAT_TIMEOUT + 15, "B's nodes dropped")
        until(lambda: [e for e in events(agg, "relay.silent") if e["relay"] == "site-b"], 30, "relay B's session end")
        time.sleep(max(0.0, PARTITION - (time.monotonic() - t_cut)))
        assert events(relays["b"], "upstream.unreachable"), "relay B never noticed the partition"
        assert not [x for x in metrics_records(state_dir) if x["round"] >= k and x["client"] in b_nodes]
        # Inside site B nothing was cut: its nodes never lost their relay.
        assert {n: len(events(nodes[n], "aggregator.unreachable")) for n in b_nodes} == unreachable

        # Heal: relay B attaches again; B's nodes, told by it that they are unknown, resume (same
        # ids, F_0 kept) and take part in rounds again.
        partition_seconds = time.monotonic() - t_cut
        attached = len(events(relays["b"], "relay.attached"))
        healed_round = state(stub).round
        sites.heal("b")
        t_heal, heal_unix = time.monotonic(), time.time()
        until(lambda: len(events(relays["b"], "relay.attached")) > attached, 30, "relay B to attach again")
        reattach_seconds = unix(events(relays["b"], "relay.attached")[attached]) - heal_unix
        assert reattach_seconds < 10, f"relay B attached again only {reattach_seconds:.1f} s after the heal"
        until(lambda: all(nodes_of(stub)[n].last_round > healed_round for n in b_nodes), 90, "B's nodes back")
        rejoin_seconds = time.monotonic() - t_heal
        after = nodes_of(stub)
        assert set(after) == a_nodes | b_nodes  # no new member
        assert all(after[n].active and after[n].relay == "site-b" for n in b_nodes)
        assert {n: after[n].initial_loss for n in b_nodes} == f0
        for n in b_nodes:
            until(lambda n=n: rows(state_dir, after[n].last_round), 30, f"round {after[n].last_round}'s rows")
            assert n in clients(state_dir, after[n].last_round)
            assert [e for e in events(nodes[n], "node.registered") if e.get("resumed") and unix(e) > heal_unix], n
        alive()
        failures = [e for p in relays.values() for e in events(p, "relay.loop_failed")]
        assert not failures, failures
        print(
            f"timings: setup {t_ready - t_start:.1f} s, cut in round {k}, which closed after "
            f"{closed[0]['round_seconds']:.1f} s (relay lost: {bool(lost)}); partition {partition_seconds:.1f} s; "
            f"relay B attached {reattach_seconds:.1f} s and B's nodes took part {rejoin_seconds:.1f} s after the "
            f"heal; total {time.monotonic() - t_start:.1f} s"
        )
    finally:
        channel.close()
