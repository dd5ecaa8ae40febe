"""Per-shard stats -> the embed job summary (progress, telemetry and the end report all read the stats files)."""

from __future__ import annotations

import collections
from typing import Any, Iterable


def summarize_embed(
    stats: Iterable[dict[str, Any]], wall_seconds: float, skipped: int, failed: list[str], driver_retries: int = 0
) -> dict[str, Any]:
    """The job summary from this run's shard stats; `storage_retries` adds the workers' object-store retries (of the
    attempts that succeeded) to the driver's own (`driver_retries`)."""
    status: collections.Counter[str] = collections.Counter()
    captions: collections.Counter[str] = collections.Counter()
    timings: collections.Counter[str] = collections.Counter()
    done = 0
    retries = driver_retries
    damaged = []
    for s in stats:
        done += 1
        status.update(s.get("status_counts", {}))
        captions.update(s.get("caption_status_counts", {}))
        timings.update(s.get("timings", {}))
        retries += s.get("storage_retries", 0)  # absent from stats answered by the committed probe
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
        "storage_retries": retries,
    }
