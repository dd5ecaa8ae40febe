"""The one way clipline fetches a URL from the web (download, query, serve): http/https only, the address actually
connected to checked after DNS and after every redirect, one deadline for the whole fetch, the body capped while it
streams, redirects bounded.

Why not urllib: `urlopen(timeout=)` bounds each socket operation, not the fetch, so a server that trickles one byte
per second holds it forever; it reads the whole body into memory; it opens `file:`, `ftp:` and `data:` URLs; and it
resolves and connects on its own, so no address check can see where it really connects (a name that resolves to
127.0.0.1 or 169.254.169.254, or a redirect there, passes any check of the URL's text).
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import string
import time
import urllib.parse
from dataclasses import dataclass

from pipeline.web.addresses import REAPER, IPNetwork, Watch, address_refusal, resolve
from pipeline.web.bodies import SLACK, Body

log = logging.getLogger(__name__)

SCHEMES = ("http", "https")
REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = SLACK  # 64 KiB: under malloc's mmap threshold (read buffers reused, never mapped); Body needs <= SLACK


@dataclass(frozen=True)
class FetchPolicy:
    """What a fetch may do: which addresses it may connect to, how long it may take, how much it may read."""

    timeout_s: float = 10.0  # the whole fetch: DNS, connect, TLS, headers, body, every redirect
    max_bytes: int = 16 * 1024 * 1024
    max_redirects: int = 10
    allow_private_addresses: bool = False  # loopback, RFC 1918, unique-local, CGNAT ...
    allow_networks: tuple[IPNetwork, ...] = ()  # allowed even though private (never link-local or metadata)
    user_agent: str = "clipline"
    extra_headers: tuple[tuple[str, str], ...] = ()


class FetchError(Exception):
    """A URL that could not be fetched under the policy; the message names the reason (download/layout.py counts
    them). `retryable`: whether trying again could give another outcome."""

    retryable = False


class BadURL(FetchError):
    """The URL cannot be parsed or has no host."""


class SchemeRefused(FetchError):
    """The URL's scheme is not http or https: refused without opening anything."""


class AddressRefused(FetchError):
    """Every address the host resolves to is refused by the policy: nothing was connected to."""


class TooManyRedirects(FetchError):
    """More redirects than the policy allows (or a loop)."""


class TooLarge(FetchError):
    """The body is bigger than the policy's max_bytes; reading stopped there."""


class FetchTimeout(FetchError):
    """The whole fetch did not finish before its deadline."""

    retryable = True


class ConnectionFailed(FetchError):
    """DNS, connect, TLS or the transfer failed (refused, reset, closed early)."""

    retryable = True


class HTTPStatusError(FetchError):
    """The server answered with a status other than 2xx (after redirects)."""

    def __init__(self, code: int, reason: str):
        super().__init__(f"HTTP Error {code}: {reason}")  # urllib's wording, which download/layout.py parses
        self.code = code
        self.retryable = code >= 500 or code in (408, 429)


@dataclass
class Response:
    """A fetched body, whole and under the policy's cap."""

    url: str  # after redirects
    status: int
    headers: http.client.HTTPMessage
    body: bytes


_TLS: ssl.SSLContext | None = None


def _tls_context() -> ssl.SSLContext:
    global _TLS
    if _TLS is None:  # loading the CA store costs milliseconds: once per process
        _TLS = ssl.create_default_context()
    return _TLS


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchTimeout("timed out")
    return left


def _target(parts: urllib.parse.SplitResult) -> str:
    """The request target, with characters HTTP cannot carry percent-encoded (urllib raises on them instead)."""
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return urllib.parse.quote(target, safe=string.punctuation)


class _Attempt:
    """One request (one hop of a redirect chain) to an address the policy allows."""

    def __init__(self, url: str, policy: FetchPolicy, deadline: float):
        self.url, self.policy, self.deadline = url, policy, deadline
        try:
            parts = urllib.parse.urlsplit(url)
            scheme = parts.scheme.lower()
            if scheme not in SCHEMES:
                raise SchemeRefused(f"scheme refused: {scheme or '(none)'} (only {', '.join(SCHEMES)} are fetched)")
            host = (parts.hostname or "").encode("idna").decode("ascii")
            port = parts.port or (443 if scheme == "https" else 80)
        except (UnicodeError, ValueError, TypeError) as e:
            raise BadURL(f"bad url: {e}") from None
        if not host:
            raise BadURL("bad url: no host given")
        self.https, self.host, self.port, self.target = scheme == "https", host, port, _target(parts)
        self.sock: socket.socket | None = None
        self.watch: Watch | None = None
        self.conn: http.client.HTTPConnection | None = None
        self.resp: http.client.HTTPResponse | None = None

    def connect(self) -> None:
        try:
            addresses = resolve(self.host, self.port, _remaining(self.deadline))
        except TimeoutError:
            raise FetchTimeout("timed out") from None
        except OSError as e:
            raise ConnectionFailed(f"<urlopen error {e}>") from None  # urllib's wording: [Errno -2] Name or ...
        pol = self.policy
        refusals = [(ip, address_refusal(ip, pol.allow_private_addresses, pol.allow_networks)) for ip in addresses]
        allowed = [ip for ip, why in refusals if why is None]
        if not allowed:
            why = refusals[0][1] if refusals else "no address"
            name = "" if refusals and self.host == str(refusals[0][0]) else f"{self.host} resolves to "
            raise AddressRefused(f"address refused: {name}{why}")
        last: OSError | None = None
        for ip in allowed:  # only addresses that passed: the name is never resolved again
            self.sock = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
            self.watch = REAPER.watch(self.sock, self.deadline)
            try:
                self.sock.settimeout(_remaining(self.deadline))
                self.sock.connect((str(ip), self.port))
                break
            except OSError as e:
                self.close()
                last = e
        else:
            assert last is not None
            raise last
        sock = self.sock
        if self.https:
            sock = self.sock = self._tls(sock)
            self.conn = http.client.HTTPSConnection(self.host, self.port, context=_tls_context())
        else:
            self.conn = http.client.HTTPConnection(self.host, self.port)
        self.conn.sock = sock  # already connected (to the checked address): http.client never resolves the name

    def _tls(self, sock: socket.socket) -> ssl.SSLSocket:
        """TLS with the name (SNI, certificate), the handshake under the reaper's watch like every other read."""
        assert self.watch is not None
        tls = _tls_context().wrap_socket(sock, server_hostname=self.host, do_handshake_on_connect=False)
        REAPER.rewatch(self.watch, tls)  # wrap_socket detached the plain socket: watch the one that owns the fd
        tls.settimeout(_remaining(self.deadline))
        tls.do_handshake()
        return tls

    def request(self) -> http.client.HTTPResponse:
        assert self.conn is not None and self.sock is not None
        self.sock.settimeout(_remaining(self.deadline))
        headers = {"User-Agent": self.policy.user_agent, "Accept-Encoding": "identity", "Connection": "close"}
        headers.update(dict(self.policy.extra_headers))
        self.conn.request("GET", self.target, headers=headers)
        self.resp = self.conn.getresponse()  # with Connection: close, http.client hands the socket to the response
        return self.resp

    def read_body(self, resp: http.client.HTTPResponse) -> bytes:
        cap = self.policy.max_bytes
        declared = resp.getheader("Content-Length")
        length = int(declared) if declared is not None and declared.strip().isdigit() else None
        if length is not None and length > cap:
            raise TooLarge(f"response too large: Content-Length {length} > max {cap} bytes (not read)")
        with Body(length, cap, self.deadline) as body:
            while True:
                assert self.sock is not None
                self.sock.settimeout(_remaining(self.deadline))
                chunk = resp.read1(CHUNK)  # returns what arrived, so the deadline is checked between reads
                if not chunk:
                    break
                body.add(chunk)
                if body.size > cap:
                    raise TooLarge(f"response too large: more than {cap} bytes (stopped reading there)")
            if self.timed_out:  # the reaper cut the transfer: a body delimited by the connection's end looks whole
                raise FetchTimeout("timed out")
            if length is not None and body.size != length:
                raise ConnectionFailed(f"IncompleteRead({body.size} bytes read, {length - body.size} more expected)")
            return body.take()

    @property
    def timed_out(self) -> bool:
        return (self.watch is not None and self.watch.fired) or time.monotonic() >= self.deadline

    def close(self) -> None:
        if self.watch is not None:
            REAPER.release(self.watch)  # first: the reaper never touches a closed (maybe reused) descriptor
        for part in (self.resp, self.conn, self.sock):  # the response may hold the socket's last reference
            if part is not None:
                part.close()
        self.sock = self.conn = self.resp = None


def fetch(url: str, policy: FetchPolicy, deadline: float | None = None) -> Response:
    """GET `url` under `policy`; raises a FetchError subclass naming the reason. `deadline` (time.monotonic())
    can shorten the policy's timeout, never extend it."""
    own = time.monotonic() + policy.timeout_s
    deadline = own if deadline is None else min(deadline, own)
    for _ in range(policy.max_redirects + 1):
        hop = _Attempt(url, policy, deadline)
        try:
            hop.connect()
            resp = hop.request()
            location = resp.getheader("Location")
            if resp.status in REDIRECTS and location:
                url = urllib.parse.urljoin(url, location.strip())
                continue
            if not 200 <= resp.status < 300:
                raise HTTPStatusError(resp.status, resp.reason)
            return Response(url, resp.status, resp.headers, hop.read_body(resp))
        except FetchError as e:
            if isinstance(e, FetchTimeout) or hop.timed_out:
                raise _timeout(policy, deadline, own) from None
            raise
        except (OSError, http.client.HTTPException, ValueError) as e:
            if isinstance(e, TimeoutError) or hop.timed_out:
                raise _timeout(policy, deadline, own) from None
            raise ConnectionFailed(_describe(e)) from None
        finally:
            hop.close()
    raise TooManyRedirects(f"too many redirects: more than {policy.max_redirects} (last to {url[:200]})")


def _timeout(policy: FetchPolicy, deadline: float, own: float) -> FetchTimeout:
    if deadline < own:
        return FetchTimeout("timed out: the caller's deadline passed")
    return FetchTimeout(f"timed out: no complete response within {policy.timeout_s:g}s (connect, headers and body)")


def _describe(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError):
        return f"SSL error: {e}"
    if isinstance(e, http.client.HTTPException):
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return f"<urlopen error {e}>"  # urllib's wording for socket errors ([Errno 111] Connection refused, ...)
