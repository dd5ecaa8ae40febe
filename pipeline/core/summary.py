"""Per-shard stats -> job summary (progress, telemetry and the end report are all read from the stats files)."""

from __future__ import annotations

import collections
from typing import Any, Iterable


class JobFailed(RuntimeError):
    """Some work failed for good; the job exits 1 after writing what it could."""

    def __init__(self, message: str, summary: dict[str, Any] | None = None):
        super().__init__(message)
        self.summary = summary or {}


def summarize_embed(
    stats: Iterable[dict[str, Any]], wall_seconds: float, skipped: int, failed: list[str]
) -> dict[str, Any]:
    status: collections.Counter[str] = collections.Counter()
    captions: collections.Counter[str] = collections.Counter()
    timings: collections.Counter[str] = collections.Counter()
    done = 0
    damaged = []
    for s in stats:
        done += 1
        status.update(s.get("status_counts", {}))
        captions.update(s.get("caption_status_counts", {}))
        timings.update(s.get("timings", {}))
        if s.get("read_error"):
            damaged.append(s["shard"])
    samples = sum(status.values())
    return {
        "shards_done": done,
        "shards_skipped": skipped,
        "shards_failed": len(failed),
        "failed_shards": failed,
        "damaged_shards": damaged,
        "samples": samples,
        "samples_ok": status.get("ok", 0),
        "samples_failed_by_reason": {k: v for k, v in sorted(status.items()) if k != "ok"},
        "captions_by_status": dict(sorted(captions.items())),
        "wall_seconds": round(wall_seconds, 2),
        "samples_per_second": round(samples / wall_seconds, 2) if wall_seconds > 0 else None,
        "time_split_seconds": {k: round(v, 2) for k, v in sorted(timings.items())},
    }


def format_summary(title: str, summary: dict[str, Any]) -> str:
    lines = [f"== {title} =="]
    for k, v in summary.items():
        if isinstance(v, dict):
            inner = ", ".join(f"{a}={b}" for a, b in v.items()) or "-"
            lines.append(f"  {k}: {inner}")
        elif isinstance(v, list):
            lines.append(f"  {k}: {', '.join(map(str, v)) if v else '-'}")
        else:
            lines.append(f"  {k}: {v}")
    return "\n".join(lines)
