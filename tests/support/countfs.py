"""`countfile://`: the local filesystem, counting its requests as an object store bills them (LIST, HEAD, GET, PUT,
COPY, DELETE), in every process of a job.

Each process counts in memory (`CountingFileSystem.calls`) and, when $CLIPLINE_COUNTFS_DIR is set, also appends one
line per request to its own file there, so the requests of spawned pool workers and Spark executors add up too.
Importing this module registers the protocol; worker processes import it through `counting_embed_worker`.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.core.config import Config
from pipeline.core.tasks import ShardTask
from pipeline.distribute.base import WorkerContext

PROTOCOL = "countfile"
ENV = "CLIPLINE_COUNTFS_DIR"
KINDS = ("LIST", "HEAD", "GET", "PUT", "COPY", "DELETE")


class CountingFileSystem(LocalFileSystem):
    """The local filesystem under `countfile://`, one count per request an object store would receive."""

    protocol = (PROTOCOL,)
    calls: Counter[str] = Counter()

    @classmethod
    def count(cls, kind: str, n: int = 1) -> None:
        cls.calls[kind] += n
        folder = os.environ.get(ENV)
        if folder:
            with open(os.path.join(folder, f"{os.getpid()}.log"), "a") as f:
                f.write(f"{kind} {n}\n")

    _listing = threading.local()  # inside ls: the local listing stats each entry, an object store's LIST does not

    def ls(self, path: str, detail: bool = False, **kwargs: Any) -> Any:
        self.count("LIST")
        self._listing.on = True
        try:
            return super().ls(path, detail=detail, **kwargs)
        finally:
            self._listing.on = False

    def info(self, path: Any, **kwargs: Any) -> Any:
        if not getattr(self._listing, "on", False):
            self.count("HEAD")
        return super().info(path, **kwargs)

    def isfile(self, path: str) -> bool:
        self.count("HEAD")
        return bool(super().isfile(path))

    def isdir(self, path: str) -> bool:
        self.count("HEAD")
        return bool(super().isdir(path))

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        self.count("PUT" if any(c in mode for c in "wax") else "GET")
        return super()._open(path, mode, **kwargs)

    def mv(self, path1: str, path2: str, *args: Any, **kwargs: Any) -> None:
        self.count("COPY")  # an object store's rename: copy, then delete the source
        self.count("DELETE")
        super().mv(path1, path2, *args, **kwargs)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        self.count("DELETE", len(path) if isinstance(path, list) else 1)
        super().rm(path, recursive=recursive, maxdepth=maxdepth)


fsspec.register_implementation(PROTOCOL, CountingFileSystem, clobber=True)


def totals(folder: Path) -> Counter[str]:
    """The requests every process logged in `folder`, by kind."""
    out: Counter[str] = Counter({k: 0 for k in KINDS})
    for log in folder.glob("*.log"):
        for line in log.read_text().splitlines():
            kind, n = line.split()
            out[kind] += int(n)
    return out


def counting_embed_worker(task: ShardTask, cfg: Config, ctx: WorkerContext) -> dict[str, Any]:
    """The real embed worker in a process that knows `countfile://` (importing this module registered it)."""
    from pipeline.embed.runner import embed_worker

    return embed_worker(task, cfg, ctx)
