"""Subcommands beyond the library's own: the services, the state query and the main job (demo).

gRPC and the services are imported only when one of these commands runs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from fedgradnorm import config as cfgmod
from fedgradnorm.errors import FatalError
from fedgradnorm.machine import limit_malloc_arenas
from fedgradnorm.services.tls import ClientTLSSettings


def _aggregator(args: argparse.Namespace) -> int:
    from fedgradnorm.services.aggregator.config import CoordinatorConfig, ServiceConfig
    from fedgradnorm.services.aggregator.server import serve_forever

    limit_malloc_arenas()
    return serve_forever(cfgmod.build(ServiceConfig, args), cfgmod.build(CoordinatorConfig, args))


def register_aggregator(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from fedgradnorm.services.aggregator.config import CoordinatorConfig, ServiceConfig

    p = sub.add_parser(
        "aggregator",
        help="run the aggregator service (holds omega and p, runs the FedGradNorm server step)",
        description="Every flag can also be set by the FEDGRADNORM_<NAME> environment variable.",
    )
    cfgmod.add_flags(p, ServiceConfig)
    cfgmod.add_flags(p, CoordinatorConfig)
    p.set_defaults(func=_aggregator)


def _relay(args: argparse.Namespace) -> int:
    from fedgradnorm.services.relay.config import RelayConfig
    from fedgradnorm.services.relay.server import serve_forever

    limit_malloc_arenas()
    return serve_forever(cfgmod.build(RelayConfig, args))


def register_relay(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from fedgradnorm.services.relay.config import RelayConfig

    p = sub.add_parser(
        "relay",
        help="run a relay: the aggregator's service for one site's edge nodes, one partial sum upstream per round",
        description="Every flag can also be set by the FEDGRADNORM_<NAME> environment variable.",
    )
    cfgmod.add_flags(p, RelayConfig)
    p.set_defaults(func=_relay)


def _edge_node(args: argparse.Namespace) -> int:
    from fedgradnorm.services.edge_node.config import EdgeConfig
    from fedgradnorm.services.edge_node.main import serve_edge_node

    limit_malloc_arenas()
    return serve_edge_node(cfgmod.build(EdgeConfig, args), max_rounds=args.max_rounds)


def register_edge_node(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from fedgradnorm.services.edge_node.config import EdgeConfig

    p = sub.add_parser(
        "edge-node",
        help="run an edge node: one task's client loop against an aggregator",
        description="Every flag can also be set by the FEDGRADNORM_<NAME> environment variable.",
    )
    cfgmod.add_flags(p, EdgeConfig)
    p.add_argument("--max-rounds", type=int, default=0, help="leave after this many rounds (0: until the end)")
    p.set_defaults(func=_edge_node)


def plain(message: Message) -> dict[str, Any]:
    """A message as plain JSON-ready Python: every field (zero values too), integers as numbers
    (proto3 JSON writes int64 as strings), enums by name, unset optional fields as None."""
    out: dict[str, Any] = {}
    for f in message.DESCRIPTOR.fields:
        value = getattr(message, f.name)
        sub = f.message_type
        if sub is not None and sub.GetOptions().map_entry:
            inner = sub.fields_by_name["value"]
            out[f.name] = {k: plain(v) if inner.message_type else v for k, v in value.items()}
        elif f.is_repeated:
            out[f.name] = [plain(v) if sub else _scalar(f, v) for v in value]
        elif f.has_presence and not message.HasField(f.name):
            out[f.name] = None
        else:
            out[f.name] = plain(value) if sub else _scalar(f, value)
    return out


def _scalar(f: FieldDescriptor, value: Any) -> Any:
    if f.enum_type is not None:
        known = f.enum_type.values_by_number.get(value)
        return known.name if known else value
    return value


def _state(args: argparse.Namespace) -> int:
    import grpc

    from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2 as pb
    from fedgradnorm._proto.fedgradnorm.v1 import aggregator_pb2_grpc as pb_grpc
    from fedgradnorm.services.netcheck import check_host_port

    check_host_port(args.aggregator, "--aggregator")
    tls = cfgmod.build(ClientTLSSettings, args)
    with tls.tls().channel(args.aggregator, []) as channel:
        stub = pb_grpc.AggregatorStub(channel)
        try:
            state = stub.GetState(pb.GetStateRequest(), timeout=args.timeout)
            while state.next_page_token:  # every node, however many pages they take
                page = stub.GetState(pb.GetStateRequest(page_token=state.next_page_token), timeout=args.timeout)
                state.nodes.extend(page.nodes)
                state.next_page_token = page.next_page_token
        except grpc.RpcError as e:
            raise FatalError(_state_failure(args.aggregator, args.timeout, tls, e)) from None
    print(json.dumps(plain(state), indent=2))
    return 0


def _state_failure(address: str, timeout: float, tls: ClientTLSSettings, e: Any) -> str:
    """One line for a GetState that failed: the address, gRPC's reason, what to check."""
    import grpc

    from fedgradnorm.services.netcheck import closed_on_connect, probe_tls, tls_failure, tls_hint

    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer from the aggregator at {address} within {timeout:g} s (--timeout): {details}"
    if code != grpc.StatusCode.UNAVAILABLE:
        return f"the aggregator at {address} answered {code.name}: {details}"
    if tls_failure(details):
        return f"TLS with the aggregator at {address} failed: {details}; {tls_hint(details)}"
    if closed_on_connect(details):
        hint = probe_tls(address, insecure=tls.insecure, ca=tls.tls_ca, cert=tls.tls_cert, key=tls.tls_key)
        if hint:
            return f"the aggregator at {address} closed the connection: {hint}"
    if "refused" in details.lower():
        return f"cannot reach the aggregator at {address}: connection refused (is it running? check --aggregator)"
    return f"cannot reach the aggregator at {address}: {details}"


def register_state(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("state", help="print the aggregator's state (round, nodes, weights) as JSON")
    p.add_argument("--aggregator", default="127.0.0.1:50051", help="aggregator address HOST:PORT")
    p.add_argument("--timeout", type=float, default=10.0, help="how long to wait for the answer, seconds (default 10)")
    cfgmod.add_flags(p, ClientTLSSettings)
    p.set_defaults(func=_state)


def _certs(args: argparse.Namespace) -> int:
    from fedgradnorm.certs import (
        DEFAULT_SERVER_NAMES,
        DEVELOPMENT_ORGANIZATION,
        ORGANIZATION,
        issue,
        issue_client,
        issue_relay,
        server_names,
        write_certificates,
        write_k8s_secrets,
    )

    if args.relay:
        if not args.ca_dir:
            raise ValueError("--relay NAME needs --ca-dir DIR (the folder of ca.pem and ca.key that --out wrote)")
        names = [n for n in (args.server_names or "").split(",") if n.strip()] + list(args.san)
        for what, path in issue_relay(args.ca_dir, args.relay, names, days=args.days, out=args.out or None).items():
            print(f"{what:<12} {path}")
        return 0
    if args.client:
        if not args.ca_dir:
            raise ValueError("--client NAME needs --ca-dir DIR (the folder of ca.pem and ca.key that --out wrote)")
        for what, path in issue_client(args.ca_dir, args.client, days=args.days, out=args.out or None).items():
            print(f"{what:<12} {path}")
        return 0
    if not (args.out or args.k8s_secrets):
        raise ValueError("give --out DIR (PEM files), --k8s-secrets FILE (Kubernetes Secrets) or both")
    given = args.server_names is not None
    base = [n for n in args.server_names.split(",") if n.strip()] if given else list(DEFAULT_SERVER_NAMES)
    names = server_names(base, args.san)
    organization = DEVELOPMENT_ORGANIZATION if args.development else ORGANIZATION
    certs = issue(names, days=args.days, organization=organization)
    if args.out:
        for what, path in write_certificates(certs, args.out).items():
            print(f"{what:<12} {path}")
    if args.k8s_secrets:
        command = " ".join(
            [
                "fedgradnorm certs",
                f"--k8s-secrets {args.k8s_secrets}",
                *(["--development"] if args.development else []),
                f"--days {args.days}",
                *([f"--server-names {args.server_names}"] if given else []),
                *(f"--san {n}" for n in args.san),
            ]
        )
        path = write_k8s_secrets(args.k8s_secrets, certs, names, development=args.development, command=command)
        print(f"{'k8s_secrets':<12} {path}")
    return 0


def register_certs(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from fedgradnorm.certs import AGGREGATOR_SECRET, EDGE_NODE_SECRET, RELAY_SECRET

    p = sub.add_parser(
        "certs",
        help="make a development CA, an aggregator, an edge-node and a relay certificate",
        description="A fresh CA (its key is written with --out only) signing a server certificate for the "
        "aggregator, one client certificate for the edge nodes and one relay certificate (role OU=relay) for "
        "the relays of deploy/k8s.",
    )
    p.add_argument("--out", default="", help="folder for ca.pem/.key, server.pem/.key, client.pem/.key, relay.pem/.key")
    p.add_argument(
        "--k8s-secrets",
        default="",
        metavar="FILE",
        help=f"write the Kubernetes Secrets {AGGREGATOR_SECRET}, {EDGE_NODE_SECRET} and {RELAY_SECRET} "
        "(type kubernetes.io/tls: tls.crt, tls.key, ca.crt) that deploy/k8s mounts",
    )
    p.add_argument(
        "--development",
        action="store_true",
        help="mark the certificates as the development PKI whose keys are public (deploy/k8s/01-tls-secrets.yaml); "
        "the services warn when they use such certificates",
    )
    p.add_argument(
        "--server-names",
        default=None,
        help="DNS names and IP addresses the aggregator is reached by (comma-separated; default: loopback "
        "and the in-cluster names of deploy/k8s's Services radcom-aggregator and mtfl-aggregator)",
    )
    p.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME",
        help="one more DNS name or IP address for the aggregator's certificate, e.g. the external name edge "
        "devices outside the cluster dial (repeatable; added to the default names or to --server-names)",
    )
    p.add_argument(
        "--client",
        default="",
        metavar="NAME",
        help="issue only a client certificate NAME.pem/NAME.key for one more edge device, signed by the CA "
        "in --ca-dir (written to --out, default the same folder)",
    )
    p.add_argument(
        "--relay",
        default="",
        metavar="NAME",
        help="issue only a relay certificate NAME.pem/NAME.key (role OU=relay; server and client) signed by the CA "
        "in --ca-dir, for the names its edge nodes dial (--server-names/--san; default loopback)",
    )
    p.add_argument(
        "--ca-dir", default="", metavar="DIR", help="with --client or --relay: the folder of ca.pem and ca.key"
    )
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    p.set_defaults(func=_certs)


def _demo(args: argparse.Namespace) -> int:
    from fedgradnorm.demo import DemoConfig, run_demo

    return run_demo(cfgmod.build(DemoConfig, args))


def register_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: an aggregator and three RadCom edge nodes on loopback, FedGradNorm then FedRep",
    )
    from fedgradnorm.demo import DemoConfig

    cfgmod.add_flags(p, DemoConfig)
    p.set_defaults(func=_demo)


REGISTRARS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    register_aggregator,
    register_relay,
    register_edge_node,
    register_state,
    register_certs,
    register_demo,
]
