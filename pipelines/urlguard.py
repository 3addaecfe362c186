"""The URL guard: which URLs the ingest job may fetch at all.

img2dataset fetches ``file://`` and ``data:`` URLs as readily as ``http://`` and will happily reach a
cloud metadata service or a database port on the private network (server-side request forgery).
So every URL is checked before the downloader sees it: only ``http``/``https``, and only hosts whose
*resolved* addresses are all public. Deciding on the resolved address (not the spelling of the
host) catches ``localhost``, ``127.1``, ``0x7f000001``, ``[::ffff:127.0.0.1]`` and DNS names that
point inside. ``allow_hosts`` lifts the guard for named hosts (a local image server, a private mirror).

Known gap: the name is resolved here and again by the downloader, so a DNS answer that changes in
between (DNS rebinding) is not caught; pinning the resolved address would need our own fetcher.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

ALLOWED_SCHEMES = frozenset({"http", "https"})
REASON_BLOCKED = "blocked_url"


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    detail: str = ""  # why not, when not allowed


Resolver = Callable[[str], list[str]]


@lru_cache(maxsize=4096)
def resolve_host(host: str) -> list[str]:
    """All addresses ``host`` resolves to (IPv4 and IPv6); raises OSError when it does not resolve."""
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    return sorted({str(info[4][0]) for info in infos})


def address_problem(address: str) -> str | None:
    """Why ``address`` must not be fetched from, or None for a public unicast address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    # most specific first: Python counts link-local and unspecified addresses as private too
    for problem, flag in (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("unspecified", ip.is_unspecified),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
    ):
        if flag:
            return problem
    if not ip.is_global:  # shared address space (100.64/10) and the like
        return "not global"
    return None


def check_url(url: str, allow_hosts: Iterable[str] = (), resolver: Resolver = resolve_host) -> Verdict:
    """May ``url`` be fetched? Hosts in ``allow_hosts`` (case-insensitive) skip the address check."""
    if not isinstance(url, str) or not url.strip():
        return Verdict(False, "empty url")
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname  # lower-cased, IPv6 brackets stripped
        _ = parts.port  # raises on a malformed port
    except ValueError as err:
        return Verdict(False, f"malformed url: {err}")
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        return Verdict(False, f"scheme {scheme or '(none)'!r} not allowed")
    if not host:
        return Verdict(False, "no host")
    if host in {h.lower().strip("[]") for h in allow_hosts}:
        return Verdict(True)
    try:
        addresses = resolver(host)
    except (OSError, UnicodeError) as err:
        return Verdict(False, f"host {host!r} does not resolve: {err}")
    if not addresses:
        return Verdict(False, f"host {host!r} does not resolve")
    for address in addresses:
        problem = address_problem(address)
        if problem is not None:
            return Verdict(False, f"host {host!r} resolves to {problem} address {address}")
    return Verdict(True)
