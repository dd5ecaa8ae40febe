"""Object-store requests retried after a transient error, counted in each process so that summaries can say how often
the store throttled or dropped the job.

The retrying itself is the libraries': botocore (under s3fs) retries a request answered with a throttling code (503
SlowDown, ...), a 500/502/503/504 or a connection error or timeout, with exponential back-off and jitter, up to its
`max_attempts` (botocore's legacy mode by default: 5 attempts; set `config_kwargs: {retries: {mode: standard,
max_attempts: N}}` in the s3 storage options to change it); when botocore gives up on SlowDown or a connection error,
s3fs repeats the whole call up to its `retries` (default 5) with its own short back-off, and it re-reads a body cut
off mid-way. A request that still fails raises, and the task fails (and is retried by the distributor's ledger).

What is counted: every retry botocore sends (a request whose attempt number is above 1), exactly, in whichever
process sends it. Not counted: s3fs's repeats of a whole call after botocore gave up (they follow only a failure
that outlasted botocore's attempts, and s3fs has no hook), and gcsfs's and adlfs's own retries (those libraries
retry 429/5xx with back-off too, but expose no hook). The local disk has no transient errors.

botocore has no per-process hook for every client; each botocore session copies `botocore.handlers.BUILTIN_HANDLERS`
when it is created (s3fs creates one per filesystem instance), so `install()` appends the one counting handler there.
Call it before the first `s3://` access of a process (stage drivers and workers do).
"""

from __future__ import annotations

import contextlib
import importlib.util
import threading
from typing import Any, Callable, Iterator

EVENT = "request-created.s3"  # botocore emits it for every attempt of every S3 request, retries included

_lock = threading.Lock()
_retries = 0
_installed = False


def _on_request_created(request: Any = None, **kwargs: Any) -> None:
    """botocore handler: count the request if it is a retry. Returns None so it never changes the request."""
    global _retries
    context = getattr(request, "context", None) or {}
    if context.get("retries", {}).get("attempt", 1) > 1:
        with _lock:
            _retries += 1


def install() -> bool:
    """Count retries of every botocore session created from now on in this process; idempotent. False when botocore
    is not installed (then no S3 request can be made either)."""
    global _installed
    if _installed:
        return True
    if importlib.util.find_spec("botocore") is None:
        return False
    from botocore import handlers

    with _lock:
        if (EVENT, _on_request_created) not in handlers.BUILTIN_HANDLERS:
            handlers.BUILTIN_HANDLERS.append((EVENT, _on_request_created))
        _installed = True
    return True


def retries() -> int:
    """Retries this process has sent since it started."""
    return _retries


@contextlib.contextmanager
def counting() -> Iterator[Callable[[], int]]:
    """Install the counter and yield a function that returns the retries this process sent since the block began (all
    threads of the process: run one task at a time in it, as the distributors' workers do)."""
    install()
    start = _retries
    yield lambda: _retries - start
