"""`clipline report`: one self-contained HTML page about a chain or demo output (counts and failures, throughput, score
and similarity distributions, duplicate groups and query results as thumbnails, index quality, provenance), and
RunOutput, the read-only view of an output root that the report and the notebooks share."""

from __future__ import annotations

import collections
import functools
import json
import logging
import posixpath
import time
from collections.abc import Iterable
from typing import Any, Callable

import fsspec
import numpy as np
import pandas as pd

from pipeline import report_plots as rp
from pipeline.chain import ChainLayout, layout
from pipeline.config import Config, ConfigError, require
from pipeline.summary import JobFailed
from pipeline.writer import committed_shards, put_bytes, read_manifest, read_stats, shard_files

log = logging.getLogger(__name__)

NN_QUERIES = 2000
# Above this many vectors the nearest-neighbour histogram uses the image index instead of exact search.
EXACT_NN_MAX = 200_000
QUERIES_SAMPLED, HITS_SHOWN = 3, 6


class RunOutput:
    """A chain or demo output root (or a bare embed folder) opened for reading; every stage's part may be missing."""

    def __init__(self, root: str):
        self.root = str(root).rstrip("/")
        self.fs, _ = fsspec.core.url_to_fs(self.root)
        paths = layout(self.root)
        if not self.exists(paths.embeddings) and self.exists(posixpath.join(self.root, "manifest.json")):
            j = posixpath.join  # an embed output folder given directly
            paths = ChainLayout("", self.root, j(self.root, "index"), j(self.root, "dedup"), root=self.root)
        self.paths = paths

    def exists(self, path: str) -> bool:
        return bool(path) and bool(self.fs.exists(fsspec.core.url_to_fs(path)[1]))

    def read_json(self, path: str) -> dict[str, Any] | None:
        if not self.exists(path):
            return None
        with fsspec.open(path, "r") as f:
            return json.load(f)  # type: ignore[no-any-return]

    @functools.cached_property
    def run_info(self) -> dict[str, Any] | None:
        return self.read_json(posixpath.join(self.root, "run.json"))

    @functools.cached_property
    def summary(self) -> dict[str, Any] | None:
        return self.read_json(posixpath.join(self.root, "summary.json"))

    @functools.cached_property
    def manifest(self) -> dict[str, Any] | None:
        return read_manifest(self.paths.embeddings) if self.exists(self.paths.embeddings) else None

    @functools.cached_property
    def shards(self) -> list[str]:
        """Embed shards with data (committed)."""
        return committed_shards(self.paths.embeddings) if self.manifest else []

    @functools.cached_property
    def embed_stats(self) -> list[dict[str, Any]]:
        if not self.manifest:
            return []
        return [
            read_stats(self.paths.embeddings, s) for s in committed_shards(self.paths.embeddings, include_empty=True)
        ]

    @property
    def embedded(self) -> int:
        """Samples embedded (status ok), from the embed stats."""
        return sum(int(s.get("status_counts", {}).get("ok", 0)) for s in self.embed_stats)

    @functools.cached_property
    def download_stats(self) -> dict[str, dict[str, Any]]:
        """img2dataset's NNNNN_stats.json of every completed download shard."""
        from pipeline.download import STATS_RE

        if not self.exists(self.paths.shards):
            return {}
        out = {}
        for p in sorted(self.fs.ls(fsspec.core.url_to_fs(self.paths.shards)[1], detail=False)):
            if STATS_RE.match(posixpath.basename(p)):
                with self.fs.open(p, "r") as f:
                    out[posixpath.basename(p)[: -len("_stats.json")]] = json.load(f)
        return out

    def download_rows(self) -> pd.DataFrame | None:
        """status and error_message of every URL of the completed download shards."""
        if not self.download_stats:
            return None
        parts = []
        for sid in self.download_stats:
            with fsspec.open(posixpath.join(self.paths.shards, f"{sid}.parquet"), "rb") as f:
                parts.append(pd.read_parquet(f, columns=["status", "error_message"]))
        return pd.concat(parts, ignore_index=True)

    def metadata(
        self,
        columns: Iterable[str] = ("key", "shard", "index", "status", "caption", "url", "clip_score", "caption_status"),
        shards: list[str] | None = None,
    ) -> pd.DataFrame | None:
        """The embed metadata of the given committed shards (default all), in shard order."""
        if not self.shards:
            return None
        parts = []
        for s in self.shards if shards is None else shards:
            with fsspec.open(shard_files(self.paths.embeddings, s).metadata, "rb") as f:
                parts.append(pd.read_parquet(f, columns=list(columns)))
        return pd.concat(parts, ignore_index=True)

    def sample_shards(self, n: int) -> list[str]:
        """At most n committed shards spread evenly over all of them (what the report reads on big outputs)."""
        step = max(1, -(-len(self.shards) // max(n, 1)))
        return self.shards[::step]

    def image_vectors(self) -> tuple[np.ndarray, pd.DataFrame]:
        """Every embedded image vector (float32) with its metadata row; for notebooks on small outputs."""
        from pipeline.index_quality import read_shard

        xs, rows = [], []
        for s in self.shards:
            x, t = read_shard(self.paths.embeddings, s, "image")
            xs.append(np.asarray(x, np.float32))
            rows.append(t)
        if not xs:
            return np.zeros((0, 0), np.float32), pd.DataFrame()
        return np.concatenate(xs), pd.concat(rows, ignore_index=True)

    def nn_exact(self) -> bool:
        """Exact search while it is cheap (or there is no index); the image index beyond that."""
        return self.embedded <= EXACT_NN_MAX or self.index_info("image") is None

    def nn_similarities(self, max_queries: int = NN_QUERIES, seed: int = 0) -> np.ndarray:
        """Sampled samples' cosine similarity to their nearest other sample (every sample when there are at most
        max_queries): exact search over all embedded images, or on big outputs the image index, its top hit taken
        to be the query itself."""
        from pipeline.index_quality import exact_search, iter_vectors, sample_vectors

        if not self.nn_exact():
            from pipeline.search import Searcher

            q = np.ascontiguousarray(sample_vectors(self.paths.embeddings, self.shards, "image", max_queries, seed))
            sims, _ = Searcher(self.paths.index, "image").index.search(q, 2)
            return sims[:, 1].astype(np.float32)  # type: ignore[no-any-return]
        rate = min(1.0, max_queries / max(self.embedded, 1))
        rng = np.random.default_rng(seed)
        ids, queries, offset = [], [], 0
        for block in iter_vectors(self.paths.embeddings, self.shards, "image"):
            pick = np.flatnonzero(rng.random(len(block)) < rate) if rate < 1 else np.arange(len(block))
            ids.append(pick + offset)
            queries.append(np.asarray(block[pick], np.float32))
            offset += len(block)
        if not queries or offset < 2:
            return np.zeros(0, np.float32)
        own, q = np.concatenate(ids), np.ascontiguousarray(np.concatenate(queries))
        sims, found = exact_search(iter_vectors(self.paths.embeddings, self.shards, "image"), q, 2)
        other = np.where(found[:, 0] == own, 1, 0)  # skip the query itself, whichever rank it landed at
        return sims[np.arange(len(q)), other].astype(np.float32)  # type: ignore[no-any-return]

    @functools.cached_property
    def dedup_summary(self) -> dict[str, Any] | None:
        return self.read_json(posixpath.join(self.paths.dedup, "summary.json"))

    def duplicates(self) -> pd.DataFrame | None:
        path = posixpath.join(self.paths.dedup, "duplicates.parquet")
        if not self.exists(path):
            return None
        with fsspec.open(path, "rb") as f:
            return pd.read_parquet(f)

    def index_info(self, modality: str) -> dict[str, Any] | None:
        from pipeline.index import read_info

        return read_info(self.paths.index, modality) if self.exists(self.paths.index) else None

    def tar_of(self, shard: str) -> str | None:
        """The WebDataset tar an embed shard was read from (as its stats record it, else the chain's shards folder)."""
        recorded = next((s.get("input") for s in self.embed_stats if s.get("shard") == shard), None)
        for cand in (recorded, posixpath.join(self.paths.shards, f"{shard}.tar") if self.paths.shards else None):
            if isinstance(cand, str) and cand.endswith(".tar") and self.exists(cand):
                return cand
        return None

    def images(self, pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
        """Image bytes of (shard, key) samples, each tar streamed once."""
        by_shard: dict[str, set[str]] = collections.defaultdict(set)
        for shard, key in pairs:
            by_shard[str(shard)].add(str(key))
        out: dict[tuple[str, str], bytes] = {}
        for shard, keys in by_shard.items():
            tar = self.tar_of(shard)
            if tar is not None:
                out.update({(shard, k): b for k, b in rp.read_tar_images(tar, keys).items()})
        return out

    def thumbnails(self, pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str | None]:
        return {p: rp.thumbnail_uri(b) for p, b in self.images(pairs).items()}


# ---- sections ----------------------------------------------------------------------------------------------


def section_counts(out: RunOutput) -> str:
    """From the per-shard stats files only, so it stays cheap on any dataset size."""
    from pipeline.download import classify_error

    parts, reasons = [], {}
    if not out.download_stats:
        parts.append(rp.missing("No download output (shards/*_stats.json): the download stage did not run here."))
    else:
        dl = list(out.download_stats.values())
        urls, ok = sum(int(s.get("count", 0)) for s in dl), sum(int(s.get("successes", 0)) for s in dl)
        by: collections.Counter[str] = collections.Counter()
        for s in dl:
            for message, n in s.get("status_dict", {}).items():
                if message != "success":
                    by[classify_error(message)] += int(n)
        reasons["download"] = dict(by.most_common())
        parts.append(
            rp.table(
                [
                    ("URLs in", urls),
                    ("images downloaded", ok),
                    ("download failures", urls - ok),
                    ("download shards", len(dl)),
                ],
                ["download", ""],
            )
        )
    if not out.embed_stats:
        parts.append(rp.missing("No embed output (embeddings/manifest.json and committed shards): not embedded yet."))
    else:
        status: collections.Counter[str] = collections.Counter()
        captions: collections.Counter[str] = collections.Counter()
        for s in out.embed_stats:
            status.update(s.get("status_counts", {}))
            captions.update(s.get("caption_status_counts", {}))
        reasons["embed"] = {k: v for k, v in status.most_common() if k != "ok"}
        n = sum(status.values())
        parts.append(
            rp.table(
                [
                    ("samples read", n),
                    ("embedded", status.get("ok", 0)),
                    ("embed failures", n - status.get("ok", 0)),
                    ("captions ok / missing", f"{captions.get('ok', 0)} / {captions.get('missing', 0)}"),
                    ("embed shards", len(out.embed_stats)),
                ],
                ["embed", ""],
            )
        )
    if reasons:
        parts.append(
            rp.table(
                [(stage, r, n) for stage, by_reason in reasons.items() for r, n in by_reason.items()]
                or [("-", "none", 0)],
                ["stage", "failure reason", "samples"],
            )
        )
    parts.append(rp.figure(rp.plot_reasons(reasons), "failures by reason") if any(reasons.values()) else "")
    return "".join(parts)


def section_queries(out: RunOutput, queries: list[str] | None) -> str:
    from pipeline.search import Searcher

    if out.index_info("image") is None:
        return rp.missing("No image index (embeddings/index/image.json): no text queries.")
    sampled = not queries
    if sampled:
        meta = out.metadata(["status", "caption_status", "caption"], out.sample_shards(5))
        assert meta is not None
        caps = meta.loc[(meta["status"] == "ok") & (meta["caption_status"] == "ok"), "caption"].drop_duplicates()
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
        ("counts", "Samples in, embedded, failed", section_counts),
        ("throughput", "Throughput and time split", rp.section_throughput),
        ("clip-score", "CLIP score distribution", rp.section_clip_score),
        ("similarity", "Nearest-neighbour similarity and dedup", rp.section_similarity),
        ("groups", "Example duplicate groups", rp.section_groups),
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
    """`clipline report input=OUTPUT_ROOT [output=DIR] [--query TEXT]...`: write DIR/index.html (default
    OUTPUT_ROOT/report); returns what to print. Raises JobFailed when a section failed (the page is still written)."""
    require(cfg, "input")
    if not isinstance(cfg.input, str):
        raise ConfigError("input: expected one output folder (of clipline run or clipline demo)")
    out = RunOutput(cfg.input)
    if not out.exists(out.root):
        raise ConfigError(f"input: {cfg.input} does not exist")
    target = posixpath.join((cfg.output or posixpath.join(out.root, "report")).rstrip("/"), "index.html")
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
