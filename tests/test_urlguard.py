"""The URL guard decides on resolved addresses. Only loopback names and literals are used here, and
nothing is ever connected to: `check_url` resolves names, it does not fetch."""

from __future__ import annotations

import pytest

from pipelines.urlguard import address_problem, check_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://localhost/a.png", "loopback"),
        ("http://LOCALHOST:8080/a.png", "loopback"),
        ("http://127.0.0.1:8765/a.png", "loopback"),
        ("http://127.1/a.png", "loopback"),  # short IPv4 form, resolved to 127.0.0.1
        ("http://0x7f000001/a.png", "loopback"),  # hex IPv4 form
        ("http://[::1]:8080/a.png", "loopback"),
        ("http://[::ffff:127.0.0.1]/a.png", "loopback"),  # IPv4-mapped IPv6
        ("http://10.0.0.1/a.png", "private"),
        ("https://192.168.1.20/a.png", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),  # cloud metadata service
        ("http://224.0.0.1/a.png", "multicast"),
        ("http://0.0.0.0/a.png", "unspecified"),
    ],
)
def test_non_public_hosts_are_blocked(url, expected):
    verdict = check_url(url)
    assert not verdict.allowed
    assert expected in verdict.detail


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("file:///etc/passwd", "scheme 'file'"),
        ("data:image/png;base64,iVBORw0KGgo=", "scheme 'data'"),
        ("ftp://127.0.0.1/a.png", "scheme 'ftp'"),
        ("//127.0.0.1/a.png", "scheme '(none)'"),
        ("", "empty url"),
        ("http:///a.png", "no host"),
        ("http://127.0.0.1:99999/a.png", "malformed url"),
        ("http://[::1/a.png", "malformed url"),
    ],
)
def test_bad_schemes_and_malformed_urls_are_blocked(url, expected):
    verdict = check_url(url, allow_hosts=["127.0.0.1"])  # allow_hosts never lifts the scheme check
    assert not verdict.allowed
    assert expected in verdict.detail


def test_allow_hosts_lifts_the_guard_for_named_hosts_only():
    assert check_url("http://127.0.0.1:8765/a.png", allow_hosts=["127.0.0.1"]).allowed
    assert check_url("http://LocalHost/a.png", allow_hosts=["localhost"]).allowed
    assert check_url("http://[::1]/a.png", allow_hosts=["[::1]"]).allowed
    # naming one loopback spelling does not allow another that resolves to the same address
    assert not check_url("http://localhost/a.png", allow_hosts=["127.0.0.1"]).allowed


def test_decision_uses_every_resolved_address():
    # A resolver stands in for DNS so that public answers can be tested without any traffic.
    public = {"cdn.example": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]}
    rebound = {"evil.example": ["93.184.216.34", "10.1.2.3"]}
    assert check_url("https://cdn.example/a.png", resolver=public.__getitem__).allowed
    verdict = check_url("https://evil.example/a.png", resolver=rebound.__getitem__)
    assert not verdict.allowed and "10.1.2.3" in verdict.detail


def test_unresolvable_host_is_blocked():
    def no_dns(host: str) -> list[str]:
        raise OSError("Name or service not known")

    verdict = check_url("http://nowhere.invalid/a.png", resolver=no_dns)
    assert not verdict.allowed and "does not resolve" in verdict.detail


def test_address_classes():
    assert address_problem("8.8.8.8") is None
    assert address_problem("100.64.0.1") == "not global"  # carrier-grade NAT space
    assert address_problem("fe80::1%eth0") == "link-local"
    assert address_problem("fc00::1") == "private"
    assert address_problem("::ffff:10.0.0.1") == "private"
