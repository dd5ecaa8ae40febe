"""Logging set-up for entry points and worker processes (clipline's own lines, libraries only when they warn), and a
small timing context manager."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Iterator

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
WORKER_FORMAT = "%(asctime)s %(levelname)s [%(processName)s] %(name)s: %(message)s"
# Loggers whose records are clipline's own: the library (`pipeline.*`) and the command (`clipline`).
OWN_LOGGERS = ("pipeline", "clipline")
# Per-request protocol chatter: kept at WARNING even with log_level=DEBUG, where it would bury everything else.
CHATTY = ("py4j", "urllib3", "PIL", "matplotlib", "fsspec", "httpx", "huggingface_hub", "filelock")


class OwnRecordsOnly(logging.Filter):
    """Passes clipline's own records at any level and other libraries' from WARNING up.

    A filter on the handler, not levels on named loggers: open_clip logs its INFO lines through the root logger
    (`logging.info(...)`, so `root: Parsing model identifier`), which no per-library level can reach, and any
    library added later is covered without being listed (faiss.loader, autofaiss, ...)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.split(".", 1)[0] in OWN_LOGGERS


def _configure(level: str, fmt: str) -> None:
    from pipeline.core.storage import MaskSecrets

    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(MaskSecrets())  # at every level: a library's DEBUG line may quote its credentials
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    if logging.getLevelName(level) > logging.DEBUG:
        for handler in logging.getLogger().handlers:
            handler.addFilter(OwnRecordsOnly())
        if not sys.stderr.isatty():
            # Libraries' progress bars (autofaiss's readers, img2dataset's pool) written to a log file are lines of
            # carriage returns; clipline's own bar is already off there (tqdm's disable=None). tqdm reads TQDM_*
            # defaults when first imported: set before any stage is, and inherited by spawned workers.
            os.environ.setdefault("TQDM_DISABLE", "1")


def setup_logging(level: str = "INFO") -> None:
    """Entry points only: logs to stderr, results go to stdout; third-party records below WARNING are dropped
    unless level is DEBUG."""
    _configure(level, FORMAT)


def setup_worker_logging(level: str = "INFO") -> None:
    """The same rules in a worker process (local pool or Spark executor), with the process name in each line."""
    _configure(level, WORKER_FORMAT)
    _thread_lock_for_progress_bars()


def _thread_lock_for_progress_bars() -> None:
    """tqdm makes a multiprocessing lock (a named semaphore) when the first bar is made, even a disabled one (the
    offline model's weights loader makes one); a pool worker leaves through os._exit, which skips the finalizer
    that frees it, so Python's resource tracker warns "There appear to be 1 leaked semaphore objects" at the
    command's exit. A spawned worker's lock is its own anyway (it coordinates nothing across processes), so a
    thread lock loses nothing."""
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


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
