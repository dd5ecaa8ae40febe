"""Loopback HTTP servers that misbehave the way the web does (trickle, stall, huge or cut bodies, redirect loops,
redirects to file:// or internal addresses, pixel bombs) and record every connection, for the download and
webfetch tests and bench/bench_download_web.py."""

from __future__ import annotations

import collections
import contextlib
import socket
import struct
import threading
import time
import urllib.parse
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

from pipeline.run.httpserver import LoopbackServer

GiB = 1 << 30
_BLOCK = memoryview(b"\0" * (1 << 20))


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, followed by one tiny IDAT: a pixel bomb read from its
    header (decoding it would allocate width * height * 3 bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_claiming(jpeg: bytes, width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0) is rewritten to claim width x height pixels."""
    at = jpeg.index(b"\xff\xc0")
    return jpeg[: at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9 :]


class _Handler(BaseHTTPRequestHandler):
    """Routes: /f/NAME[?robots=DIRECTIVES] (a registered file), /trickle, /trickle-headers, /stall, /huge?n=&declare=0|1, /cut,
    /reset, /redirect?to=URL, /loop/N, /status/CODE."""

    protocol_version = "HTTP/1.1"
    server: WebServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        parts = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(parts.query))
        self.server.record(parts.path)
        head, _, rest = parts.path.lstrip("/").partition("/")
        route = getattr(self, "_" + head.replace("-", "_"), None)
        if route is None:
            return self._status("404")
        try:
            route(rest, query)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should

    def _send(self, code: int, body: bytes, ctype: str = "application/octet-stream", **headers: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        self.wfile.write(body)

    def _f(self, name: str, query: dict[str, str]) -> None:
        body = self.server.files.get(name)
        if body is None:
            return self._status("404")
        robots = {"X_Robots_Tag": query["robots"]} if "robots" in query else {}
        self._send(200, body, "image/jpeg", **robots)

    def _status(self, code: str, query: dict[str, str] | None = None) -> None:
        self._send(int(code), b"status " + code.encode(), "text/plain")

    def _trickle(self, rest: str, query: dict[str, str]) -> None:
        """Headers at once, then one byte per interval, forever: a per-read timeout never fires."""
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", "100000")  # under any size cap: only the deadline can end it
        self.end_headers()
        self._drip(b"\xff")

    def _trickle_headers(self, rest: str, query: dict[str, str]) -> None:
        """The status line, then the headers one byte per interval, forever."""
        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
        self._drip(b"X")

    def _drip(self, byte: bytes) -> None:
        while not self.server.stopping.is_set():
            self.wfile.write(byte)
            self.wfile.flush()
            time.sleep(self.server.drip_interval_s)

    def _stall(self, rest: str, query: dict[str, str]) -> None:
        self.server.stopping.wait()

    def _huge(self, rest: str, query: dict[str, str]) -> None:
        """n bytes (default 1 GiB) from a repeated 1 MiB block: with Content-Length, or ended by closing."""
        n = int(query.get("n", GiB))
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if query.get("declare", "1") == "1":
            self.send_header("Content-Length", str(n))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        sent = 0
        while sent < n and not self.server.stopping.is_set():
            part = _BLOCK[: min(len(_BLOCK), n - sent)]  # a view: the server itself holds one block in all
            self.wfile.write(part)
            sent += len(part)
            self.server.add_sent(len(part))

    def _cut(self, rest: str, query: dict[str, str]) -> None:
        """Promises 10,000 bytes, sends 100 and closes."""
        self.send_response(200)
        self.send_header("Content-Length", "10000")
        self.end_headers()
        self.wfile.write(b"\xff" * 100)
        self.close_connection = True

    def _reset(self, rest: str, query: dict[str, str]) -> None:
        """Abort the connection (RST) before answering."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True

    def _redirect(self, rest: str, query: dict[str, str]) -> None:
        self._send(int(query.get("code", "302")), b"", "text/plain", Location=query["to"])

    def _loop(self, rest: str, query: dict[str, str]) -> None:
        self._send(302, b"", "text/plain", Location=f"/loop/{int(rest or 0) + 1}")


class WebServer(LoopbackServer):
    """A threaded loopback server of misbehaving routes that counts connections and requests per path."""

    def __init__(self, host: str = "127.0.0.1", drip_interval_s: float = 0.2):
        super().__init__((host, 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.drip_interval_s = drip_interval_s
        self.stopping = threading.Event()
        self.connections = 0
        self.requests: collections.Counter[str] = collections.Counter()
        self.bytes_sent = 0
        self._lock = threading.Lock()

    @property
    def base(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self._lock:
            self.connections += 1
        return True

    def record(self, path: str) -> None:
        with self._lock:
            self.requests[path] += 1

    def add_sent(self, n: int) -> None:
        with self._lock:
            self.bytes_sent += n


@contextlib.contextmanager
def web_server(host: str = "127.0.0.1", drip_interval_s: float = 0.2) -> Iterator[WebServer]:
    """A running WebServer; stops its endless routes and shuts down on exit."""
    server = WebServer(host, drip_interval_s)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextlib.contextmanager
def watched_fifo(path: Any) -> Iterator[list[bool]]:
    """A named pipe at `path` and a thread that notices if anything opens it for reading: yields a list that
    holds True once that happened (a file URL pointing there proves whether it was ever opened)."""
    import os

    os.mkfifo(path)
    opened: list[bool] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:  # succeeds only while a reader has the pipe open
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.01)
                continue
            opened.append(True)
            os.close(fd)  # the reader sees end of file and returns
            return

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        yield opened
    finally:
        stop.set()
        t.join(timeout=5)
