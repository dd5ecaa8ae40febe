"""`clipline run`: the whole chain download -> embed -> index -> dedup from one config, each stage resumable, under a
lock, ending with a machine-readable OUTPUT/summary.json; a folder of URL lists is ingested file by file, exactly once.

Why URL lists are staged: img2dataset numbers shards consecutively across the sorted files of a URL-list folder, so a
new file that sorts before an old one would shift every later shard number, and incremental mode would then skip the
wrong URLs (or refuse to resume). The chain therefore copies each new file once into OUTPUT/url_lists/ under the name
`{sequence:05d}_{name}`, sequence numbers given in order of first sight and recorded in OUTPUT/inputs.json with the
file's size and sha256. img2dataset reads that folder, whose sort order is the order files arrived in: old shards
keep their numbers whatever the new files are called, and only the new files' shards are downloaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

import fsspec

from pipeline.config import Config, ConfigError, require
from pipeline.summary import format_summary
from pipeline.writer import TMP_MARK, put_bytes

log = logging.getLogger(__name__)

STAGES = ("download", "embed", "index", "dedup")
SUMMARY_VERSION = 1
_CHUNK = 1 << 22


@dataclass(frozen=True)
class ChainLayout:
    """Where each stage of a chain run reads and writes, under one output root."""

    shards: str
    embeddings: str
    index: str
    dedup: str
    url_lists: str = ""
    inputs: str = ""
    summary: str = ""
    root: str = ""


def layout(output: str) -> ChainLayout:
    root = output.rstrip("/")
    emb = posixpath.join(root, "embeddings")
    return ChainLayout(
        shards=posixpath.join(root, "shards"),
        embeddings=emb,
        index=posixpath.join(emb, "index"),
        dedup=posixpath.join(emb, "dedup"),
        url_lists=posixpath.join(root, "url_lists"),
        inputs=posixpath.join(root, "inputs.json"),
        summary=posixpath.join(root, "summary.json"),
        root=root,
    )


def stage_config(cfg: Config, input: Any, output: str) -> Config:
    return cfg.model_copy(update={"input": input, "output": output}, deep=True)


# ---- URL-list ingestion ----------------------------------------------------------------------------------


def _read_json(path: str) -> dict[str, Any] | None:
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        return None
    with fs.open(p, "r") as f:
        return json.load(f)  # type: ignore[no-any-return]


def _put_json(path: str, obj: dict[str, Any]) -> None:
    fs, p = fsspec.core.url_to_fs(path)
    put_bytes(fs, p, json.dumps(obj, indent=1, default=str).encode())


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
    from pipeline.urllist import format_of

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
    ledger = _read_json(paths.inputs) or {"format_version": 1, "files": []}
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
        tmp = f"{final}{TMP_MARK}{os.getpid()}"
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
        _put_json(paths.inputs, ledger)
        log.info("staged %d new URL list(s): %s", len(new), ", ".join(new[:5]))
    return {"url_lists": len(ledger["files"]), "url_lists_new": len(new), "new_files": new}


def _drop_unrecorded(fs: Any, staged_dir: str, recorded: set[str]) -> None:
    for p in fs.ls(staged_dir, detail=False):
        if posixpath.basename(p) not in recorded:
            log.info("removing %s: staged by a run killed before it was recorded", p)
            fs.rm(p)


def _new_download_counts(shards_dir: str, before: set[str]) -> dict[str, int]:
    """URLs and images of the download shards completed by this run (img2dataset stats files not there before)."""
    fs, root = fsspec.core.url_to_fs(shards_dir)
    urls = images = 0
    for p in sorted(set(_stats_names(shards_dir)) - before):
        with fs.open(posixpath.join(root, p), "r") as f:
            s = json.load(f)
        urls += int(s.get("count", 0))
        images += int(s.get("successes", 0))
    return {"urls_downloaded": urls, "images_downloaded": images}


def _stats_names(shards_dir: str) -> list[str]:
    from pipeline.download import STATS_RE

    fs, root = fsspec.core.url_to_fs(shards_dir)
    if not fs.exists(root):
        return []
    return [n for n in (posixpath.basename(p) for p in fs.ls(root, detail=False)) if STATS_RE.match(n)]


def _is_dir(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return bool(fs.isdir(path))


# ---- the chain -------------------------------------------------------------------------------------------


def exit_status(error: BaseException | None) -> int:
    """The exit code `clipline` gives for a stage outcome (see pipeline/cli.py)."""
    if error is None:
        return 0
    if isinstance(error, ConfigError):
        return 2
    if isinstance(error, KeyboardInterrupt):
        return 130
    return 1


def _run_stage(cfg: Config, stage: str, paths: ChainLayout, facts: dict[str, Any]) -> dict[str, Any]:
    from pipeline.dedup import dedup
    from pipeline.download import download
    from pipeline.embed import embed
    from pipeline.index import build

    if stage == "download":
        source = cfg.input
        if isinstance(source, str) and _is_dir(source):
            from pipeline.urllist import plan_input

            def check(url_list: str) -> None:
                plan_input(stage_config(cfg, url_list, paths.shards))

            facts.update(ingest_url_lists(source, paths, cfg.download.input_format, check))
            source = paths.url_lists
        before = set(_stats_names(paths.shards))
        result = download(stage_config(cfg, source, paths.shards))
        facts.update(_new_download_counts(paths.shards, before))
        return dict(result, **{k: v for k, v in facts.items() if k != "new_files"})
    if stage == "embed":
        return embed(stage_config(cfg, paths.shards, paths.embeddings))
    if stage == "index":
        return build(stage_config(cfg, paths.embeddings, paths.index))
    dcfg = stage_config(cfg, paths.embeddings, paths.dedup)
    if dcfg.dedup.materialize and not dcfg.dedup.shards:
        dcfg.dedup.shards = paths.shards
    return dedup(dcfg)


def run(cfg: Config, stages: tuple[str, ...] = STAGES, echo: bool = True) -> dict[str, Any]:
    """Run the chain under the output's lock; every stage skips work already committed, so a re-run only processes
    what is new. OUTPUT/summary.json records each stage's outcome, success or not."""
    from pipeline.lock import output_lock

    require(cfg, "input", "output")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"run: unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    paths = layout(str(cfg.output))
    with output_lock(paths.root, "run " + ",".join(stages)):
        record = _SummaryRecord(paths, stages)
        out: dict[str, Any] = {}
        facts: dict[str, Any] = {}
        for stage in (s for s in STAGES if s in stages):
            t0 = time.time()
            try:
                out[stage] = _run_stage(cfg, stage, paths, facts)
            except BaseException as e:
                record.stage(stage, t0, getattr(e, "summary", None), e)
                record.finish(e)
                raise
            record.stage(stage, t0, out[stage], None)
            _echo(echo, stage, out[stage])
        record.finish(None)
    return {stage: _headline(s) for stage, s in out.items()}


class _SummaryRecord:
    """OUTPUT/summary.json: the last outcome of every stage at this output, and the exit status of the last run."""

    def __init__(self, paths: ChainLayout, stages: tuple[str, ...]):
        self.path = paths.summary
        try:
            previous = _read_json(self.path) or {}
        except ValueError:
            previous = {}
        self.data: dict[str, Any] = {
            "format_version": SUMMARY_VERSION,
            "output": paths.root,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "stages_run": [s for s in STAGES if s in stages],
            "started": time.time(),
            "stages": dict(previous.get("stages", {})),
        }

    def stage(self, stage: str, t0: float, summary: dict[str, Any] | None, error: BaseException | None) -> None:
        t1 = time.time()
        self.data["stages"][stage] = {
            "status": "ok" if error is None else "failed",
            "exit_status": exit_status(error),
            "error": None if error is None else f"{type(error).__name__}: {error}",
            "started": t0,
            "finished": t1,
            "seconds": round(t1 - t0, 2),
            "summary": summary or {},
        }

    def finish(self, error: BaseException | None) -> None:
        self.data.update(
            finished=time.time(),
            exit_status=exit_status(error),
            error=None if error is None else f"{type(error).__name__}: {error}",
        )
        self.data["seconds"] = round(self.data["finished"] - self.data["started"], 2)
        self.data["new_this_run"] = _new_this_run(self.data)
        try:
            _put_json(self.path, self.data)
        except Exception as e:  # the run's own outcome (its exit code) must never be masked by its record
            log.warning("could not write %s: %s", self.path, e)


def _new_this_run(data: dict[str, Any]) -> dict[str, Any]:
    """The headline a scheduler alerts on: what this run added (0 everywhere = nothing new arrived)."""
    s = {k: v.get("summary", {}) for k, v in data["stages"].items() if k in data["stages_run"]}
    out: dict[str, Any] = {}
    if "download" in s:
        out.update(
            url_lists=s["download"].get("url_lists_new"),
            urls=s["download"].get("urls_downloaded"),
            images=s["download"].get("images_downloaded"),
        )
    if "embed" in s:
        out.update(shards_embedded=s["embed"].get("shards_done"), samples_embedded=s["embed"].get("samples_ok"))
    if "index" in s:
        out.update(shards_indexed=(s["index"].get("image") or {}).get("shards_added"))
    return out


def _headline(summary: Any) -> Any:
    """What `clipline run` prints per stage: scalars and flat mappings (index per modality, failures by reason)."""
    if not isinstance(summary, dict):
        return summary
    return {k: v for k, v in summary.items() if _flat(v)}


def _flat(v: Any) -> bool:
    if isinstance(v, dict):
        return not any(isinstance(x, (dict, list)) for x in v.values())
    return not isinstance(v, list)


def _echo(echo: bool, title: str, summary: Any) -> None:
    if echo and isinstance(summary, dict):
        print(format_summary(title, summary), flush=True)
