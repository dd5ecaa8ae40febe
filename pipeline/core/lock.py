"""An exclusive lock file in an output root, so two scheduled runs never write the same output at once.

OUTPUT/.clipline.lock holds JSON {pid, host, time, command, token}. It is created atomically: the content is written
to a private temporary file which is then hard-linked to the lock name, and link(2) fails when the name exists (this
also holds on NFS, where O_EXCL historically did not). A lock whose pid is dead on this same host is stale (its run
was killed) and is taken over (runs racing to take it over take turns on OUTPUT/.clipline.lock.guard, a file that
stays); a lock from another host is never judged stale, because its pid means nothing here.
A run that finds a live lock raises LockHeld, a ConfigError, so `clipline` exits 2 without writing anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec

from pipeline.core.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = ".clipline.lock"


class LockHeld(ConfigError):
    """Another live run holds the output's lock: nothing was done (exit 2); run again once it has finished."""

    def __init__(self, path: str, holder: dict[str, Any]):
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
        super().__init__(
            f"{path} is held by another run: pid {holder.get('pid')} on host {holder.get('host')} "
            f"({holder.get('command')}) since {since}; nothing was done. If that run is gone (another host "
            f"cannot be checked from here), delete {path} and retry"
        )
        self.path = path
        self.holder = holder


def lock_path(output: str) -> str:
    return os.path.join(output, LOCK_NAME)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (a pid reused by another process counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def read_holder(path: str) -> dict[str, Any] | None:
    """The lock's content; None when there is no lock file. An unreadable file is reported as held by nobody known."""
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return None
    except ValueError:
        return {}


def is_stale(holder: dict[str, Any], host: str | None = None) -> bool:
    """Stale: written on this host by a process that no longer exists."""
    host = host or socket.gethostname()
    return holder.get("host") == host and isinstance(holder.get("pid"), int) and not pid_alive(holder["pid"])


class OutputLock:
    """The held lock of one output root; release() removes the file only if it is still ours."""

    def __init__(self, path: str, info: dict[str, Any]):
        self.path = path
        self.info = info

    def release(self) -> None:
        holder = read_holder(self.path)
        if holder is not None and holder.get("token") == self.info["token"]:
            os.unlink(self.path)
        else:
            log.warning("%s is no longer ours at release (found %s); left alone", self.path, holder)


def _try_create(path: str, info: dict[str, Any]) -> bool:
    """Atomically create the lock with its full content; False when the name already exists."""
    tmp = f"{path}.{info['token']}.tmp"
    with open(tmp, "w") as f:
        json.dump(info, f)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def _break_stale(path: str, stale: dict[str, Any]) -> None:
    """Delete the stale lock, unless it changed since it was read. Runs that race to break it take turns on a guard
    file with flock(2): stale locks are same-host by definition, where flock is exact, so only the first sees the
    stale content and the others find the winner's live lock instead of deleting it."""
    with open(path + ".guard", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            if read_holder(path) == stale:
                log.warning(
                    "taking over the stale lock %s of pid %s on %s (that process is gone)",
                    path,
                    stale.get("pid"),
                    stale.get("host"),
                )
                os.unlink(path)
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def acquire(output: str, command: str, attempts: int = 5) -> OutputLock:
    """Take the output root's lock, or raise LockHeld naming the live holder."""
    os.makedirs(output, exist_ok=True)
    path = lock_path(output)
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "time": time.time(),
        "command": command,
        "token": uuid.uuid4().hex,
    }
    for _ in range(attempts):
        if _try_create(path, info):
            return OutputLock(path, info)
        holder = read_holder(path)
        if holder is None:
            continue  # released between our attempt and the read
        if not is_stale(holder):
            raise LockHeld(path, holder)
        _break_stale(path, holder)
    raise LockHeld(path, read_holder(path) or {})


@contextlib.contextmanager
def output_lock(output: str, command: str) -> Iterator[OutputLock | None]:
    """Hold the lock of a local output root for the block. Remote outputs (s3://...) have no atomic create-if-absent
    here, so they are not locked: let the scheduler serialize runs (Airflow max_active_runs=1, flock in cron)."""
    fs, root = fsspec.core.url_to_fs(output)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" not in protocols:
        log.warning("%s is not a local path: runs on it are not locked against each other", output)
        yield None
        return
    lock = acquire(root, command)
    try:
        yield lock
    finally:
        lock.release()
