"""The HTTP side of `clipline serve`: clip back's routes (pipeline/query/clipback.py) on the standard library's
threaded HTTP server, every request bounded: its body, one deadline for all of its work (enforced on the socket by
web/addresses.py's reaper, as for a fetch), and the connections answered at once.

Why http.server and not Flask (clip back's): the API is three JSON endpoints, so routing and CORS are a few lines,
and the limits had to be written either way (werkzeug's server has no body cap, no request deadline and no
connection cap); it adds no dependency. One request per connection (HTTP/1.0), so a connection's deadline is its
request's.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import socket
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import urlsplit

from pipeline.core.config import ServeConfig
from pipeline.core.errors import ConfigError
from pipeline.query.clipback import ClipBack, KnnRequest
from pipeline.query.served import RequestError
from pipeline.web.addresses import REAPER

log = logging.getLogger(__name__)

ENDPOINTS = "GET /indices-list, POST /knn-service, POST /metadata"
WAIT_MARGIN_S = 0.25  # past the deadline, so that work which watches it (an image fetch) says why it stopped
GRACE_S = 1.0  # past the deadline, before the reaper closes a connection: time to write its 503
LINGER_BYTES = 64 * 1024 * 1024  # an unread body drained after an early answer, so the client reads the answer


class _Handler(BaseHTTPRequestHandler):
    """One connection, one request: routed to the API, answered as JSON, logged in one line."""

    protocol_version = "HTTP/1.0"
    server_version = "clipline-serve"
    server: ClipBackServer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.settings.timeout_s)  # each socket read and write
        self.started = time.monotonic()
        self.deadline = self.started + self.server.settings.timeout_s
        self.watch = REAPER.watch(self.connection, self.deadline + GRACE_S)  # a client that trickles its request
        self.code: int | None = None
        self.size, self.note, self.unread = 0, "", 0

    def finish(self) -> None:
        try:
            super().finish()
            if self.unread:
                self._linger()
        finally:
            REAPER.release(self.watch)  # before socketserver closes the socket
            if self.code is not None:
                self.server.count(self.code)
                ms = (time.monotonic() - self.started) * 1000
                note = f" {self.note}" if self.note else ""
                log.info(
                    '%s "%s" %d %d B %.0f ms%s',
                    self.client_address[0],
                    self.requestline,
                    self.code,
                    self.size,
                    ms,
                    note,
                )

    def _linger(self) -> None:
        """Half-close, then read what the client still sends: closing with unread data would reset the
        connection and the client could lose the answer (413, 411) before reading it."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(1.0)
            left = min(self.unread, LINGER_BYTES)
            while left > 0 and not self.watch.fired:
                chunk = self.connection.recv(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # one line per request, written in finish()

    def log_error(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s: " + format, self.client_address[0], *args)

    def send_response(self, code: int, message: str | None = None) -> None:
        self.code = code  # also for the stdlib's own answers (malformed request line, unsupported method)
        super().send_response(code, message)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self._route("POST")

    def do_OPTIONS(self) -> None:  # noqa: N802 - stdlib name; the CORS preflight of a browser's page
        headers = {
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": self.headers.get("Access-Control-Request-Headers") or "Content-Type",
            "Access-Control-Max-Age": "600",
        }
        self._reply(204, None, headers)

    def _route(self, method: str) -> None:
        path = urlsplit(self.path).path.rstrip("/") or "/"
        try:
            self._reply(200, self._answer(method, path))
        except RequestError as e:
            self._reply(e.status, {"message": str(e)})
        except Exception as e:  # a bug must cost one request its answer, never the server
            log.exception("%s %s failed", method, path)
            self._reply(500, {"message": f"internal error: {type(e).__name__}: {e}"})

    def _answer(self, method: str, path: str) -> Any:
        api, settings = self.server.api, self.server.settings
        routes = {"/indices-list": "GET", "/knn-service": "POST", "/metadata": "POST"}
        if path not in routes:
            raise RequestError(f"not found: {path} (clip back's API here: {ENDPOINTS})", 404)
        if method != routes[path]:
            raise RequestError(f"{path} takes {routes[path]}, not {method}", 405)
        if path == "/indices-list":
            return api.indices_list()
        body = self._json_body(settings.max_request_bytes)
        if path == "/metadata":
            self.note = f"{len(body.get('ids') or []) if isinstance(body, dict) else 0} ids"
            return self.server.run(api.metadata, body, deadline=self.deadline)
        req = KnnRequest.parse(body, settings.max_results)
        self.note = req.describe()
        return self.server.run(api.knn, req, self.deadline, deadline=self.deadline)

    def _json_body(self, cap: int) -> Any:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.unread = LINGER_BYTES
            raise RequestError("a chunked request body is not read here: send it with a Content-Length", 411)
        declared = (self.headers.get("Content-Length") or "").strip()
        if not declared.isdigit():
            self.unread = LINGER_BYTES  # a body may still come, delimited by the connection's end
            raise RequestError("a request body needs a Content-Length", 411)
        n = int(declared)
        if n > cap:
            self.unread = n
            raise RequestError(f"request body of {n} bytes is more than serve.max_request_bytes={cap}", 413)
        try:
            data = self.rfile.read(n)
        except TimeoutError:
            raise RequestError("request body not received in time (serve.timeout_s)", 408) from None
        if len(data) < n:
            if self.watch.fired:
                raise RequestError("request body not received in time (serve.timeout_s)", 408)
            raise RequestError(f"request body ended after {len(data)} of its {n} bytes")
        try:
            return json.loads(data)
        except ValueError as e:  # UnicodeDecodeError included
            raise RequestError(f"request body is not JSON: {e}") from None

    def _reply(self, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        body = b"" if obj is None else json.dumps(obj, allow_nan=False).encode()
        try:
            self.send_response(code)
            if obj is not None:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if self.server.settings.cors_origin:
                self.send_header("Access-Control-Allow-Origin", self.server.settings.cors_origin)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
            self.size = len(body)
        except OSError as e:  # the client left, or the reaper closed a connection past its deadline
            log.debug("%s: answer %d not delivered: %s", self.client_address[0], code, e)


class ClipBackServer(ThreadingHTTPServer):
    """The HTTP server of `clipline serve`: a thread per connection up to serve.max_connections (more are answered
    503 at once), the work of requests (fetch, embed, search) on serve.workers threads, in-flight requests finished
    before it closes."""

    daemon_threads = False
    block_on_close = True  # server_close() waits for the requests in flight (each bounded by its deadline)
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, api: ClipBack, settings: ServeConfig):
        self.api, self.settings = api, settings
        self.address_family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        self.pool = concurrent.futures.ThreadPoolExecutor(settings.workers, thread_name_prefix="clipline-serve")
        self.slots = threading.BoundedSemaphore(settings.max_connections)
        self.answers: collections.Counter[int] = collections.Counter()
        self._lock = threading.Lock()
        try:
            super().__init__((settings.host, settings.port), _Handler)
        except OSError as e:
            self.pool.shutdown()
            raise ConfigError(f"serve.host/serve.port: cannot listen on {settings.host}:{settings.port}: {e}") from None

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # HTTPServer's own adds a reverse DNS lookup (getfqdn) of the host
        host, port = self.socket.getsockname()[:2]
        self.server_name, self.server_port = self.settings.host, int(port)
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def count(self, code: int) -> None:
        with self._lock:
            self.answers[code] += 1

    def run(self, fn: Callable[..., Any], *args: Any, deadline: float) -> Any:
        """fn(*args) on a worker thread, waited for until the request's deadline (then 503: the work, which cannot
        be interrupted, finishes in the background and its result is dropped; queued work is cancelled)."""
        future = self.pool.submit(fn, *args)
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()) + WAIT_MARGIN_S)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise RequestError(
                f"not answered within serve.timeout_s={self.settings.timeout_s:g}s (waiting for a "
                "worker, fetching, embedding and searching)",
                503,
            ) from None

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self._refuse(request, client_address)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def _refuse(self, request: socket.socket, client_address: Any) -> None:
        n = self.settings.max_connections
        body = json.dumps({"message": f"busy: {n} connections are being answered (serve.max_connections)"}).encode()
        head = b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
        if self.settings.cors_origin:
            head += b"Access-Control-Allow-Origin: " + self.settings.cors_origin.encode() + b"\r\n"
        try:  # this runs in the accepting thread: never more than a fraction of a second on one client
            _drain(request, 0.05)  # what the client sent: left unread at close, it would reset the connection
            request.settimeout(1.0)
            request.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            request.shutdown(socket.SHUT_WR)
            _drain(request, 0.2)
        except OSError:
            pass
        log.warning(
            "%s: answered 503, %d connections already being answered (serve.max_connections)", client_address[0], n
        )
        self.count(503)
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s failed", client_address, exc_info=True)  # a client that hung up, mostly

    def server_close(self) -> None:
        super().server_close()
        self.pool.shutdown(wait=True, cancel_futures=True)


def _drain(sock: socket.socket, wait_s: float, limit: int = 1 << 20) -> None:
    """Read and drop what the peer sends until it pauses for wait_s, ends, or `limit` bytes came."""
    sock.settimeout(wait_s)
    got = 0
    try:
        while got < limit and (chunk := sock.recv(65536)):
            got += len(chunk)
    except TimeoutError:
        pass
