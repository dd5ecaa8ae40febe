"""bench/bench_input.py runs end to end on a tiny model and prints every figure it promises (no timing asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_bench_input_prints_every_figure(repo_root: Path) -> None:
    cmd = [sys.executable, "bench/bench_input.py", "--arch", "tiny", "--small", "24", "--large", "3", "--reps", "1",
           "--batch", "8", "--cosine-samples", "4"]  # fmt: skip
    r = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    for kind in ("256px", "2000px"):
        for cand in ("open_clip", "clipline model", "clipline uint8"):
            assert re.search(rf"{kind}\s+{cand}\s+[\d.]+/s .* x[\d.]+ open_clip", out), (kind, cand, out)
        assert re.search(rf"{kind}\s+uint8 / open_clip per core: [\d.]+", out)
    for name in ("256px", "2000px", "fallbacks"):
        m = re.search(rf"  {name}\s+n=\s*\d+\s+min ([\d.]+)", out)
        assert m and 0.99 <= float(m.group(1)) <= 1.0001, out  # the tiny model: cosine of the uint8 path
    assert re.search(
        r"per-sample Python overhead of the uint8 hot loop .*: \d+ us of \d+ us .* ~-?\d+ us hold the GIL", out
    )
    for workers in ("1 thread", "2 threads", "2 processes"):
        assert re.search(rf"{workers}\s+[\d.]+ samples/wall-s\s+[\d.]+ samples/CPU-s", out), out
