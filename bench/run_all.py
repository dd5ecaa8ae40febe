"""Run every benchmark in turn and print their figures (make bench). Benchmarks are not tests: nothing asserts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = [
    ["bench_embed.py"],
    ["bench_index.py"],
    ["bench_dedup.py"],
    ["download_1000.py"],
    ["compare_tools.py"],  # embed vs clip-retrieval needs CLIP_RETRIEVAL_PYTHON (see its docstring), else skipped
]

if __name__ == "__main__":
    failed = 0
    for args in BENCHES:
        print(f"\n######## {' '.join(args)}", flush=True)
        failed += subprocess.run([sys.executable, str(HERE / args[0]), *args[1:]]).returncode != 0
    sys.exit(1 if failed else 0)
