"""Where pipeline/web/fetch.py keeps a response body while it arrives, so that memory depends on the size cap
and never on what servers send: small bodies in a bytearray; big ones in an anonymous memory map, unmapped when the
fetch ends, under one per-process budget shared by every thread."""

from __future__ import annotations

import mmap
import os
import threading
import time

# Most web images, and malloc's own mmap threshold: a buffer this small never moves that threshold up (which would
# keep later big buffers in the arenas), and 32 threads' buffers weigh 4 MiB.
SMALL = 128 * 1024
SLACK = 64 * 1024  # one read past the cap, to see that the cap was passed


class _Budget:
    """Bytes of big bodies held at once in this process. A fetch that needs more waits for room (within its
    deadline), except when nothing else holds any: so 32 threads that all meet a 1 GiB body hold two caps' worth,
    not thirty-two, and one body up to the cap always fits."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # a child starts with nothing held, and a free lock

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self.used = 0

    def take(self, n: int, limit: int, deadline: float) -> None:
        with self._cond:
            while self.used and self.used + n > limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("timed out waiting for memory to hold a big body")
                self._cond.wait(left)
            self.used += n

    def give(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


BUDGET = _Budget()


class Body:
    """A body as it arrives. Past SMALL it moves to an anonymous map sized for the announced length (or the cap),
    reserved from BUDGET (2 x cap per process) and unmapped at exit: a body refused at the cap gives its pages back at
    once, where malloc would keep them in its per-thread arenas and leave a download worker's RSS raised for good.
    Small bodies skip the map: an mmap/munmap per URL slows a process of many threads."""

    def __init__(self, expected: int | None, cap: int, deadline: float):
        self.expected, self.cap, self.deadline, self.size = expected, cap, deadline, 0
        self.small: bytearray | None = bytearray()
        self.mm: mmap.mmap | None = None
        self.held = 0

    def add(self, chunk: bytes) -> None:
        end = self.size + len(chunk)
        if self.small is not None and end <= SMALL:
            self.small += chunk
        else:
            if self.mm is None:
                self._map()
            assert self.mm is not None
            if end > len(self.mm):
                raise ValueError(f"body of {end} bytes overruns its {len(self.mm)}-byte map")  # a caller's bug
            self.mm[self.size : end] = chunk
        self.size = end

    def _map(self) -> None:
        n = min(self.expected if self.expected is not None else self.cap, self.cap) + SLACK
        BUDGET.take(n, 2 * (self.cap + SLACK), self.deadline)
        self.held = n
        self.mm = mmap.mmap(-1, n)  # pages are touched, and counted in RSS, only as the body fills them
        assert self.small is not None
        self.mm[: self.size] = self.small
        self.small = None

    def take(self) -> bytes:
        if self.small is not None:
            return bytes(self.small)
        assert self.mm is not None
        return self.mm[: self.size]

    def __enter__(self) -> Body:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.mm is not None:
            self.mm.close()
        if self.held:
            BUDGET.give(self.held)
            self.held = 0
