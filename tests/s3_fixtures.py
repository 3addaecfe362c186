"""A real S3-compatible server for tests: moto's standalone server on 127.0.0.1 (no network beyond it)."""

from __future__ import annotations

import socket

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """``http://127.0.0.1:PORT`` of a moto server that lives for the test module."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def use_s3(monkeypatch, endpoint: str, cache_dir) -> None:
    """Point this process's S3 settings (credentials, endpoint, model cache) at the test server."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # never ask a cloud metadata service for credentials
        "AWS_ENDPOINT_URL_S3": endpoint,
        "LDM_CACHE": str(cache_dir),
    }.items():
        monkeypatch.setenv(name, value)
