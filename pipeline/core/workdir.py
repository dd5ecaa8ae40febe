"""Local work folders of the index and dedup stages, named after their process and host, so that a later run removes
those of killed runs (SIGKILL skips every cleanup) and never a running one's."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
from typing import Iterator

from pipeline.core.lock import pid_alive

log = logging.getLogger(__name__)


def _prefix(stage: str) -> str:
    return f"clipline-{stage}-"


def _host() -> str:
    return socket.gethostname().replace(os.sep, "_")


def remove_stale(stage: str) -> list[str]:
    """Remove the work folders of this stage's runs killed on this host (their process is gone); returns their names.

    Names are prefix + "{pid}-{host}-" + tempfile's random suffix, which holds no "-".
    """
    root, prefix, removed = tempfile.gettempdir(), _prefix(stage), []
    for name in os.listdir(root):
        if not name.startswith(prefix):
            continue
        pid, _, rest = name[len(prefix) :].partition("-")
        if pid.isdigit() and rest.rpartition("-")[0] == _host() and not pid_alive(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(name)
    if removed:
        log.info("removed %d work folders of killed %s runs from %s", len(removed), stage, root)
    return removed


@contextlib.contextmanager
def work_folder(stage: str) -> Iterator[str]:
    """A new local folder for this run (removed at the end), after removing those of killed runs."""
    remove_stale(stage)
    path = tempfile.mkdtemp(prefix=f"{_prefix(stage)}{os.getpid()}-{_host()}-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def tempfiles_in(folder: str) -> Iterator[None]:
    """Point the tempfile module at folder for a block: for libraries that make their own temporary files and
    folders (autofaiss) and offer no option for where. Process-wide while the block runs."""
    before = tempfile.tempdir
    tempfile.tempdir = folder
    try:
        yield
    finally:
        tempfile.tempdir = before
