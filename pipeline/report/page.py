"""`clipline report`: one self-contained HTML page about a chain or demo output (counts and failures, throughput, score
and similarity distributions, duplicate groups and query results as thumbnails, index quality, provenance), read
through RunOutput (pipeline/report/runoutput.py)."""

from __future__ import annotations

import json
import logging
import posixpath
import time
from typing import Callable

import fsspec

from pipeline.core.config import Config, require
from pipeline.core.errors import ConfigError, JobFailed
from pipeline.core.fsio import put_bytes
from pipeline.report import plots as rp
from pipeline.report import sections as sec
from pipeline.report.runoutput import RunOutput

log = logging.getLogger(__name__)

QUERIES_SAMPLED, HITS_SHOWN = 3, 6
REPORT_FILE = "report.html"  # in the output folder, which defaults to the output root reported on


# ---- sections ----------------------------------------------------------------------------------------------


def section_queries(out: RunOutput, queries: list[str] | None) -> str:
    from pipeline.query.search import Searcher

    if out.index_info("image") is None:
        return rp.missing("No image index (embeddings/index/image.json): no text queries.")
    sampled = not queries
    if sampled:
        meta = out.embedded_both(["caption"], out.sample_shards(5))
        assert meta is not None
        caps = meta["caption"].dropna().drop_duplicates()
        queries = caps.sample(min(QUERIES_SAMPLED, len(caps)), random_state=0).tolist()
    searcher = Searcher(out.paths.index, "image")
    try:
        hits = searcher.search_text(list(queries or []), k=HITS_SHOWN)
    except Exception as e:  # the model may be unavailable here (weights not cached): say so, keep the report
        return rp.missing(
            f"The model recorded in the manifest could not be loaded to embed queries: {type(e).__name__}: {e}"
        )
    thumbs = out.thumbnails(zip(hits["shard"], hits["key"]))
    note = (
        "<p>Queries are captions sampled from the data; green marks a hit with exactly that caption.</p>"
        if sampled
        else ""
    )
    parts = [note]
    for q, g in hits.groupby("query", sort=False):
        tiles = [
            rp.tile(
                thumbs.get((str(r.shard), str(r.key))),
                [f"#{r.rank}  {r.score:.3f}", str(r.caption)[:60]],
                "hit" if sampled and r.caption == q else "",
            )
            for r in g.itertuples()
        ]
        parts.append(rp.grid(f"“{q}”", tiles))
    return "".join(parts)


def section_index(out: RunOutput) -> str:
    rows = []
    for m in ("image", "text"):
        info = out.index_info(m)
        if info is None:
            continue
        q = info.get("quality", {})
        hist = ", ".join(
            f"{h['action']} {time.strftime('%Y-%m-%d %H:%M', time.localtime(h['time']))}"
            for h in info.get("history", [])
        )
        rows.append(
            (
                m,
                info.get("index_key"),
                info.get("ntotal"),
                info.get("dim"),
                round(info.get("size_bytes", 0) / 1e6, 3),
                q.get("recall@10"),
                q.get("recall@100"),
                q.get("cross_modal_recall@10"),
                q.get("avg_latency_ms"),
                q.get("p99_latency_ms"),
                len(info.get("shards", [])),
                hist,
            )
        )
    if not rows:
        return rp.missing("No index output (embeddings/index/*.json).")
    return rp.table(
        rows,
        [
            "index",
            "type",
            "vectors",
            "dim",
            "size MB",
            "recall@10",
            "recall@100",
            "cross-modal recall@10",
            "avg latency ms",
            "p99 latency ms",
            "shards",
            "history",
        ],
    )


def section_provenance(out: RunOutput) -> str:
    parts = []
    m = out.manifest
    if m:
        parts.append(
            rp.table(
                [
                    ("model", json.dumps(m.get("model"), sort_keys=True)[:400]),
                    ("model config", json.dumps(m.get("model_config"), sort_keys=True)),
                    ("dim", m.get("dim")),
                    ("stored dtype", m.get("output_dtype")),
                    ("format version", m.get("format_version")),
                ],
                ["embeddings", ""],
            )
        )
    else:
        parts.append(rp.missing("No embed manifest: model unknown."))
    s = out.summary
    if s:
        parts.append(
            rp.table(
                [
                    (
                        k,
                        v.get("status"),
                        v.get("exit_status"),
                        v.get("seconds"),
                        _when(v.get("finished")),
                        v.get("error") or "",
                    )
                    for k, v in s.get("stages", {}).items()
                ],
                ["stage (summary.json)", "status", "exit", "seconds", "finished", "error"],
            )
        )
    inputs = out.read_json(out.paths.inputs) if out.paths.inputs else None
    if inputs:
        parts.append(
            rp.table(
                [(e["name"], e["staged"], e["size"], _when(e["added"])) for e in inputs["files"]],
                ["URL list", "staged as", "bytes", "added"],
            )
        )
    r = out.run_info
    if r:
        parts.append(
            rp.table(
                [
                    ("command", r.get("command")),
                    ("argv", " ".join(map(str, r.get("argv", [])))),
                    ("host", r.get("host")),
                    ("started", _when(r.get("start_time"))),
                    ("ended", _when(r.get("end_time"))),
                    ("exit status", r.get("exit_status")),
                ],
                ["last run (run.json)", ""],
            )
        )
        parts.append(rp.table(sorted((r.get("versions") or {}).items()), ["library", "version"]))
        parts.append(
            "<details><summary>resolved configuration</summary><pre>"
            + rp.esc(json.dumps(r.get("config"), indent=1))
            + "</pre></details>"
        )
    else:
        parts.append(rp.missing("No run.json: command, versions and configuration unknown."))
    return "".join(parts)


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


# ---- the page ----------------------------------------------------------------------------------------------


def sections(queries: list[str] | None) -> list[tuple[str, str, Callable[[RunOutput], str]]]:
    """(anchor, title, renderer) of every section, in page order."""
    return [
        ("counts", "Samples in, embedded, failed", sec.section_counts),
        ("throughput", "Throughput and time split", sec.section_throughput),
        ("clip-score", "CLIP score distribution", sec.section_clip_score),
        ("similarity", "Nearest-neighbour similarity and dedup", sec.section_similarity),
        ("groups", "Example duplicate groups", sec.section_groups),
        ("queries", "Example text queries", lambda out: section_queries(out, queries)),
        ("index", "Index", section_index),
        ("provenance", "Provenance", section_provenance),
    ]


def render(out: RunOutput, queries: list[str] | None = None) -> tuple[str, dict[str, str]]:
    """The HTML page and each section's state: ok, partial (some of its inputs are missing), missing, or the error
    that stopped it."""
    body, state = [], {}
    for anchor, title, fn in sections(queries):
        try:
            content = fn(out)
            has_data = any(tag in content for tag in ("<table", "<img", "<figure"))
            gaps = 'class="missing"' in content
            state[anchor] = ("partial" if gaps else "ok") if has_data else "missing"
        except Exception as e:  # one broken part must not hide the others; report_cli still fails the job
            log.exception("report section %s failed", anchor)
            content = f'<p class="error">This section failed: {rp.esc(type(e).__name__)}: {rp.esc(e)}</p>'
            state[anchor] = f"error: {type(e).__name__}: {e}"
        body.append(f'<section id="{anchor}"><h2>{rp.esc(title)}</h2>{content}</section>')
    nav = " ".join(f'<a href="#{a}">{rp.esc(t)}</a>' for a, t, _ in sections(queries))
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>clipline report: {rp.esc(out.root)}</title>"
        f"<style>{rp.CSS}</style></head><body><h1>clipline report</h1><p>{rp.esc(out.root)} · generated "
        f"{_when(time.time())}</p><nav>{nav}</nav>{''.join(body)}</body></html>"
    )
    return page, state


def report_cli(cfg: Config, queries: list[str] | None = None) -> str:
    """`clipline report input=OUTPUT_ROOT [output=DIR] [--query TEXT]...`: write DIR/report.html (default
    OUTPUT_ROOT/report.html); returns what to print. Raises JobFailed when a section failed (the page is still
    written)."""
    require(cfg, "input")
    if not isinstance(cfg.input, str):
        raise ConfigError("input: expected one output folder (of clipline run or clipline demo)")
    out = RunOutput(cfg.input, cfg.embeddings)
    if not out.exists(out.root):
        raise ConfigError(f"input: {cfg.input} does not exist")
    target = posixpath.join((cfg.output or out.root).rstrip("/"), REPORT_FILE)
    page, state = render(out, queries)
    fs, path = fsspec.core.url_to_fs(target)
    put_bytes(fs, path, page.encode())
    lines = [f"report: {target}"] + [f"  {a}: {s}" for a, s in state.items()]
    failed = [a for a, s in state.items() if s.startswith("error")]
    if failed:
        raise JobFailed(
            f"report sections failed: {', '.join(failed)} (the rest is in {target})",
            {"report": target, "failed_sections": failed},
        )
    return "\n".join(lines)
