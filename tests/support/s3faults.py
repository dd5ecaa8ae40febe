"""Fixtures for S3 tests through the fault-injecting proxy (tests/support/s3proxy.py) in front of the session's moto
server (tests/support/s3.py): `s3_proxy` is the session's proxy, `via_proxy` points every s3fs of the test, in this
process and in spawned workers (through $FSSPEC_S3), at it with clean counts.

Use: `moto_endpoint, s3_server, s3_bucket` from tests.support.s3 and `s3_proxy, via_proxy = s3faults.s3_proxy,
s3faults.via_proxy` in a test module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import fsspec
import pytest

from tests.support.s3proxy import S3Proxy

# botocore's standard retry mode, 4 attempts in all (its `max_attempts` counts retries only): a test's injected 503s are
# retried within one call
RETRIES = {"mode": "standard", "total_max_attempts": 4}


@pytest.fixture(scope="session")
def s3_proxy(s3_server: str) -> Iterator[S3Proxy]:
    proxy = S3Proxy(s3_server).start()
    yield proxy
    proxy.stop()


def proxy_options(proxy: S3Proxy, retries: dict[str, Any] = RETRIES) -> dict[str, Any]:
    """s3fs options that send every request through the proxy, with botocore's retry policy `retries`."""
    return {"client_kwargs": {"endpoint_url": proxy.url}, "config_kwargs": {"retries": retries}, "anon": False}


def use_proxy(mp: pytest.MonkeyPatch, proxy: S3Proxy, **kwargs: Any) -> None:
    """Point s3fs at the proxy in this process and in processes started from now on; fresh filesystem instances."""
    options = proxy_options(proxy, **kwargs)
    mp.setitem(fsspec.config.conf, "s3", options)
    mp.setenv("FSSPEC_S3", json.dumps(options))  # spawned workers read it when they import fsspec
    fsspec.get_filesystem_class("s3").clear_instance_cache()


@pytest.fixture
def via_proxy(s3_proxy: S3Proxy, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Proxy]:
    """The proxy, clean, with every s3fs of the test pointed at it (the test's bucket exists already)."""
    use_proxy(monkeypatch, s3_proxy)
    s3_proxy.reset()
    yield s3_proxy
    s3_proxy.reset()
    fsspec.get_filesystem_class("s3").clear_instance_cache()
