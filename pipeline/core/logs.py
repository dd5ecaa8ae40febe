"""Logging set-up for entry points and worker processes, and a small timing context manager."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Iterator

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str = "INFO") -> None:
    """Entry points only: logs to stderr, results go to stdout."""
    logging.basicConfig(level=level, format=FORMAT, stream=sys.stderr, force=True)
    for noisy in ("py4j", "urllib3", "PIL", "matplotlib", "fsspec", "httpx", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def setup_worker_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s [%(processName)s] %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


@contextlib.contextmanager
def timed(what: str, logger: logging.Logger | None = None) -> Iterator[dict[str, float]]:
    """Time a block; the elapsed seconds land in the yielded dict and in the log."""
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - t0
        (logger or logging.getLogger(__name__)).info("%s took %.2fs", what, out["seconds"])
