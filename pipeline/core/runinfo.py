"""run.json: the resolved config, library versions, host, times and exit status written beside every output (one
level down in a download output, which is img2dataset's folder), and where to find it."""

from __future__ import annotations

import logging
import platform
import posixpath
import socket
import sys
import time
from importlib import metadata
from typing import Any

import fsspec

from pipeline.core.config import Config, to_dict
from pipeline.core.fsio import put_json, read_json
from pipeline.core.storage import redact_arg

log = logging.getLogger(__name__)

LIBRARIES = (
    "clipline",
    "torch",
    "open_clip_torch",
    "img2dataset",
    "faiss-cpu",
    "faiss-gpu",
    "autofaiss",
    "pyarrow",
    "pyspark",
    "numpy",
    "webdataset",
    "fsspec",
)

RUN_JSON = "run.json"
# img2dataset takes every top-level *.json of its output folder for a shard's stats file and parses the name as a shard
# number (incremental mode and its progress logger both glob OUTPUT/*.json), so a download output keeps its record in
# a subfolder that glob does not reach. Earlier versions wrote OUTPUT/run.json there too: readers still look for it.
DOWNLOAD_RECORD_DIR = "_clipline"


def record_path(output: str, command: str) -> str:
    """Where `command` writes its run.json for `output`."""
    root = output.rstrip("/")
    if command == "download":
        return posixpath.join(root, DOWNLOAD_RECORD_DIR, RUN_JSON)
    return posixpath.join(root, RUN_JSON)


def find_record(output: str) -> str | None:
    """The run.json of an output folder, wherever the command that made it wrote it; None when there is none."""
    fs, root = fsspec.core.url_to_fs(output.rstrip("/"))
    for rel in (posixpath.join(DOWNLOAD_RECORD_DIR, RUN_JSON), RUN_JSON):
        if fs.exists(posixpath.join(root, rel)):
            return posixpath.join(output.rstrip("/"), rel)
    return None


def read_record(output: str) -> dict[str, Any] | None:
    """The last run's record (see find_record), or None."""
    path = find_record(output)
    return None if path is None else read_json(path)  # type: ignore[no-any-return]


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


class RunRecord:
    """Collects what a run did and writes it to its run.json (record_path) at the end, success or not."""

    def __init__(self, command: str, cfg: Config, output: str | None):
        self.output = output
        self.data: dict[str, Any] = {
            "command": command,
            "argv": [redact_arg(a) for a in sys.argv],
            "config": to_dict(cfg),
            "versions": versions(),
            "host": socket.gethostname(),
            "start_time": time.time(),
        }

    def finish(self, exit_status: int, summary: dict[str, Any] | None = None, error: str | None = None) -> None:
        self.data.update(end_time=time.time(), exit_status=exit_status, summary=summary, error=error)
        if not self.output:
            return
        try:
            fs, root = fsspec.core.url_to_fs(self.output)
            fs.invalidate_cache(root)  # an object store's listing cached before the stage (or its workers) wrote
            if not fs.isdir(root):
                return  # nothing was written: keep it that way
            # temporary name + rename, so a kill mid-write never leaves a torn record
            put_json(record_path(self.output, self.data["command"]), self.data)
        except Exception as e:  # the job's outcome (its exit code) must never be masked by its record
            log.warning("could not write run.json to %s: %s", self.output, e)
