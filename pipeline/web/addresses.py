"""The network-level guards under pipeline/web/fetch.py: which IP addresses a fetch may connect to (imgproxy's
classes: loopback, private, link-local, plus cloud metadata endpoints), name resolution bounded by a deadline, and
the reaper that ends sockets whose deadline passed."""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import os
import socket
import threading
import time
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Cloud instance metadata services, refused whatever the policy allows (most are link-local anyway; the others sit
# in ranges allow_private_addresses would open): AWS (IPv4, IPv6, ECS, EKS), GCP/Azure/OCI, Alibaba, Oracle Classic.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",
        "169.254.170.2",
        "169.254.170.23",
        "fd00:ec2::254",
        "fd00:ec2::23",
        "100.100.100.200",
        "192.0.0.192",
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # 0.0.0.0 reaches the local host on Linux (imgproxy CVE-2025-24354)


def address_refusal(
    ip: IPAddress, allow_private: bool = False, allow_networks: tuple[IPNetwork, ...] = ()
) -> str | None:
    """Why a fetch may not connect to `ip`, or None when it may. Link-local, metadata, unspecified and multicast
    addresses are always refused; loopback, private and reserved ones unless allowed. IPv6 forms that carry an
    IPv4 address (mapped, NAT64, 6to4) are judged by that IPv4 address."""
    given, ip = ip, _embedded_ipv4(ip)
    if ip in METADATA_ADDRESSES:
        return f"{ip} is a cloud metadata endpoint (always refused)"
    if ip.is_link_local:
        return f"{ip} is link-local (always refused)"
    if ip.is_unspecified or ip.is_multicast or ip in _THIS_NETWORK:
        return f"{ip} is not a unicast host address (always refused)"
    if allow_private or any(a in n for n in allow_networks for a in (ip, given)):
        return None
    if ip.is_loopback:
        return f"{ip} is loopback (private addresses are not allowed)"
    if not ip.is_global or ip.is_reserved:
        return f"{ip} is a private or reserved address (private addresses are not allowed)"
    return None


def _embedded_ipv4(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def parse_networks(values: list[str] | tuple[str, ...]) -> tuple[IPNetwork, ...]:
    """Addresses and CIDR ranges (`10.1.2.3`, `10.0.0.0/8`, `fd12::/16`); ValueError names the bad one."""
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


def resolve(host: str, port: int, timeout_s: float) -> list[IPAddress]:
    """The host's addresses, in the resolver's order. getaddrinfo cannot be interrupted, so it runs in a daemon
    thread that is abandoned after timeout_s (TimeoutError); an IP literal needs no lookup. A failed lookup raises
    its OSError (socket.gaierror)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    out: list[list[IPAddress] | OSError] = []

    def lookup() -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            # dict: one entry per address, in order; a scoped IPv6 address keeps no "%zone" suffix
            out.append(list(dict.fromkeys(ipaddress.ip_address(str(i[4][0]).split("%", 1)[0]) for i in infos)))
        except OSError as e:
            out.append(e)

    t = threading.Thread(target=lookup, name="webfetch-dns", daemon=True)
    t.start()
    t.join(timeout_s)
    if not out:
        raise TimeoutError(f"resolving {host} took longer than {timeout_s:.3g}s")
    if isinstance(out[0], OSError):
        raise out[0]
    return out[0]


TICK_S = 0.05


@dataclass(eq=False)
class Watch:
    """One fetch's socket under the reaper: `fired` once the reaper shut it down."""

    sock: socket.socket | None
    fired: bool = False


class Reaper:
    """One thread per process that shuts down the sockets of fetches whose deadline passed: a server that trickles
    its headers or its TLS handshake a byte at a time never trips a per-read socket timeout, and a blocked recv
    cannot be interrupted any other way."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # a child has no reaper thread and maybe a held lock

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._heap: list[tuple[float, int, Watch]] = []
        self._seq = itertools.count()
        self._started = False

    def watch(self, sock: socket.socket, deadline: float) -> Watch:
        w = Watch(sock)
        with self._lock:
            if not self._started:
                self._started = True
                threading.Thread(target=self._run, name="webfetch-reaper", daemon=True).start()
            heapq.heappush(self._heap, (deadline, next(self._seq), w))
            if self._heap[0][2] is w:  # only a new earliest deadline changes when the reaper must wake
                self._wake.notify()
        return w

    def rewatch(self, w: Watch, sock: socket.socket) -> None:
        """Watch another socket object for the same descriptor (TLS wrapping detaches the plain one)."""
        with self._lock:
            if w.sock is not None:
                w.sock = sock

    def release(self, w: Watch) -> None:
        """The fetch is over: its socket is never shut down after this returns (so closing it is safe)."""
        with self._lock:
            w.sock = None

    def _run(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    w = heapq.heappop(self._heap)[2]
                    if w.sock is not None:
                        w.fired = True
                        try:  # the plain socket's shutdown, also for TLS: wakes the fetch's blocked recv/send
                            socket.socket.shutdown(w.sock, socket.SHUT_RDWR)
                        except OSError:
                            pass
                        w.sock = None
                # Released watches stay in the heap until their deadline; waking at most every TICK_S for them
                # keeps the reaper's cost flat at any URL rate (a deadline fires at most TICK_S late).
                self._wake.wait(max(self._heap[0][0] - now, TICK_S) if self._heap else None)


REAPER = Reaper()
