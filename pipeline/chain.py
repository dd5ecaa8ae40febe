"""`clipline run`: the whole chain download -> embed -> index -> dedup from one config, each stage resumable."""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from typing import Any

from pipeline.config import Config, require
from pipeline.summary import format_summary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChainLayout:
    """Where each stage of a chain run reads and writes, under one output root."""

    shards: str
    embeddings: str
    index: str
    dedup: str


def layout(output: str) -> ChainLayout:
    root = output.rstrip("/")
    emb = posixpath.join(root, "embeddings")
    return ChainLayout(
        shards=posixpath.join(root, "shards"),
        embeddings=emb,
        index=posixpath.join(emb, "index"),
        dedup=posixpath.join(emb, "dedup"),
    )


def stage_config(cfg: Config, input: Any, output: str) -> Config:
    return cfg.model_copy(update={"input": input, "output": output}, deep=True)


def run(cfg: Config, stages: tuple[str, ...] = ("download", "embed", "index", "dedup"), echo: bool = True) -> dict[str, Any]:
    """Run the chain; every stage skips work already committed, so a re-run only processes what is new."""
    from pipeline.dedup import dedup
    from pipeline.download import download
    from pipeline.embed import embed
    from pipeline.index import build

    require(cfg, "input", "output")
    paths = layout(str(cfg.output))
    out: dict[str, Any] = {}
    if "download" in stages:
        out["download"] = download(stage_config(cfg, cfg.input, paths.shards))
        _echo(echo, "download", out["download"])
    if "embed" in stages:
        out["embed"] = embed(stage_config(cfg, paths.shards, paths.embeddings))
        _echo(echo, "embed", out["embed"])
    if "index" in stages:
        out["index"] = build(stage_config(cfg, paths.embeddings, paths.index))
        _echo(echo, "index", out["index"])
    if "dedup" in stages:
        dcfg = stage_config(cfg, paths.embeddings, paths.dedup)
        if dcfg.dedup.materialize and not dcfg.dedup.shards:
            dcfg.dedup.shards = paths.shards
        out["dedup"] = dedup(dcfg)
        _echo(echo, "dedup", out["dedup"])
    return {stage: _headline(s) for stage, s in out.items()}


def _headline(summary: Any) -> Any:
    if not isinstance(summary, dict):
        return summary
    return {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}


def _echo(echo: bool, title: str, summary: Any) -> None:
    if echo and isinstance(summary, dict):
        print(format_summary(title, summary), flush=True)
