"""Build time, recall and query latency of `clipline index` on generated embeddings.

Usage: python bench/bench_index.py [--n 200000] [--dim 512] [--per-shard 10000] [--clusters 0]
                                   [--budget 4G] [--index-key KEY] [--queries 1000] [--cores N] [--data DIR]

The data is written once (reused when present) with the real embed writer: unit vectors, isotropic random by
default (the worst case for approximate search: no structure to exploit), or with --clusters N drawn around N
random centres, closer to real CLIP embeddings. The index stage then runs in this process (autofaiss chooses the
index within --budget unless --index-key is given) and reports its summary: build seconds, recall@10/@100 against
exact search, single-query latency. Finally the index is opened the way `clipline query` opens it (memory-mapped)
and --queries single-vector searches (k=10) are timed, plus one batch of them.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def generate(root: Path, n: int, dim: int, per_shard: int, clusters: int, seed: int = 0) -> None:
    from pipeline.embed.batch import OK, EmbeddedBatch, SampleRow
    from pipeline.embed.writer import ShardWriter, check_or_write_manifest, update_manifest
    from pipeline.embeddings.layout import committed_shards, new_manifest

    n_shards = -(-n // per_shard)
    if len(committed_shards(str(root))) == n_shards:
        return
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(clusters, 1), dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    check_or_write_manifest(str(root), new_manifest({"arch": "bench"}, {"arch": "bench"}))
    for s in range(n_shards):
        sid = f"{s:05d}"
        m = min(per_shard, n - s * per_shard)
        x = rng.standard_normal((m, dim)).astype(np.float32)
        if clusters:
            # Unit noise scaled so a vector keeps cosine ~0.6 with its centre, like CLIP images of one concept.
            x = centres[rng.integers(0, clusters, m)] + x * (1.3 / np.sqrt(dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        t = rng.standard_normal((m, dim)).astype(np.float32) * (1.0 / np.sqrt(dim)) + x
        t /= np.linalg.norm(t, axis=1, keepdims=True)
        rows = [
            SampleRow(
                key=f"{sid}{i:05d}",
                index=i,
                caption=f"caption {i}",
                url=f"http://b/{sid}/{i}",
                sha256=None,
                width=64,
                height=64,
                status=OK,
                error=None,
                caption_status=OK,
            )
            for i in range(m)
        ]
        w = ShardWriter(str(root), sid, dim, "float16")
        w.write(EmbeddedBatch(sid, rows, x, t))
        w.close({"shard": sid, "samples": m, "ok": m, "status_counts": {OK: m}, "dim": dim})
    update_manifest(str(root), dim=dim)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--per-shard", type=int, default=10_000)
    p.add_argument("--clusters", type=int, default=0, help="0 = isotropic random unit vectors")
    p.add_argument("--budget", default="4G", help="index.max_index_memory_usage")
    p.add_argument("--memory", default="16G", help="index.current_memory_available")
    p.add_argument("--index-key", default=None)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--cores", type=int, default=None, help="index.nb_cores (faiss threads); default all")
    p.add_argument("--data", default="/tmp/clipline-bench-index")
    args = p.parse_args()

    from pipeline.core.config import load_config
    from pipeline.core.logs import setup_logging
    from pipeline.index.stage import build
    from pipeline.query.search import Searcher

    setup_logging("WARNING")
    data = Path(args.data) / f"n{args.n}-d{args.dim}-c{args.clusters}"
    t0 = time.perf_counter()
    generate(data, args.n, args.dim, args.per_shard, args.clusters)
    print(f"data: {data} ({time.perf_counter() - t0:.1f}s)", flush=True)
    out = data / "index"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(
        [
            f"input={data}",
            f"output={out}",
            "index.modalities=[image]",
            f"index.max_index_memory_usage={args.budget}",
            f"index.current_memory_available={args.memory}",
            f"index.recall_queries={args.queries}",
        ]
    )
    cfg.index.index_key = args.index_key
    cfg.index.nb_cores = args.cores
    t0 = time.perf_counter()
    summary = build(cfg)
    build_s = time.perf_counter() - t0
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6

    searcher = Searcher(str(out), "image")
    q = np.random.default_rng(7).standard_normal((args.queries, args.dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    times = []
    for v in q:
        t = time.perf_counter()
        searcher.search_vectors(v[None], k=10)
        times.append((time.perf_counter() - t) * 1000)
    t = time.perf_counter()
    searcher.search_vectors(q, k=10)
    batch_ms = (time.perf_counter() - t) * 1000
    result = {
        "n": args.n,
        "dim": args.dim,
        "clusters": args.clusters,
        "budget": args.budget,
        "cores": args.cores,
        "build_seconds": round(build_s, 1),
        "peak_rss_gb": round(rss_gb, 2),
        "index": summary["image"],
        "searcher_mmap_single_query_ms": {
            "avg": round(float(np.mean(times)), 3),
            "p50": round(float(np.percentile(times, 50)), 3),
            "p99": round(float(np.percentile(times, 99)), 3),
        },
        "searcher_batch_ms_per_query": round(batch_ms / len(q), 3),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
