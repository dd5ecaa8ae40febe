"""The sections of `clipline report` made from the stages' own records: counts and failures, throughput and time split, the
CLIP score distribution, nearest-neighbour similarity against the dedup threshold, and duplicate groups as
thumbnails; each takes a RunOutput and returns HTML."""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.download.layout import classify_error
from pipeline.report.plots import (
    esc,
    figure,
    grid,
    missing,
    plot_hist,
    plot_reasons,
    plot_throughput,
    plot_time_split,
    table,
    tile,
)

if TYPE_CHECKING:
    from pipeline.report.runoutput import RunOutput


GROUPS_SHOWN, MEMBERS_SHOWN = 6, 8
CLIP_SCORE_SHARDS = 200  # metadata shards read for the score histogram


def section_throughput(out: RunOutput) -> str:
    dl = [
        (s["start_time"], s["end_time"], int(s.get("count", 0)))
        for s in out.download_stats.values()
        if "start_time" in s and "end_time" in s
    ]
    em = [
        (s["started"], s["finished"], int(s.get("samples", 0)))
        for s in out.embed_stats
        if "started" in s and "finished" in s
    ]
    if not dl and not em:
        return missing("No per-shard stats with timestamps: neither download nor embed ran here.")
    rows = []
    for stage, shards in (("download (URLs)", dl), ("embed (samples)", em)):
        if shards:
            wall = max(f for _, f, _ in shards) - min(s for s, _, _ in shards)
            n = sum(c for _, _, c in shards)
            rows.append((stage, len(shards), n, round(wall, 2), round(n / wall, 1) if wall > 0 else None))
    timings: collections.Counter[str] = collections.Counter()
    for s in out.embed_stats:
        timings.update(s.get("timings", {}))
    split = figure(plot_time_split(dict(timings)), "embed time split") if timings else missing("No embed timings.")
    return (
        table(rows, ["stage", "shards", "items", "wall seconds (first start to last finish)", "items / s"])
        + figure(plot_throughput({"download": dl, "embed": em}), "throughput over time")
        + split
    )


def section_clip_score(out: RunOutput) -> str:
    subset = out.sample_shards(CLIP_SCORE_SHARDS)
    meta = out.embedded_both(["clip_score"], subset)
    if meta is None:
        return missing("No embed output: no CLIP scores.")
    s = pd.to_numeric(meta["clip_score"], errors="coerce").dropna().to_numpy(np.float64)
    if len(s) == 0:
        return missing("No sample has both an image and a caption embedding: no CLIP scores.")
    q = np.percentile(s, [5, 25, 50, 75, 95])
    scope = "" if len(subset) == len(out.shards) else f" ({len(subset)} of {len(out.shards)} shards)"
    numbers = table(
        [("samples scored", len(s)), ("mean", float(s.mean()))]
        + [(f"p{p}", float(v)) for p, v in zip((5, 25, 50, 75, 95), q)],
        ["clip_score", ""],
    )
    plot = plot_hist(s, "cosine(image, caption)", "CLIP score distribution" + scope)
    return numbers + figure(plot, "clip score histogram")


def section_similarity(out: RunOutput) -> str:
    ds = out.dedup_summary
    if not out.shards:
        return missing("No embed output: no similarities.")
    sims = out.nn_similarities()
    threshold = ds["threshold"] if ds else None
    head = (
        table(
            [
                (k, ds.get(k))
                for k in (
                    "method",
                    "threshold",
                    "samples",
                    "groups",
                    "samples_in_groups",
                    "near_pairs",
                    "exact_pairs",
                    "kept",
                    "dropped",
                )
            ],
            ["dedup", ""],
        )
        if ds
        else missing("No dedup output (embeddings/dedup/summary.json): the threshold is not shown.")
    )
    exact = out.nn_exact()
    how = f"{len(sims)} of {out.embedded} embedded images, each with its nearest other image: " + (
        "exact search over all of them." if exact else "approximate, searched in the image index."
    )
    title = "Nearest-neighbour similarity" + ("" if exact else ", approximate (image index)")
    plot = plot_hist(sims, "cosine similarity to the nearest other image", title, threshold, log_y=True)
    return head + f"<p>{esc(how)}</p>" + figure(plot, "nearest-neighbour similarity")


def section_groups(out: RunOutput) -> str:
    dup = out.duplicates()
    if dup is None:
        return missing("No dedup output (embeddings/dedup/duplicates.parquet).")
    if dup.empty:
        return "<p>No duplicate groups at this threshold.</p>"
    sizes = dup.groupby("group_id").size().sort_values(ascending=False, kind="stable")
    chosen = dup[dup["group_id"].isin(sizes.index[:GROUPS_SHOWN])]
    chosen = chosen.sort_values(["group_id", "kept", "similarity"], ascending=[True, False, False])
    chosen = chosen.groupby("group_id").head(MEMBERS_SHOWN)
    thumbs = out.thumbnails(zip(chosen["shard"], chosen["key"]))
    parts = [
        f"<p>{len(sizes)} groups, {len(dup)} samples in groups; the {min(GROUPS_SHOWN, len(sizes))} largest "
        "(similarity is to the kept sample, green).</p>"
    ]
    for gid in sizes.index[:GROUPS_SHOWN]:
        g = chosen[chosen["group_id"] == gid]
        tiles = [
            tile(
                thumbs.get((str(r.shard), str(r.key))),
                [str(r.key), "kept" if r.kept else f"{r.similarity:.3f} ({r.reason})"],
                "kept" if r.kept else "",
            )
            for r in g.itertuples()
        ]
        parts.append(grid(f"group {gid}: {sizes[gid]} samples", tiles))
    return "".join(parts)


def section_counts(out: RunOutput) -> str:
    """From the per-shard stats files only, so it stays cheap on any dataset size."""
    parts, reasons = [], {}
    if not out.download_stats:
        parts.append(missing("No download output (shards/*_stats.json): the download stage did not run here."))
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
            table(
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
        parts.append(missing("No embed output (embeddings/manifest.json and committed shards): not embedded yet."))
    else:
        status: collections.Counter[str] = collections.Counter()
        captions: collections.Counter[str] = collections.Counter()
        for s in out.embed_stats:
            status.update(s.get("status_counts", {}))
            captions.update(s.get("caption_status_counts", {}))
        reasons["embed"] = {k: v for k, v in status.most_common() if k != "ok"}
        n = sum(status.values())
        parts.append(
            table(
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
            table(
                [(stage, r, n) for stage, by_reason in reasons.items() for r, n in by_reason.items()]
                or [("-", "none", 0)],
                ["stage", "failure reason", "samples"],
            )
        )
    parts.append(figure(plot_reasons(reasons), "failures by reason") if any(reasons.values()) else "")
    return "".join(parts)
