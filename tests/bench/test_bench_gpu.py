"""bench/bench_gpu.py runs here on the CPU (tiny model, a few batches) and prints every figure it promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

NUMBER = r"-?[\d.]+"


@pytest.mark.slow
def test_bench_gpu_prints_every_figure_on_the_cpu(repo_root: Path) -> None:
    cmd = [sys.executable, "bench/bench_gpu.py", "--models", "tiny", "--shards", "1", "--per-shard", "24",
           "--batch", "8", "--bare-seconds", "0.5"]  # fmt: skip
    r = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert re.search(r"tiny fp32 on CPU \(\d+ cores\), batch 8, 24 samples", out), out
    bare = re.search(rf"bare model\s+({NUMBER}) images/s per CPU", out)
    assert bare and float(bare.group(1)) > 0, out
    for label in ("host decode", "device decode"):
        line = next((x for x in out.splitlines() if f"embed, {label}" in x), "")
        m = re.search(
            rf"({NUMBER}) samples/s \(({NUMBER}) per CPU; ({NUMBER})/s over the whole command\)\s+ratio to bare "
            rf"({NUMBER})\s+CPU cores busy ({NUMBER})\s+GPU memory peak n/a \(CPU run; largest worker RSS "
            rf"({NUMBER}) MiB\)",
            line,
        )
        assert m, line or out
        rate, per, whole, ratio, cores, rss = (float(g) for g in m.groups())
        assert rate > 0 and per == rate and 0 < whole <= rate and ratio > 0 and cores > 0 and rss > 50
    assert "[24 decoded on the device]" in out  # plain JPEGs took the device path (the CPU device here)
