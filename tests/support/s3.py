"""An S3 API on 127.0.0.1 for tests: moto's ThreadedMotoServer (the server s3fs tests itself with), one per session,
with fsspec configured so every `s3://` URL of the process (clipline's own fsspec calls included) goes to it.

Use: `moto_endpoint, s3_server, s3_bucket = s3.moto_endpoint, s3.s3_server, s3.s3_bucket` in a test module (after `from tests.support
import s3`), then take `s3_bucket` (a fresh, empty bucket name per test) and write and read `s3://{s3_bucket}/...`.
`moto_endpoint` alone is the server with nothing configured.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import fsspec
import pytest

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """The endpoint URL of a moto S3 server on loopback, configured nowhere: a test that uses it alone reaches it only
    through what it passes (clipline's `storage.s3.endpoint_url`, tests/run/test_s3_chain.py)."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(moto_endpoint: str) -> Iterator[str]:
    """The moto endpoint set as s3fs's default through fsspec's config (and test credentials in the environment), so
    every `s3://` URL of this process goes to it."""
    saved_env = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    saved_conf = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {"client_kwargs": {"endpoint_url": moto_endpoint}, "anon": False}
    try:
        yield moto_endpoint
    finally:
        if saved_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved_conf
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A new empty bucket on the test server; its name (use as `s3://NAME/...`)."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(name)
    fs.invalidate_cache()
    return name
