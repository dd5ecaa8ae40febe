"""img2dataset's output folder, as the stages after it read it: a shard is NNNNN.tar (or .parquet, ...) beside
NNNNN.parquet (one row per URL: status, error_message) and NNNNN_stats.json, which img2dataset writes last and so
marks the shard complete; and its free-text error messages folded into countable reasons. The one module that knows
these names."""

from __future__ import annotations

import collections
import json
import posixpath
import re
from dataclasses import dataclass
from typing import Any

import fsspec

STATS_SUFFIX = "_stats.json"
STATS_RE = re.compile(r"^(\d+)_stats\.json$")


@dataclass(frozen=True)
class DownloadShard:
    """The files of one completed img2dataset shard."""

    shard: int
    stats: str
    urls: str  # NNNNN.parquet: every URL of the shard with its status
    tar: str

    @property
    def name(self) -> str:
        return posixpath.basename(self.stats)[: -len(STATS_SUFFIX)]


def _shard(stats_path: str) -> DownloadShard | None:
    m = STATS_RE.match(posixpath.basename(stats_path))
    if m is None:
        return None
    stem = stats_path[: -len(STATS_SUFFIX)]
    return DownloadShard(int(m.group(1)), stats_path, stem + ".parquet", stem + ".tar")


def completed(fs: Any, root: str) -> dict[int, DownloadShard]:
    """Shard number -> files, for every shard whose stats file exists (one listing of the folder)."""
    if not fs.exists(root):
        return {}
    out = {}
    for p in fs.ls(root.rstrip("/"), detail=False):
        s = _shard(p)
        if s is not None:
            out[s.shard] = s
    return dict(sorted(out.items()))


def completed_at(url: str) -> dict[int, DownloadShard]:
    """completed() of a folder given as a URL; the paths keep the URL's protocol."""
    fs, root = fsspec.core.url_to_fs(url)
    found = completed(fs, root)
    if fs.protocol in ("file", ("file", "local")):
        return found
    return {k: _shard(fs.unstrip_protocol(s.stats)) for k, s in found.items()}  # type: ignore[misc]


def read_stats(fs: Any, shard: DownloadShard) -> dict[str, Any]:
    with fs.open(shard.stats, "r") as f:
        return json.load(f)  # type: ignore[no-any-return]


def url_outcomes(fs: Any, shard: DownloadShard) -> tuple[int, collections.Counter[str]]:
    """(URLs written, failures by reason) of one shard, from its per-URL parquet."""
    import pyarrow.parquet as pq

    with fs.open(shard.urls, "rb") as f:
        table = pq.read_table(f, columns=["status", "error_message"])
    ok = 0
    reasons: collections.Counter[str] = collections.Counter()
    for status, err in zip(table.column("status").to_pylist(), table.column("error_message").to_pylist(), strict=True):
        if status == "success":
            ok += 1
        else:
            reasons[classify_error(err)] += 1
    return ok, reasons


def is_unfinished_tar(tar_url: str, stats_names: set[str]) -> bool:
    """A tar in a folder where img2dataset writes stats files, without its own: still being written (or killed)."""
    stem = posixpath.basename(tar_url)[: -len(".tar")]
    return bool(stats_names) and f"{stem}{STATS_SUFFIX}" not in stats_names


def stats_names(fs: Any, folder: str) -> set[str]:
    return {posixpath.basename(p) for p in fs.ls(folder, detail=False) if STATS_RE.match(posixpath.basename(p))}


_RULES = (
    # clipline's fetch step (pipeline/web/fetch.py, download/fetcher.py); before the older rules, whose
    # needles ("timeout") can appear inside these messages
    (("scheme refused",), "scheme refused"),
    (("address refused",), "address refused"),
    (("too many redirects",), "too many redirects"),
    (("response too large",), "too large"),
    (("too many pixels",), "too many pixels"),
    (("shard deadline",), "shard timeout"),
    (("bad url",), "bad url"),
    # img2dataset's own messages (urllib's, OpenCV's, its resizer's)
    (("timed out", "timeout"), "timeout"),
    (("image decoding error", "cannot identify image", "imdecode"), "cannot decode image"),
    (("connection refused",), "connection refused"),
    (("connection reset", "remote end closed", "remotedisconnected", "incompleteread"), "connection closed"),
    (("name or service not known", "nodename nor servname", "getaddrinfo"), "dns"),
    (("ssl", "certificate"), "ssl"),
    (("x-robots-tag",), "disallowed by X-Robots-Tag"),
    (("image too small",), "image too small"),
    (("image area too large",), "image area too large"),
    (("aspect ratio too large",), "aspect ratio too large"),
    (("hash mismatch",), "hash mismatch"),
    (("unknown url type", "no host given"), "bad url"),
)


def classify_error(message: str | None) -> str:
    """Fold img2dataset's free-text error messages into a few reasons that can be counted."""
    msg = (message or "").strip()
    low = msg.lower()
    m = re.search(r"http error (\d{3})", low)
    if m:
        return f"http {m.group(1)}"
    for needles, reason in _RULES:
        if any(n in low for n in needles):
            return reason
    return f"other: {msg[:80]}" if msg else "other: no message"
