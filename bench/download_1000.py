"""Benchmark `clipline download` on 1,000 loopback URLs (~5% bad: 404s and HTML served as .jpg).

    python bench/download_1000.py [--processes 2] [--threads 32] [--keep DIR]

Images are the demo dataset's real photos and variants (pipeline.run.demo_data), copied under 1,000 names
and served from 127.0.0.1; no network is used.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

N_URLS, N_404, N_HTML = 1000, 30, 20


def make_site(root: Path) -> list[str]:
    """1,000 URL paths: N_404 missing files, N_HTML HTML pages named .jpg, the rest real JPEGs."""
    from pipeline.run.demo_data import build_demo_dataset

    demo = build_demo_dataset(root / "demo")
    photos = sorted(
        p for p in demo.images_dir.glob("*.jpg") if p.name not in demo.truth["broken"] and p.stat().st_size > 0
    )
    site = root / "site"
    site.mkdir()
    missing = {7 + k * (N_URLS // N_404) for k in range(N_404)}
    html = {13 + k * (N_URLS // N_HTML) for k in range(N_HTML)}
    assert not missing & html
    names = []
    for i in range(N_URLS):
        name = f"{i:04d}.jpg"
        if i in missing:
            name = f"missing_{i:04d}.jpg"  # never written: 404
        elif i in html:
            (site / name).write_text("<!DOCTYPE html><html><body>moved</body></html>")
        else:
            shutil.copyfile(photos[i % len(photos)], site / name)
        names.append(name)
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--per-shard", type=int, default=250)
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temp folder, deleted)")
    args = ap.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.cli.main import main as clipline
    from pipeline.run.httpserver import serve_directory

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="clipline-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        names = make_site(root)
        with serve_directory(root / "site") as base:
            urls = [f"{base}/{n}" for n in names]
            url_list = root / "urls.parquet"
            pq.write_table(pa.table({"url": urls, "caption": [f"photo {n}" for n in names]}), url_list)
            out = root / "shards"
            t0 = time.perf_counter()
            rc = clipline(
                [
                    "download",
                    f"input={url_list}",
                    f"output={out}",
                    f"download.processes_count={args.processes}",
                    f"download.thread_count={args.threads}",
                    f"download.number_sample_per_shard={args.per_shard}",
                    "download.allow_private_addresses=true",  # the site is on 127.0.0.1
                    "log_level=WARNING",
                ]
            )
            wall = time.perf_counter() - t0
        from pipeline.core.runinfo import read_record

        record = read_record(str(out))
        assert record is not None, f"no run record under {out}"
        summary = record["summary"]
        rows = pa.concat_tables([pq.read_table(p, columns=["url", "status"]) for p in sorted(out.glob("*.parquet"))])
        seen = rows.column("url").to_pylist()
        stats = [json.loads(p.read_text()) for p in out.glob("*_stats.json")]
        span = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
        accounted = sorted(seen) == sorted(urls)
        print("\n== bench/download_1000 ==")
        print(f"exit code:            {rc}")
        print(f"URLs in:              {summary['urls_in']}  (planted: {N_404} x 404, {N_HTML} x HTML-as-jpg)")
        print(f"images written:       {summary['images_written']}")
        print(f"failures by reason:   {summary['failures_by_reason']}")
        print(
            f"every URL accounted:  {accounted and summary['unaccounted'] == 0} "
            f"(parquet rows {len(seen)}, distinct {len(set(seen))}, summary unaccounted {summary['unaccounted']})"
        )
        print(f"shards:               {summary['shards']}")
        print(
            f"throughput:           {summary['urls_per_second']} URLs/s over the stage "
            f"({summary['seconds']} s incl. img2dataset process start-up; wall {wall:.1f} s)"
        )
        print(
            f"in-shard throughput:  {sum(s['count'] for s in stats) / span:.0f} URLs/s "
            f"(first shard start to last shard end, {span:.1f} s, from img2dataset's stats files)"
        )
        print(f"settings:             processes={args.processes} threads={args.threads} cpus={os.cpu_count()}")
        return 0 if rc == 0 and accounted else 1
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # img2dataset spawns processes that re-import this file
    sys.exit(main())
