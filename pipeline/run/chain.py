"""`clipline run`: the whole chain download -> embed -> index -> dedup from one config, each stage resumable, under a
lock, ending with a machine-readable OUTPUT/summary.json; a folder of URL lists is ingested file by file, exactly once
(pipeline/run/staging.py says how and why).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import fsspec

from pipeline.core.config import Config, EmbeddingsConfig, require
from pipeline.core.errors import ConfigError
from pipeline.core.fsio import put_json, read_json
from pipeline.core.summary import format_summary
from pipeline.download import layout as download_layout
from pipeline.run.layout import ChainLayout, layout
from pipeline.run.staging import ingest_url_lists

log = logging.getLogger(__name__)

STAGES = ("download", "embed", "index", "dedup")
SUMMARY_VERSION = 1


def stage_config(cfg: Config, input: Any, output: str) -> Config:
    return cfg.model_copy(update={"input": input, "output": output}, deep=True)


def own_embeddings_config(cfg: Config, input: Any, output: str) -> Config:
    """The config of a stage that reads the chain's own embed output: clipline's format whatever embeddings.* says
    about foreign vectors (only how much to read at a time carries over)."""
    own = stage_config(cfg, input, output)
    own.embeddings = EmbeddingsConfig(chunk_rows=cfg.embeddings.chunk_rows)
    return own


# ---- download counts -----------------------------------------------------------------------------------


def _new_download_counts(shards_dir: str, before: set[int]) -> dict[str, int]:
    """URLs and images of the download shards completed by this run (img2dataset stats files not there before)."""
    fs, root = fsspec.core.url_to_fs(shards_dir)
    urls = images = 0
    for n, shard in download_layout.completed(fs, root).items():
        if n not in before:
            s = download_layout.read_stats(fs, shard)
            urls += int(s.get("count", 0))
            images += int(s.get("successes", 0))
    return {"urls_downloaded": urls, "images_downloaded": images}


def _is_dir(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return bool(fs.isdir(path))


# ---- the chain -------------------------------------------------------------------------------------------


def exit_status(error: BaseException | None) -> int:
    """The exit code `clipline` gives for a stage outcome (see pipeline/cli/main.py)."""
    if error is None:
        return 0
    if isinstance(error, ConfigError):
        return 2
    if isinstance(error, KeyboardInterrupt):
        return 130
    return 1


def _run_stage(cfg: Config, stage: str, paths: ChainLayout, facts: dict[str, Any]) -> dict[str, Any]:
    from pipeline.dedup.stage import dedup
    from pipeline.download.stage import download
    from pipeline.embed.stage import embed
    from pipeline.index.stage import build

    if stage == "download":
        source = cfg.input
        if isinstance(source, str) and _is_dir(source):
            from pipeline.download.urllist import plan_input

            def check(url_list: str) -> None:
                plan_input(stage_config(cfg, url_list, paths.shards))

            facts.update(ingest_url_lists(source, paths, cfg.download.input_format, check))
            source = paths.url_lists
        before = set(download_layout.completed_at(paths.shards))
        result = download(stage_config(cfg, source, paths.shards))
        facts.update(_new_download_counts(paths.shards, before))
        return dict(result, **{k: v for k, v in facts.items() if k != "new_files"})
    if stage == "embed":
        return embed(stage_config(cfg, paths.shards, paths.embeddings))
    if stage == "index":
        return build(own_embeddings_config(cfg, paths.embeddings, paths.index))
    dcfg = own_embeddings_config(cfg, paths.embeddings, paths.dedup)
    if dcfg.dedup.materialize and not dcfg.dedup.shards:
        dcfg.dedup.shards = paths.shards
    return dedup(dcfg)


def run(cfg: Config, stages: tuple[str, ...] = STAGES, echo: bool = True) -> dict[str, Any]:
    """Run the chain under the output's lock; every stage skips work already committed, so a re-run only processes
    what is new. OUTPUT/summary.json records each stage's outcome, success or not."""
    from pipeline.core.lock import output_lock

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
            previous = read_json(self.path) or {}
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
            put_json(self.path, self.data)
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
