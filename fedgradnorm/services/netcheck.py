"""Addresses and connection failures, in words an operator can act on.

gRPC reports a port it cannot bind as "Failed to bind" and a TLS mismatch as a connection that is
UNAVAILABLE, like an aggregator that is away. These helpers check HOST:PORT at config time, find
the operating system's reason for a failed bind, and tell a misconfigured TLS setup (which no retry
fixes) from an aggregator that is merely not there yet.
"""

from __future__ import annotations

import errno
import re
import socket
import ssl

# A gRPC target in a resolver's syntax (dns:///host:port, unix:path, ipv4:...) is passed through as is.
_SCHEME = re.compile(r"^(dns|unix|unix-abstract|ipv4|ipv6|vsock|xds):")


def check_host_port(value: str, setting: str, *, listen: bool = False) -> None:
    """Raise ValueError naming ``setting`` unless ``value`` is HOST:PORT (``listen``: HOST may be
    empty, PORT may be 0)."""
    if not listen and _SCHEME.match(value):
        return
    host, sep, port = value.rpartition(":")
    example = "0.0.0.0:50051" if listen else "127.0.0.1:50051"
    if not sep or (not host and not listen) or (host.count(":") and not (host.startswith("[") and host.endswith("]"))):
        why = " (without a port gRPC dials port 443)" if not listen and not sep else ""
        raise ValueError(f"{setting} must be HOST:PORT (e.g. {example}; IPv6 as [::1]:50051), not {value!r}{why}")
    if not port.isdigit() or not (0 if listen else 1) <= int(port) <= 65535:
        raise ValueError(f"{setting}: {port!r} in {value!r} is not a port number")


def split_host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def bind_error(address: str) -> str | None:
    """Why ``address`` (HOST:PORT) cannot be bound, from the operating system: e.g. "address already
    in use"; None if it can. Binds a throwaway socket the way servers do (SO_REUSEADDR) and closes it."""
    host, port = split_host_port(address)
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return f"cannot resolve {host!r} ({e.strerror})"
    errors: list[OSError] = []
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(sockaddr)
            return None  # as gRPC: serving on one of the resolved addresses is enough
        except OSError as e:
            errors.append(e)
    # The telling reason first: in use or not allowed, rather than an address family this host lacks.
    errors.sort(key=lambda e: e.errno not in (errno.EADDRINUSE, errno.EACCES))
    return os_reason(errors[0]) if errors else None


def os_reason(e: OSError) -> str:
    if e.errno == errno.EADDRINUSE:
        return "address already in use (another process listens there)"
    return (e.strerror or str(e)).lower()


# Certificate and protocol failures: definite misconfiguration, not a link or an aggregator that is down.
# (SSL_ERROR_SYSCALL, an EOF during the handshake, is left out: a cut link produces it too.)
_TLS_FAILURE = re.compile(r"SSL_ERROR_SSL|verification check failed|CERTIFICATE_VERIFY_FAILED", re.IGNORECASE)
_SOCKET_CLOSED = re.compile(r"socket closed", re.IGNORECASE)


def tls_failure(details: str) -> bool:
    """``details`` (of an UNAVAILABLE status) reports a failed TLS handshake or certificate check."""
    return bool(_TLS_FAILURE.search(details or ""))


def closed_on_connect(details: str) -> bool:
    """The aggregator's end closed the connection during setup: plaintext against TLS, or a client
    certificate it refused, look like this (as does a proxy in front of a stopped aggregator)."""
    return bool(_SOCKET_CLOSED.search(details or ""))


def tls_hint(details: str) -> str:
    """What to check for a TLS failure whose gRPC ``details`` are given."""
    if re.search(r"hostname verification|verification check failed", details, re.IGNORECASE):
        return "the aggregator's certificate does not carry the name this node checks: set --tls-server-name to one of its names"
    if "WRONG_VERSION_NUMBER" in details:
        return "the aggregator serves plaintext: give this node --insecure true, or the aggregator TLS certificates"
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return "the aggregator's certificate is not signed by --tls-ca: give the CA that signed it"
    return "check --tls-server-name, --tls-ca and plaintext (--insecure) against TLS"


def probe_tls(
    address: str, *, insecure: bool, ca: str = "", cert: str = "", key: str = "", timeout: float = 3.0
) -> str | None:
    """After connections closed during setup: find out whether TLS is the cause. Returns what to
    check, or None when the probe learns nothing (the aggregator or the link is simply away).

    Plaintext node: a TLS handshake with ``address`` that gets a TLS answer means the aggregator
    speaks TLS. TLS node: a handshake with the node's own certificate after which the aggregator
    closes the connection (or sends an alert) means it refuses that certificate."""
    if _SCHEME.match(address):
        return None
    host, port = split_host_port(address)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.set_alpn_protocols(["h2"])
    if insecure:
        context.verify_mode = ssl.CERT_NONE
    else:
        try:
            context.load_verify_locations(ca)
            if cert and key:
                context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError):
            return None
    refused = (
        "the aggregator closed the connection after the TLS handshake: it refused this node's client certificate; "
        "give --tls-cert/--tls-key signed by the CA the aggregator trusts (its --tls-client-ca)"
        if cert
        else "the aggregator requires a client certificate (mutual TLS): give --tls-cert/--tls-key"
    )
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host or None) as tls,
        ):
            if insecure:
                return "the aggregator speaks TLS and this node plaintext: give --tls-ca (and --tls-cert/--tls-key)"
            # TLS 1.3 checks the client certificate after the client's side of the handshake: the
            # aggregator then closes at once (or sends an alert), where it would send HTTP/2 settings.
            try:
                return None if tls.recv(1) else refused
            except TimeoutError:
                return None
    except ssl.SSLError as e:
        reason = str(getattr(e, "reason", "") or e)
        if "ALERT" not in reason.upper():
            return None
        if insecure:
            return "the aggregator speaks TLS and this node plaintext: give --tls-ca (and --tls-cert/--tls-key)"
        return f"{refused} ({reason})"
    except OSError:
        return None
