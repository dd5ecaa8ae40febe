"""A fault-injecting HTTP proxy on 127.0.0.1 in front of an S3 API (moto's server): it counts every request by the kind
an object store bills (LIST, HEAD, GET, PUT, COPY, DELETE) and answers chosen requests with S3's 503 SlowDown.

Point s3fs at `proxy.url` (as `endpoint_url`) and the requests of every process of a job pass through it, so the
counts are the job's, driver and workers together. No pytest here: bench/bench_planning.py uses it too.
"""

from __future__ import annotations

import http.client
import threading
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

KINDS = ("LIST", "HEAD", "GET", "PUT", "COPY", "DELETE")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>proxy</RequestId><HostId>proxy</HostId></Error>"
)


def request_kind(method: str, target: str, headers: Any) -> str:
    """What S3 would bill a path-style request as."""
    parsed = urllib.parse.urlsplit(target)
    query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
    has_key = "/" in parsed.path.strip("/")
    if method == "HEAD":
        return "HEAD"
    if method == "GET":
        return "GET" if has_key or "location" in query else "LIST"
    if method == "PUT":
        return "COPY" if headers.get("x-amz-copy-source") else "PUT"
    if method == "DELETE" or (method == "POST" and "delete" in query):
        return "DELETE"
    return "PUT"  # POST: multipart upload start, completion


@dataclass
class Fault:
    """Which requests get a 503 SlowDown: those of `kinds` whose path contains `path` (any path when empty), the
    first `first` of them, or all of them with `always`."""

    kinds: tuple[str, ...]
    first: int = 0
    always: bool = False
    path: str = ""
    seen: int = field(default=0, init=False)

    def hits(self, kind: str, target: str) -> bool:
        if kind not in self.kinds or self.path not in urllib.parse.unquote(target):
            return False
        self.seen += 1
        return self.always or self.seen <= self.first


class S3Proxy:
    """The proxy server: `requests` and `injected` count by kind (thread-safe); `faults` is the list of Fault rules."""

    def __init__(self, upstream: str):
        up = urllib.parse.urlsplit(upstream)
        self.upstream = (up.hostname or "127.0.0.1", up.port or 80)
        self.requests: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, bool]] = []  # (kind, request target, answered 503) of every request
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> S3Proxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reset(self, *faults: Fault) -> None:
        """Zero the counts and set new fault rules (none: a clean proxy)."""
        with self.lock:
            self.requests.clear()
            self.injected.clear()
            self.log.clear()
            self.faults = list(faults)

    def counts(self) -> Counter[str]:
        with self.lock:
            return Counter({k: self.requests[k] for k in KINDS})

    def decide(self, kind: str, target: str) -> bool:
        """Count the request; True when a fault rule says to answer it with 503."""
        with self.lock:
            self.requests[kind] += 1
            fail = any(f.hits(kind, target) for f in self.faults)
            if fail:
                self.injected[kind] += 1
            self.log.append((kind, target, fail))
            return fail


def _read_body(h: BaseHTTPRequestHandler) -> bytes:
    if h.headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            parts.append(h.rfile.read(size))
            h.rfile.readline()
    n = int(h.headers.get("content-length") or 0)
    return h.rfile.read(n) if n else b""


def _handler(proxy: S3Proxy) -> type[BaseHTTPRequestHandler]:
    local = threading.local()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as s3fs's aiohttp expects

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _any(self) -> None:
            body = _read_body(self)
            kind = request_kind(self.command, self.path, self.headers)
            if proxy.decide(kind, self.path):
                self._answer(503, [("Content-Type", "application/xml")], b"" if kind == "HEAD" else SLOW_DOWN)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn = getattr(local, "conn", None)
            for retry in (False, True):  # a kept-alive upstream connection may have been closed meanwhile
                if conn is None:
                    conn = local.conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    break
                except (http.client.HTTPException, OSError):
                    conn.close()
                    conn = local.conn = None
                    if retry:
                        raise
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
            if self.command != "HEAD":  # a HEAD answer keeps the object's Content-Length
                out = [(k, v) for k, v in out if k.lower() != "content-length"]
            self._answer(resp.status, out, data, length=self.command != "HEAD")

        def _answer(self, status: int, headers: list[tuple[str, str]], data: bytes, length: bool = True) -> None:
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            if length:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

    return Handler
