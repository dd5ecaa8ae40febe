"""Acceptance run for the embed stage at size: 20 shards x 500 samples, SIGKILL twice at random moments, resume.

Usage: python bench/embed_kill_resume.py [--shards 20] [--per-shard 500] [--seed 0]
Prints whether the resumed output equals a clean run file for file, and whether every input sample appears
exactly once in the metadata. Uses the tiny random-weight model (this checks the protocol, not the model).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.embeddings.layout import committed_shards  # noqa: E402
from tests.support.helpers import make_shards, make_tiny_checkpoint, overrides  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory(prefix="clipline-kill-") as tmp:
        work = Path(tmp)
        make_shards(work / "in", a.shards, a.per_shard)
        model = overrides(make_tiny_checkpoint(work / "model"))

        def cmd(out: Path) -> list[str]:
            return [
                sys.executable,
                "-m",
                "pipeline.cli",
                "embed",
                f"input={work}/in",
                f"output={out}",
                *model,
                "log_level=WARNING",
            ]

        t0 = time.perf_counter()
        subprocess.run(cmd(work / "clean"), check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        clean_s = time.perf_counter() - t0
        out = work / "killed"
        for i in range(2):
            p = subprocess.Popen(
                cmd(out), cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            # Kill when a random number of further shards has committed, plus a random fraction of a shard's time,
            # so every kill lands mid-job whatever the machine's speed.
            have = len(committed_shards(str(out), include_empty=True))
            target = rng.randint(have + 1, max(have + 1, a.shards - 5))
            start = time.perf_counter()
            while len(committed_shards(str(out), include_empty=True)) < target and p.poll() is None:
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 0.5 * clean_s / a.shards))
            delay = time.perf_counter() - start
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            print(f"kill {i + 1} after {delay:.1f}s: {len(committed_shards(str(out)))} shards committed", flush=True)
        r = subprocess.run(cmd(out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        print(f"resume exit code {r.returncode}")
        files = sorted(
            p.relative_to(work / "clean")
            for sub in ("img_emb", "text_emb", "metadata")
            for p in (work / "clean" / sub).iterdir()
        )
        same = all(
            (out / f).exists()
            and (
                filecmp.cmp(out / f, work / "clean" / f, shallow=False)
                if f.suffix == ".npy"
                else pd.read_parquet(out / f).equals(pd.read_parquet(work / "clean" / f))
            )
            for f in files
        )
        meta = pd.concat(pd.read_parquet(p) for p in sorted((out / "metadata").glob("*.parquet")))
        expected = {f"{s:05d}{i:04d}" for s in range(a.shards) for i in range(a.per_shard)}
        leftovers = [p for p in out.rglob("*") if ".tmp-" in p.name]
        print(f"clean run {clean_s:.1f}s for {len(expected)} samples")
        print(f"resumed output equals clean run: {same} ({len(files)} files)")
        print(
            f"every sample exactly once: {meta['key'].is_unique and set(meta['key']) == expected} "
            f"({len(meta)} rows, {len(expected)} expected)"
        )
        print(f"temporary files left: {len(leftovers)}")


if __name__ == "__main__":
    main()
