"""A loopback static-file HTTP server for offline download tests, the benchmark and the demo."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class _QuietHandler(SimpleHTTPRequestHandler):
    """Serves files under one directory without writing an access log line per request."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


class LoopbackServer(ThreadingHTTPServer):
    """Threaded server with a deep listen backlog so hundreds of concurrent download threads are not refused."""

    # The stdlib default of 5 makes img2dataset's many threads see spurious timeouts on connect.
    request_queue_size = 1024
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up early (timeouts, aborted reads) are normal here, not worth a traceback.
        log.debug("request from %s failed", client_address, exc_info=True)


@contextlib.contextmanager
def serve_directory(root: str | Path, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `root` over HTTP on a free loopback port; yields the base URL and always shuts down on exit."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"not a directory: {root}")
    if host not in ("127.0.0.1", "localhost"):
        raise ValueError(f"serve_directory binds loopback only, got host={host!r}")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = LoopbackServer((host, port), handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name="clipline-httpserver"
    )
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    log.debug("serving %s at %s", root, url)
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
