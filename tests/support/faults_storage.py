"""Importable fault helpers for the reliability tests: a failing/stalling fsspec filesystem, an in-process
distributor, faulty embed workers for spawned processes, and hostile image bytes built cheaply."""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import fsspec
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

from pipeline.core.config import Config
from pipeline.core.tasks import ShardTask
from pipeline.distribute.base import (
    Distributor,
    Job,
    Ledger,
    TaskResult,
    WorkerContext,
    describe,
    resolve_worker,
    run_attempt,
)
from tests.support.faults import embed_dies_mid_shard  # imports torch: a pool worker does it before it is ready

PROTOCOL = "faultymem"
FAULT_DIR = "CLIPLINE_TEST_FAULT_DIR"  # same variable as tests/support/faults.py: a folder shared with spawned workers


class InjectedFault(OSError):
    """The error every injected storage fault raises (an OSError, as a real disk or network error is)."""


class _FailingFile(MemoryFile):
    """A file being written that accepts half of the first write, then fails (disk full, connection reset)."""

    def write(self, data: Any) -> int:
        super().write(bytes(data)[: max(1, len(data) // 2)])
        raise InjectedFault(f"injected write failure on {self.path}")


class _StallingFile:
    """A file being read that delivers `after` bytes, then blocks until released (a hung network read)."""

    def __init__(self, inner: MemoryFile, after: int, release: threading.Event):
        self._inner, self._left, self._release = inner, after, release

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            self._release.wait(120)
            raise InjectedFault("stalled read released by the test")
        n = self._left if n is None or n < 0 else min(n, self._left)
        data = self._inner.read(n)
        self._left -= len(data)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __enter__(self) -> "_StallingFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class FaultyMemoryFS(MemoryFileSystem):
    """`faultymem://`: an in-memory filesystem (own store) whose writes, renames and reads fail or stall on demand.

    Faults are class attributes set through `faults(...)`; each names a substring of the paths it hits.
    """

    protocol = (PROTOCOL,)
    store: dict[str, Any] = {}
    pseudo_dirs = [""]
    fail_write: str | None = None  # a write to a matching path fails half-way
    fail_mv: str | None = None  # renaming onto a matching path fails
    fail_nth_write: int | None = None  # the Nth file opened for writing in a faults() block (1-based) fails
    stall_read: str | None = None  # reading a matching path stalls after `stall_after` bytes
    stall_after: int = 0
    release = threading.Event()
    calls: Counter[str] = Counter()

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, str) and path.startswith(PROTOCOL + "://"):
            path = "memory://" + path[len(PROTOCOL) + 3 :]
        return super()._strip_protocol(path)

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        cls = type(self)
        if "w" in mode:
            cls.calls["write"] += 1
            nth = cls.fail_nth_write is not None and cls.calls["write"] == cls.fail_nth_write
            if nth or (cls.fail_write and cls.fail_write in path):
                super()._open(path, mode, **kwargs)  # parent checks and pseudo-dir bookkeeping
                f = _FailingFile(self, path)
                f.commit()  # a memory file is visible from open on, as a half-written object would be
                return f
        f = super()._open(path, mode, **kwargs)
        if "r" in mode and cls.stall_read and cls.stall_read in path:
            cls.calls["stall"] += 1
            return _StallingFile(f, cls.stall_after, cls.release)
        return f

    def mv(self, path1: str, path2: str, *args: Any, **kwargs: Any) -> None:
        type(self).calls["mv"] += 1
        if self.fail_mv and self.fail_mv in str(path2):
            raise InjectedFault(f"injected rename failure onto {path2}")
        super().mv(path1, path2, *args, **kwargs)

    @classmethod
    def reset(cls) -> None:
        cls.release.set()  # let any stalled reader thread of a previous test finish
        cls.release = threading.Event()
        cls.store.clear()
        cls.pseudo_dirs[:] = [""]
        cls.fail_write = cls.fail_mv = cls.fail_nth_write = cls.stall_read = None
        cls.stall_after = 0
        cls.calls = Counter()


fsspec.register_implementation(PROTOCOL, FaultyMemoryFS, clobber=True)


@contextlib.contextmanager
def faults(**settings: Any) -> Iterator[type[FaultyMemoryFS]]:
    """Set FaultyMemoryFS faults for a block (the store is kept), then clear them."""
    FaultyMemoryFS.calls["write"] = 0
    for k, v in settings.items():
        if not hasattr(FaultyMemoryFS, k):
            raise AttributeError(k)
        setattr(FaultyMemoryFS, k, v)
    try:
        yield FaultyMemoryFS
    finally:
        FaultyMemoryFS.release.set()
        FaultyMemoryFS.fail_write = FaultyMemoryFS.fail_mv = FaultyMemoryFS.fail_nth_write = None
        FaultyMemoryFS.stall_read = None


class InlineDistributor(Distributor):
    """Runs tasks one after another in this process under the same Ledger (retry policy) and probe as the backends.

    For memory-backed filesystems (spawned workers would not share them) and for driver tests that need no
    process isolation; tests install it with monkeypatch over the "local" backend.
    """

    def run(self, job: Job, on_result: Callable[[TaskResult], None] | None = None) -> list[TaskResult]:
        ledger = Ledger(job, on_result)
        fn = resolve_worker(job.worker)
        probe = resolve_worker(job.committed) if job.committed else None
        for i, task in enumerate(job.tasks):
            while ledger.is_open(i):
                attempt = ledger.next_attempt[i]
                ctx = WorkerContext(attempt, None, 1, lambda n, i=i: ledger.report(i, n))
                try:
                    ledger.succeed(i, run_attempt(fn, probe, task, self.cfg, ctx), attempt)
                except Exception as e:  # reported like the pool reports a worker's exception
                    ledger.fail(i, describe(e), attempt + 1)
        ledger.close()
        return ledger.results


# ---- faulty workers for spawned processes ---------------------------------------------------------------


def _count_attempt(task: ShardTask) -> int:
    p = Path(os.environ[FAULT_DIR]) / f"attempts_{task.shard_id}"
    n = int(p.read_text()) if p.exists() else 0
    p.write_text(str(n + 1))
    return n


def crash_and_hang(task: ShardTask, cfg: Config, ctx: WorkerContext) -> dict[str, Any]:
    """Shard 00000 hangs on its first attempt (records its pid); 00001 dies mid-shard on every attempt."""
    n = _count_attempt(task)
    if task.shard_id == "00000" and n == 0:
        (Path(os.environ[FAULT_DIR]) / "hung_pid").write_text(str(os.getpid()))
        time.sleep(600)
    return embed_dies_mid_shard(task, cfg, ctx)


def embed_crash_and_hang(cfg: Config) -> dict[str, Any]:
    """The embed stage with `crash_and_hang` as its worker, in the CLI's stage-function shape."""
    from pipeline.embed.stage import embed

    return embed(cfg, worker="tests.support.faults_storage:crash_and_hang")


def fail_commit_of_00001(task: ShardTask, cfg: Config, ctx: WorkerContext) -> dict[str, Any]:
    """The real worker, but shard 00001's commit fails after its embeddings were renamed to their final names."""
    import pipeline.embed.writer as writer
    from pipeline.embed.runner import embed_worker

    if task.shard_id != "00001":
        return embed_worker(task, cfg, ctx)
    original = writer.put_bytes

    def put(fs: Any, final: str, data: bytes) -> None:
        if "/metadata/" in final:
            raise InjectedFault(f"injected failure writing {final}")
        original(fs, final, data)

    writer.put_bytes = put  # type: ignore[assignment]
    try:
        return embed_worker(task, cfg, ctx)
    finally:
        writer.put_bytes = original  # type: ignore[assignment]


# ---- hostile image bytes, built without allocating the pixels -------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_1bit(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of any size; 30000x30000 is ~110 KB and compresses row by row."""
    co = zlib.compressobj(9)
    row = b"\x00" + bytes((width + 7) // 8)
    data = b"".join(co.compress(row) for _ in range(height)) + co.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def jpeg_header_claiming(width: int, height: int) -> bytes:
    """A JPEG whose frame header claims width x height, followed by no image data."""
    sof = struct.pack(">BHHB", 8, height, width, 3) + b"".join(bytes([i, 0x11, 0]) for i in (1, 2, 3))
    return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


def ico_wrapping(png: bytes) -> bytes:
    """An .ico whose directory entry says 256x256 but whose embedded PNG may be any size."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png
