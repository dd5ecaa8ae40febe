"""Time and peak memory of `clipline dedup` on generated embeddings (target: 1M x 512 float16 under 2 minutes and
4 GB per method).

Usage: python bench/bench_dedup.py [--n 1000000] [--dim 512] [--per-shard 10000] [--modes semdedup,ivf,exact]
                                   [--exact-n 100000] [--data /tmp/clipline-bench-dedup] [--timeout 1800]

The data is written once (reused when present) with the real embed writer: unit vectors with ~5% of rows in planted
near-duplicate groups (cosine 0.975-0.995 of a centre), 0.5% exact copies (same sha256, same vector) and 1%
distractors at 0.90-0.93. Each method runs the whole stage (search, grouping, outputs) in a fresh child process
that reports its wall time and peak RSS (getrusage ru_maxrss). Exact self-search of 1M vectors is over an hour of
CPU, so `--exact-n` times it on the first shards only (same files, linked) and extrapolates the n^2 search to the
full size, and the full-size exact run is stopped after --exact-full-s seconds to read its peak memory so far
(VmHWM); pass --exact-n 0 to run it to the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def generate(root: Path, n: int, dim: int, per_shard: int, seed: int = 0) -> None:
    from pipeline.embed.batch import OK, EmbeddedBatch, SampleRow
    from pipeline.embed.writer import ShardWriter, check_or_write_manifest, update_manifest
    from pipeline.embeddings.layout import committed_shards, new_manifest

    n_shards = -(-n // per_shard)
    if len(committed_shards(str(root))) == n_shards:
        return
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 60), dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    check_or_write_manifest(str(root), new_manifest({"arch": "bench"}, {"arch": "bench"}))
    t0 = time.perf_counter()
    for s in range(n_shards):
        m = min(per_shard, n - s * per_shard)
        x = rng.standard_normal((m, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        kind = rng.random(m)
        centre = rng.integers(0, len(centres), m)
        sha = [f"{s:05d}-{i}" for i in range(m)]
        for lo, hi, cos in ((0.0, 0.05, (0.975, 0.995)), (0.05, 0.055, (1.0, 1.0)), (0.055, 0.065, (0.90, 0.93))):
            rows = np.flatnonzero((kind >= lo) & (kind < hi))
            c = centres[centre[rows]]
            u = x[rows] - (x[rows] * c).sum(1, keepdims=True) * c
            u /= np.linalg.norm(u, axis=1, keepdims=True)
            a = rng.uniform(*cos, (len(rows), 1)).astype(np.float32)
            x[rows] = a * c + np.sqrt(1 - a * a) * u
            if cos == (1.0, 1.0):
                for r in rows:
                    sha[r] = f"copy-{centre[r]}"
        rows_meta = [
            SampleRow(
                key=f"{s:05d}{i:05d}",
                index=i,
                caption=None,
                url=f"http://b/{s}/{i}.jpg",
                sha256=sha[i],
                width=256,
                height=256,
                status=OK,
                error=None,
                caption_status="missing",
            )
            for i in range(m)
        ]
        w = ShardWriter(str(root), f"{s:05d}", dim, "float16")
        w.write(EmbeddedBatch(f"{s:05d}", rows_meta, x, np.zeros_like(x)))
        w.close({"shard": f"{s:05d}", "samples": m, "status_counts": {OK: m}, "dim": dim})
    update_manifest(str(root), dim=dim)
    print(f"generated {n} x {dim} in {n_shards} shards in {time.perf_counter() - t0:.0f}s", file=sys.stderr)


def subset(root: Path, n_shards: int) -> Path:
    """The first n_shards of root, as links (the same files), for a smaller exact run."""
    from pipeline.embeddings.layout import committed_shards, shard_files

    sub = root.parent / f"{root.name}-first{n_shards}"
    if len(committed_shards(str(sub))) == n_shards:
        return sub
    for sid in committed_shards(str(root))[:n_shards]:
        src, dst = shard_files(str(root), sid), shard_files(str(sub), sid)
        for f in ("img_emb", "metadata", "stats"):
            Path(getattr(dst, f)).parent.mkdir(parents=True, exist_ok=True)
            if not Path(getattr(dst, f)).exists():
                os.symlink(getattr(src, f), getattr(dst, f))
    (sub / "manifest.json").write_text((root / "manifest.json").read_text())
    return sub


def child(mode: str, data: str, out: str) -> None:
    import logging

    from pipeline.core.config import load_config
    from pipeline.dedup.stage import dedup

    logging.basicConfig(level="INFO", stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    s = dedup(load_config([f"input={data}", f"output={out}", f"dedup.mode={mode}"]))
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    keep = (
        "samples",
        "method",
        "groups",
        "dropped",
        "dropped_by_reason",
        "recall_estimate",
        "group_recall_estimate",
        "recall_sample_pairs",
        "search",
        "time_split_seconds",
    )
    print(
        json.dumps({"mode": mode, "wall_s": round(wall, 1), "peak_rss_mb": round(peak), **{k: s.get(k) for k in keep}})
    )


def _hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_child(mode: str, data: Path, timeout: float) -> dict:
    """The stage in a child process; on timeout, report the peak RSS it had reached (VmHWM) and stop it."""
    cmd = [sys.executable, __file__, "--child", mode, "--data", str(data), "--out", str(data) + f"-out-{mode}"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0, peak = time.perf_counter(), 0.0
    while p.poll() is None and time.perf_counter() - t0 < timeout:
        peak = max(peak, _hwm_mb(p.pid) or 0.0)
        time.sleep(1)
    if p.poll() is None:
        p.kill()
        p.wait()
        return {"mode": mode, "error": f"stopped after {timeout:.0f}s", "peak_rss_mb_so_far": round(peak)}
    out, err = p.communicate()
    if p.returncode != 0:
        return {"mode": mode, "error": err[-2000:]}
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--per-shard", type=int, default=10_000)
    ap.add_argument("--modes", default="semdedup,ivf,exact")
    ap.add_argument("--exact-n", type=int, default=100_000)
    ap.add_argument("--exact-full-s", type=float, default=180, help="also run exact on everything this long (0: no)")
    ap.add_argument("--data", default="/tmp/clipline-bench-dedup")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.data, args.out)
        return
    data = Path(args.data)
    generate(data, args.n, args.dim, args.per_shard)
    for mode in args.modes.split(","):
        target, n = data, args.n
        if mode == "exact" and 0 < args.exact_n < args.n:
            shards = max(1, args.exact_n // args.per_shard)
            target, n = subset(data, shards), shards * args.per_shard
            # and the full size, stopped after --exact-full-s: its peak memory (index built, search under way)
            if args.exact_full_s > 0:
                print(json.dumps({**run_child(mode, data, args.exact_full_s), "n": args.n}), flush=True)
        r = run_child(mode, target, args.timeout)
        r["n"] = n
        if n < args.n and "time_split_seconds" in r:
            search = r["time_split_seconds"].get("near_search", 0.0)
            r["extrapolated_search_s_at_full_n"] = round(search * (args.n / n) ** 2)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
