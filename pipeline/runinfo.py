"""run.json: the resolved config, library versions, host, times and exit status written beside every output."""

from __future__ import annotations

import json
import logging
import platform
import posixpath
import socket
import sys
import time
from importlib import metadata
from typing import Any

import fsspec

from pipeline.config import Config, to_dict

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


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


class RunRecord:
    """Collects what a run did and writes it to OUTPUT/run.json at the end, success or not."""

    def __init__(self, command: str, cfg: Config, output: str | None):
        self.output = output
        self.data: dict[str, Any] = {
            "command": command,
            "argv": sys.argv,
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
            if not fs.isdir(root):
                return  # nothing was written: keep it that way
            with fs.open(posixpath.join(root, "run.json"), "w") as f:
                json.dump(self.data, f, indent=1, default=str)
        except Exception as e:  # the job's outcome (its exit code) must never be masked by its record
            log.warning("could not write run.json to %s: %s", self.output, e)
