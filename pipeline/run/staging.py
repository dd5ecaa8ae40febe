"""URL-list staging for `clipline run`: each new file of a URL-list folder copied once into OUTPUT/url_lists/ under an
arrival-ordered name, and recorded in OUTPUT/inputs.json.

Why URL lists are staged: img2dataset numbers shards consecutively across the sorted files of a URL-list folder, so a
new file that sorts before an old one would shift every later shard number, and incremental mode would then skip the
wrong URLs (or refuse to resume). The chain therefore copies each new file once into OUTPUT/url_lists/ under the name
`{sequence:05d}_{name}`, sequence numbers given in order of first sight and recorded in OUTPUT/inputs.json with the
file's size and sha256. img2dataset reads that folder, whose sort order is the order files arrived in: old shards
keep their numbers whatever the new files are called, and only the new files' shards are downloaded.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import time
from typing import TYPE_CHECKING, Any, Callable

import fsspec

from pipeline.core.errors import ConfigError
from pipeline.core.fsio import put_json, read_json, tmp_name

if TYPE_CHECKING:
    from pipeline.run.layout import ChainLayout

log = logging.getLogger(__name__)

_CHUNK = 1 << 22


def _sha256(fs: Any, path: str, copy_to: str | None = None) -> str:
    """Stream a file once: its sha256, and optionally a copy of it at `copy_to` (another filesystem is fine)."""
    h = hashlib.sha256()
    with fs.open(path, "rb") as src:
        dst = fsspec.open(copy_to, "wb").open() if copy_to else None
        try:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                if dst is not None:
                    dst.write(chunk)
        finally:
            if dst is not None:
                dst.close()
    return h.hexdigest()


def list_url_files(fs: Any, folder: str, input_format: str | None) -> list[str]:
    """URL-list files of a folder, by name; names starting with '.' or '_' are files still being written."""
    from pipeline.download.urllist import format_of

    names = sorted(posixpath.basename(p) for p in fs.ls(folder, detail=False) if fs.isfile(p))
    names = [n for n in names if not n.startswith((".", "_")) and format_of(n) is not None]
    if input_format:
        names = [n for n in names if n.endswith("." + input_format)]
    formats = sorted({str(format_of(n)) for n in names})
    if len(formats) > 1:
        raise ConfigError(
            f"download.input_format: {folder} mixes URL-list formats {formats}; set download.input_format "
            "or keep one format per folder"
        )
    if not names:
        raise ConfigError(
            f"input: no URL list ({'*.' + input_format if input_format else 'csv, parquet, ...'}) in {folder}"
        )
    return names


def ingest_url_lists(
    source: str, paths: ChainLayout, input_format: str | None, check: Callable[[str], Any] | None = None
) -> dict[str, Any]:
    """Stage the new URL-list files of `source` (a folder) into paths.url_lists exactly once; returns what changed.

    `check(url_list)` validates a new file (columns...) before it is staged, so a file refused by the download stage
    can still be fixed in place. A staged file whose source changed since is an error (its shards were numbered from
    the old content); a staged file whose source disappeared is kept (its shards stay part of the dataset)."""
    fs, folder = fsspec.core.url_to_fs(source)
    names = list_url_files(fs, folder, input_format)
    ledger = read_json(paths.inputs) or {"format_version": 1, "files": []}
    known = {e["name"]: e for e in ledger["files"]}
    for name in names:
        entry = known.get(name)
        if entry is None:
            continue
        path = posixpath.join(folder, name)
        if fs.size(path) != entry["size"] or _sha256(fs, path) != entry["sha256"]:
            raise ConfigError(
                f"input: {name} in {source} changed since it was downloaded into {paths.root} (it was staged as "
                f"url_lists/{entry['staged']}); URL lists are append-only by file: restore it and put new URLs in a new "
                "file, or use a new output"
            )
    gone = sorted(set(known) - set(names))
    if gone:
        log.warning(
            "%d URL list(s) downloaded earlier are no longer in %s (their shards are kept): %s",
            len(gone),
            source,
            ", ".join(gone[:5]),
        )
    out_fs, staged_dir = fsspec.core.url_to_fs(paths.url_lists)
    out_fs.makedirs(staged_dir, exist_ok=True)
    _drop_unrecorded(out_fs, staged_dir, {e["staged"] for e in ledger["files"]})
    new = [n for n in names if n not in known]
    if check is not None:
        for name in new:
            check(posixpath.join(source.rstrip("/"), name))
    for name in new:
        staged = f"{len(ledger['files']):05d}_{name}"
        final = posixpath.join(paths.url_lists, staged)
        tmp = tmp_name(final)
        digest = _sha256(fs, posixpath.join(folder, name), copy_to=tmp)
        out_fs.mv(fsspec.core.url_to_fs(tmp)[1], fsspec.core.url_to_fs(final)[1])
        ledger["files"].append(
            {
                "name": name,
                "staged": staged,
                "size": fs.size(posixpath.join(folder, name)),
                "sha256": digest,
                "added": time.time(),
            }
        )
    if new:
        ledger["source"] = source
        # Written after the copies and before any download: a killed run leaves copies the ledger does not name,
        # removed above on the next run, never a ledger naming a missing copy.
        put_json(paths.inputs, ledger)
        log.info("staged %d new URL list(s): %s", len(new), ", ".join(new[:5]))
    return {"url_lists": len(ledger["files"]), "url_lists_new": len(new), "new_files": new}


def _drop_unrecorded(fs: Any, staged_dir: str, recorded: set[str]) -> None:
    for p in fs.ls(staged_dir, detail=False):
        if posixpath.basename(p) not in recorded:
            log.info("removing %s: staged by a run killed before it was recorded", p)
            fs.rm(p)
