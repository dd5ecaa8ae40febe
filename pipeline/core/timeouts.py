"""Reads that may stall (object stores, network filesystems) bounded by a time limit, so a job fails instead of
hanging."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, TypeVar

from pipeline.core.errors import JobFailed

T = TypeVar("T")


class ReadStalled(JobFailed):
    """A read of the embed output gave nothing within the read timeout: the job fails instead of hanging."""


@contextlib.contextmanager
def naming_timeout(setting: str) -> Iterator[None]:
    """Add the config key that bounds the reads to a ReadStalled raised inside, so the message says what to raise."""
    try:
        yield
    except ReadStalled as e:
        raise ReadStalled(f"{e} ({setting})", e.summary) from e


def within(timeout_s: float | None, what: str, fn: Callable[[], T]) -> T:
    """fn() (one read) when it finishes within timeout_s; otherwise ReadStalled, and the read is abandoned.

    The read runs in a daemon thread: a read blocked in the network cannot be interrupted, and a daemon thread,
    unlike a thread pool's, never keeps the process from exiting. None: no limit, the read runs in this thread.
    """
    if timeout_s is None:
        return fn()
    done: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            done.append((True, fn()))
        except BaseException as e:  # handed to the caller, which re-raises it in its own thread
            done.append((False, e))

    t = threading.Thread(target=run, name=f"read {what}", daemon=True)
    t.start()
    t.join(timeout_s)
    if not done:
        raise ReadStalled(f"reading {what} stalled: nothing read within {timeout_s:g}s")
    ok, value = done[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]
