"""The safe fetch against loopback servers that misbehave: schemes never opened, addresses refused after DNS and
after every redirect (never connected to), one deadline for the whole fetch, the body capped while it streams,
redirects bounded; and the address classes themselves."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.download.layout import classify_error
from pipeline.web import addresses as netguard
from pipeline.web import fetch as webfetch
from pipeline.web.addresses import address_refusal, parse_networks
from pipeline.web.fetch import (
    AddressRefused,
    BadURL,
    ConnectionFailed,
    FetchPolicy,
    FetchTimeout,
    HTTPStatusError,
    SchemeRefused,
    TooLarge,
    TooManyRedirects,
    fetch,
)
from tests.support.webservers import WebServer, watched_fifo, web_server

LOOPBACK = parse_networks(["127.0.0.1"])  # the test server's one address; 127.0.0.2 and the rest stay private
TIGHT = FetchPolicy(timeout_s=1.0, max_bytes=1 << 20, allow_networks=LOOPBACK)
HANG_GUARD_S = 15.0  # far above every deadline here: only a fetch that ignores its deadline gets near it


@pytest.fixture(scope="module")
def server() -> Iterator[WebServer]:
    with web_server(drip_interval_s=0.1) as s:
        s.files["a.jpg"] = b"\xff\xd8 small body"
        yield s


@pytest.fixture(scope="module")
def private_server() -> Iterator[WebServer]:
    """A server on 127.0.0.2: loopback too, but not in TIGHT's allowed networks. It counts connections."""
    with web_server(host="127.0.0.2") as s:
        s.files["secret.jpg"] = b"internal"
        yield s


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every socket.connect made in this process while the test runs."""
    seen: list[Any] = []
    real = socket.socket.connect

    def record(self: socket.socket, address: Any) -> None:
        seen.append(address)
        real(self, address)

    monkeypatch.setattr(socket.socket, "connect", record)
    return seen


def _timed(fn: Any) -> tuple[float, BaseException | None]:
    t0 = time.monotonic()
    try:
        fn()
    except webfetch.FetchError as e:
        return time.monotonic() - t0, e
    return time.monotonic() - t0, None


def test_small_body_and_final_url(server: WebServer) -> None:
    r = fetch(f"{server.base}/f/a.jpg", TIGHT)
    assert r.body == b"\xff\xd8 small body" and r.status == 200 and r.url == f"{server.base}/f/a.jpg"
    r = fetch(f"{server.base}/redirect?to=/f/a.jpg", TIGHT)  # relative Location
    assert r.body == b"\xff\xd8 small body" and r.url == f"{server.base}/f/a.jpg"


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://127.0.0.1/x.jpg", "data:image/png;base64,iVBORw0KGgo=", "gopher://h/1"]
)
def test_other_schemes_are_refused_without_a_connection(url: str, connects: list[Any]) -> None:
    with pytest.raises(SchemeRefused, match="scheme refused"):
        fetch(url, FetchPolicy(allow_private_addresses=True))
    assert connects == []


def test_file_url_is_never_opened_even_through_a_redirect(server: WebServer, tmp_path: Path) -> None:
    """A named pipe notices any open: neither the URL itself nor a redirect to it opens the file."""
    fifo = tmp_path / "secret.jpg"
    with watched_fifo(fifo) as opened:
        with pytest.raises(SchemeRefused):
            fetch(fifo.as_uri(), TIGHT)
        with pytest.raises(SchemeRefused):
            fetch(f"{server.base}/redirect?to={fifo.as_uri()}", TIGHT)
        time.sleep(0.1)  # the watcher polls every 10 ms
    assert opened == []


def test_the_fifo_watcher_does_notice_an_open(tmp_path: Path) -> None:
    """The control for the test above: reading the pipe is seen."""
    fifo = tmp_path / "p"
    with watched_fifo(fifo) as opened:
        assert fifo.read_bytes() == b""  # blocks until the watcher opens the write end, then reads end of file
    assert opened == [True]


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",  # AWS/GCP/Azure instance metadata
        "http://169.254.1.1/",
        "http://[fe80::1]/",
        "http://[fd00:ec2::254]/",  # AWS IPv6 metadata: in fc00::/7, which allow_private would open
        "http://100.100.100.200/",  # Alibaba metadata, in CGNAT space
        "http://[::ffff:169.254.169.254]/",
        "http://0.0.0.0/",
    ],
)
def test_link_local_and_metadata_are_refused_even_when_private_is_allowed(url: str, connects: list[Any]) -> None:
    with pytest.raises(AddressRefused, match="always refused"):
        fetch(url, FetchPolicy(allow_private_addresses=True, allow_networks=parse_networks(["0.0.0.0/0", "::/0"])))
    assert connects == []


def test_private_addresses_are_refused_by_default_and_never_connected(
    private_server: WebServer, connects: list[Any]
) -> None:
    before = private_server.connections
    for url in (f"{private_server.base}/f/secret.jpg", f"http://[::ffff:127.0.0.2]:{private_server.server_port}/"):
        with pytest.raises(AddressRefused, match="private addresses are not allowed"):
            fetch(url, FetchPolicy())
    assert connects == [] and private_server.connections == before
    assert fetch(f"{private_server.base}/f/secret.jpg", FetchPolicy(allow_private_addresses=True)).body == b"internal"


def test_the_check_is_on_the_resolved_address_not_the_text(
    monkeypatch: pytest.MonkeyPatch, private_server: WebServer, connects: list[Any]
) -> None:
    """A public-looking name (or a decimal IP) that resolves to an internal address is refused after DNS."""
    real = socket.getaddrinfo
    answers = {"images.example.com": "127.0.0.2", "meta.example.com": "169.254.169.254"}

    def fake(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host in answers:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    port = private_server.server_port
    with pytest.raises(AddressRefused, match="images.example.com resolves to 127.0.0.2"):
        fetch(f"http://images.example.com:{port}/f/secret.jpg", TIGHT)
    with pytest.raises(AddressRefused, match="metadata"):
        fetch("http://meta.example.com/latest", FetchPolicy(allow_private_addresses=True))
    with pytest.raises(AddressRefused, match="127.0.0.1 is loopback"):
        fetch(f"http://2130706433:{port}/", FetchPolicy())  # 127.0.0.1 spelled as one number
    assert connects == []


def test_redirect_to_a_private_address_is_refused_and_never_connected(
    server: WebServer, private_server: WebServer
) -> None:
    before = private_server.connections
    with pytest.raises(AddressRefused, match="127.0.0.2 is loopback"):
        fetch(f"{server.base}/redirect?to={private_server.base}/f/secret.jpg&code=307", TIGHT)
    assert private_server.connections == before


def test_redirect_loop_is_bounded(server: WebServer) -> None:
    with pytest.raises(TooManyRedirects, match="more than 3"):
        fetch(f"{server.base}/loop/100", FetchPolicy(max_redirects=3, allow_networks=LOOPBACK))
    assert [server.requests[f"/loop/{100 + i}"] for i in range(5)] == [1, 1, 1, 1, 0]  # the first + 3 redirects
    with pytest.raises(TooManyRedirects):
        fetch(f"{server.base}/redirect?to=/f/a.jpg", FetchPolicy(max_redirects=0, allow_networks=LOOPBACK))


@pytest.mark.parametrize("route", ["trickle", "trickle-headers", "stall"])
def test_one_deadline_covers_headers_and_body(server: WebServer, route: str) -> None:
    """A server sending a byte every 100 ms never trips a per-read timeout; the whole fetch still ends at 1 s."""
    elapsed, err = _timed(lambda: fetch(f"{server.base}/{route}", TIGHT))
    assert isinstance(err, FetchTimeout) and err.retryable and classify_error(str(err)) == "timeout"
    assert TIGHT.timeout_s <= elapsed < HANG_GUARD_S


def test_a_shorter_caller_deadline_wins(server: WebServer) -> None:
    elapsed, err = _timed(
        lambda: fetch(
            f"{server.base}/trickle",
            FetchPolicy(timeout_s=60, allow_networks=LOOPBACK),
            deadline=time.monotonic() + 0.3,
        )
    )
    assert isinstance(err, FetchTimeout) and "caller's deadline" in str(err) and elapsed < HANG_GUARD_S


def test_declared_huge_body_is_refused_before_reading(server: WebServer) -> None:
    sent = server.bytes_sent
    with pytest.raises(TooLarge, match="Content-Length 1073741824"):
        fetch(f"{server.base}/huge", TIGHT)
    time.sleep(0.2)
    assert server.bytes_sent - sent < 64 << 20  # what the socket buffers took before the close, not 1 GB


def _kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def test_undeclared_huge_body_stops_at_the_cap_with_bounded_memory(server: WebServer) -> None:
    """1 GiB with no Content-Length: reading stops past the cap, the process's peak RSS (kernel high-water mark,
    reset first) grows by about the cap, and the memory is given back when the fetch ends."""
    cap = 8 << 20
    policy = FetchPolicy(timeout_s=10, max_bytes=cap, allow_networks=LOOPBACK)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    before = _kib("VmRSS")
    with pytest.raises(TooLarge, match=f"more than {cap} bytes"):
        fetch(f"{server.base}/huge?declare=0", policy)
    grew = (_kib("VmHWM") - before) * 1024
    assert cap // 2 < grew < 3 * cap, grew  # the capped body, not the gigabyte
    assert (_kib("VmRSS") - before) * 1024 < cap // 2  # unmapped at once, not kept by malloc


def test_many_huge_bodies_at_once_hold_two_caps(server: WebServer) -> None:
    """Ten threads meet a 1 GiB body at the same time: all ten are refused at the cap, and the process's peak grows
    by two caps (the per-process budget for big bodies) plus each thread's first 128 KiB, not by ten caps."""
    cap = 8 << 20
    policy = FetchPolicy(timeout_s=20, max_bytes=cap, allow_networks=LOOPBACK)
    errors: list[BaseException] = []

    def one() -> None:
        try:
            fetch(f"{server.base}/huge?declare=0", policy)
        except webfetch.FetchError as e:
            errors.append(e)

    Path("/proc/self/clear_refs").write_text("5")
    before = _kib("VmRSS")
    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_GUARD_S)
    grew = (_kib("VmHWM") - before) * 1024
    assert len(errors) == 10 and all(isinstance(e, TooLarge) for e in errors), errors
    assert grew < 3 * cap, grew  # measured: 17-19 MiB with the budget, 45-53 MiB without


def test_cut_and_reset_bodies_are_connection_failures(server: WebServer) -> None:
    with pytest.raises(ConnectionFailed, match="IncompleteRead") as e:
        fetch(f"{server.base}/cut", TIGHT)
    assert e.value.retryable and classify_error(str(e.value)) == "connection closed"
    with pytest.raises(ConnectionFailed) as e:
        fetch(f"{server.base}/reset", TIGHT)
    assert classify_error(str(e.value)) == "connection closed"


def test_http_errors_keep_urllibs_wording(server: WebServer) -> None:
    with pytest.raises(HTTPStatusError) as e:
        fetch(f"{server.base}/status/404", TIGHT)
    assert str(e.value) == "HTTP Error 404: Not Found" and not e.value.retryable
    with pytest.raises(HTTPStatusError) as e:
        fetch(f"{server.base}/status/503", TIGHT)
    assert e.value.retryable and classify_error(str(e.value)) == "http 503"


def test_connection_refused_dns_and_bad_urls() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionFailed) as e:
        fetch(f"http://127.0.0.1:{port}/x.jpg", TIGHT)
    assert classify_error(str(e.value)) == "connection refused"
    with pytest.raises(ConnectionFailed) as e:
        fetch("http://name.invalid/x.jpg", FetchPolicy(timeout_s=5))
    assert classify_error(str(e.value)) == "dns"
    for url in ("http:///x.jpg", "http://[::1/x", "http://h:99999/"):
        with pytest.raises(BadURL) as b:
            fetch(url, TIGHT)
        assert classify_error(str(b.value)) == "bad url"


def test_every_refusal_has_its_own_reason() -> None:
    reasons = {
        classify_error(str(e))
        for e in (
            SchemeRefused("scheme refused: file (only http, https are fetched)"),
            AddressRefused("address refused: 127.0.0.1 is loopback (private addresses are not allowed)"),
            TooManyRedirects("too many redirects: more than 10 (last to http://h/x)"),
            TooLarge("response too large: more than 16 bytes (stopped reading there)"),
        )
    }
    assert reasons == {"scheme refused", "address refused", "too many redirects", "too large"}


@pytest.mark.parametrize(
    "address, private_ok, why",
    [
        ("8.8.8.8", None, None),
        ("2606:4700::1111", None, None),
        ("127.0.0.1", None, "loopback"),
        ("::1", None, "loopback"),
        ("10.1.2.3", None, "private"),
        ("172.16.0.1", None, "private"),
        ("192.168.1.1", None, "private"),
        ("100.64.0.1", None, "private"),  # CGNAT
        ("fd12:3456::1", None, "private"),
        ("240.0.0.1", None, "reserved"),
        ("::ffff:10.0.0.1", None, "private"),  # IPv4-mapped
        ("64:ff9b::a00:1", None, "private"),  # NAT64 of 10.0.0.1
        ("2002:a00:1::1", None, "private"),  # 6to4 of 10.0.0.1
        ("169.254.169.254", "metadata", "metadata"),
        ("169.254.10.10", "link-local", "link-local"),
        ("fe80::1", "link-local", "link-local"),
        ("fd00:ec2::254", "metadata", "metadata"),
        ("100.100.100.200", "metadata", "metadata"),
        ("0.0.0.0", "unicast", "unicast"),
        ("0.1.2.3", "unicast", "unicast"),
        ("::", "unicast", "unicast"),
        ("224.0.0.1", "unicast", "unicast"),
    ],
)
def test_address_classes(address: str, private_ok: str | None, why: str | None) -> None:
    ip = ipaddress.ip_address(address)
    refused = address_refusal(ip)
    assert (refused is None) == (why is None) and (why is None or why in refused), refused
    allowed = address_refusal(ip, allow_private=True)
    assert (allowed is None) == (private_ok is None) and (private_ok is None or private_ok in allowed), allowed
    if why in ("loopback", "private", "reserved"):
        assert address_refusal(ip, allow_networks=parse_networks([address])) is None


def test_parse_networks() -> None:
    assert parse_networks(["10.0.0.0/8", "192.168.1.7", "fd00::/8"])[1] == ipaddress.ip_network("192.168.1.7/32")
    with pytest.raises(ValueError):
        parse_networks(["not-a-network"])


def test_resolve_is_bounded_by_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def slow(*args: Any, **kwargs: Any) -> Any:
        release.wait(30)
        return []

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    try:
        with pytest.raises(TimeoutError):
            netguard.resolve("slow.example.com", 80, 0.2)
        with pytest.raises(FetchTimeout):
            fetch("http://slow.example.com/", FetchPolicy(timeout_s=0.3))
    finally:
        release.set()
    assert netguard.resolve("127.0.0.1", 80, 0.0) == [ipaddress.ip_address("127.0.0.1")]  # literal: no lookup


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (and localhost) and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[WebServer, Path]]:
    cert, key = _self_signed(tmp_path)
    with web_server(drip_interval_s=0.1) as s:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        s.socket = ctx.wrap_socket(s.socket, server_side=True, do_handshake_on_connect=False)
        s.files["a.jpg"] = b"over tls"
        yield s, cert


def test_https_verifies_the_certificate_of_the_name(
    tls_server: tuple[WebServer, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, cert = tls_server
    url = f"https://127.0.0.1:{server.server_port}/f/a.jpg"
    monkeypatch.setattr(webfetch, "_TLS", None)
    with pytest.raises(ConnectionFailed) as e:  # the system CAs do not know this certificate
        fetch(url, TIGHT)
    assert classify_error(str(e.value)) == "ssl"
    trusting = ssl.create_default_context(cafile=str(cert))
    monkeypatch.setattr(webfetch, "_TLS", trusting)
    assert fetch(url, TIGHT).body == b"over tls"
    elapsed, err = _timed(lambda: fetch(f"https://127.0.0.1:{server.server_port}/trickle", TIGHT))
    assert isinstance(err, FetchTimeout) and elapsed < HANG_GUARD_S


def test_a_trickled_tls_handshake_ends_at_the_deadline(server: WebServer) -> None:
    """A server that opens a TLS record and then sends one byte per 100 ms: only the reaper can end the
    handshake (each read gets a byte)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        conn.recv(4096)  # the ClientHello
        conn.sendall(b"\x16\x03\x03\x40\x00")  # a handshake record of 16 KiB is coming...
        while not stop.is_set():
            try:
                conn.sendall(b"\x02")
            except OSError:
                break
            time.sleep(0.1)
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        url = f"https://127.0.0.1:{listener.getsockname()[1]}/"
        elapsed, err = _timed(lambda: fetch(url, TIGHT))
    finally:
        stop.set()
        listener.close()
        t.join(timeout=5)
    assert isinstance(err, FetchTimeout) and TIGHT.timeout_s <= elapsed < HANG_GUARD_S


def test_query_images_come_through_the_same_rules(private_server: WebServer) -> None:
    from pipeline.query.search import _load_image

    before = private_server.connections
    with pytest.raises(AddressRefused):
        _load_image(f"{private_server.base}/f/secret.jpg")
    assert private_server.connections == before
