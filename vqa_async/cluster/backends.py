"""Workers on other machines: named `--backend HOST:PORT`s, and `--backend-dns NAME:PORT`, a DNS name that lists
them (a Kubernetes headless Service, Consul, any A records), which HAProxy re-resolves while it runs, so that
workers come and go without a reload. This module checks the flags."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

DNS_SLOTS = 16
@dataclass(frozen=True)
class DnsBackends:
    """`server-template` slots filled from the A records of `name`; `resolver` None: /etc/resolv.conf's."""

    name: str
    port: int
    resolver: str | None = None
    slots: int = DNS_SLOTS


def _port(text: str, what: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{what}: the port must be a number from 1 to 65535, got {text!r}")
    return int(text)


def parse_backend(text: str) -> str:
    """HOST:PORT of a `vqa-async serve` elsewhere ([v6]:PORT for an IPv6 address)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"--backend {text!r}: expected HOST:PORT")
    _port(port, f"--backend {text!r}")
    return text


def parse_backend_dns(text: str, resolver: str | None = None, slots: int = DNS_SLOTS) -> DnsBackends:
    name, sep, port = text.rpartition(":")
    if not sep or not name or any(c.isspace() for c in name):
        raise ValueError(f"--backend-dns {text!r}: expected NAME:PORT, e.g. vqa-workers.vqa.svc.cluster.local:8000")
    if resolver is not None:
        ip, sep, rport = resolver.rpartition(":")
        try:
            ipaddress.ip_address(ip.strip("[]"))
        except ValueError:
            raise ValueError(f"--resolver {resolver!r}: expected IP:PORT, e.g. 10.96.0.10:53") from None
        _port(rport, f"--resolver {resolver!r}")
    if slots < 1:
        raise ValueError(f"--backend-dns-slots must be at least 1, got {slots}")
    return DnsBackends(name=name, port=_port(port, f"--backend-dns {text!r}"), resolver=resolver, slots=slots)

