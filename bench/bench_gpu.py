"""Feeding the GPU: the bare image tower against end-to-end `clipline embed`, with host decode and device decode.

Usage: python bench/bench_gpu.py [--models ViT-B-32,ViT-L-14] [--samples N] [--batch B] [--precision P]

For each model (random weights, open_clip's own config), on every GPU the machine has (one embed worker process
per GPU, as `clipline embed` runs), or on the CPU when there is none:
  * bare model        images/s of open_clip's encode_image on device-resident batches (fp16 autocast on CUDA),
                      per GPU, and its memory peak
  * embed, host decode     `clipline embed` images only (embed.text=false): the uint8 pipeline, JPEGs decoded on
  * embed, device decode   the CPU, or by nvjpeg (embed.decode=device; torchvision's CPU decoder without a GPU)
    each: samples/s over the shards' span (first shard start to last shard end; the command's wall time, model
    load included, in brackets), per GPU, the ratio to the bare model, the CPU cores busy per GPU over that span
    (the whole process tree's CPU time, sampled from /proc), and the GPU memory peak (device-wide, polled; on the
    CPU the worker's peak RSS instead).
Inputs: generated img2dataset-like shards of 256-384 px JPEGs (bench_input.py's generator). Defaults: 12 shards
of 2048 samples per GPU, batch 256, fp16 on CUDA; on the CPU 2 shards of 96, batch 32, fp32 (fp16 autocast is a
GPU option). Nothing asserts: the figures are for a GPU machine; tests/bench/test_bench_gpu.py runs it here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from bench_embed import save_checkpoint  # noqa: E402  (bench scripts share their generators)
from bench_input import TINY, make_shard  # noqa: E402


def bare_model(arch: str, device: str, batch: int, precision: str, seconds: float) -> tuple[float, float | None]:
    """(images/s of model.encode_image on one device, memory peak in MiB on CUDA)."""
    import contextlib

    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None).eval().to(device)
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    cuda = device.startswith("cuda")
    fmt = torch.channels_last if cuda else torch.contiguous_format
    x = torch.randn(batch, 3, *size, device=device).contiguous(memory_format=fmt)
    if cuda:
        model.visual.to(memory_format=torch.channels_last)
        torch.cuda.reset_peak_memory_stats(device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    cast = torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    with torch.inference_mode(), cast:
        for _ in range(2):  # warm-up: cudnn/oneDNN kernel choice, allocator
            model.encode_image(x)
        sync()
        n, t0 = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - t0 < seconds:
            model.encode_image(x)
            n += batch
        sync()
        rate = n / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    del model, x
    if cuda:
        torch.cuda.empty_cache()
    return rate, peak


def _tree_usage(root: int) -> dict[int, tuple[float, float]]:
    """pid -> (CPU seconds, user + system; RSS in MiB) of a process and every live descendant, from /proc."""
    tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    parents: dict[int, int] = {}
    usage: dict[int, tuple[float, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # fields from the 3rd (state) on
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        usage[int(entry)] = ((int(fields[11]) + int(fields[12])) / tick, int(fields[21]) * page / 2**20)
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in usage:
            tree[pid] = usage[pid]
        todo.extend(p for p, pp in parents.items() if pp == pid)
    return tree


class Monitor:
    """Samples (time, CPU seconds of the process tree, GPU memory used per device) every `every` seconds, and the
    largest resident set among the tree's processes."""

    def __init__(self, pid: int, gpus: int, every: float = 0.2):
        self.pid, self.gpus, self.every = pid, gpus, every
        self.samples: list[tuple[float, float, list[float]]] = []
        self.rss_peak = 0.0
        self.base = self._gpu_used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _gpu_used(self) -> list[float]:
        import torch

        out = []
        for i in range(self.gpus):
            free, total = torch.cuda.mem_get_info(i)
            out.append((total - free) / 2**20)
        return out

    def _run(self) -> None:
        seen: dict[int, float] = {}  # a process that exited keeps its last CPU time: the sum never drops
        while not self._stop.is_set():
            tree = _tree_usage(self.pid)
            for pid, (cpu, rss) in tree.items():
                seen[pid] = max(seen.get(pid, 0.0), cpu)
                self.rss_peak = max(self.rss_peak, rss)
            self.samples.append((time.time(), sum(seen.values()), self._gpu_used()))
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_between(self, t0: float, t1: float) -> float:
        """CPU seconds of the tree between two wall times, interpolated between samples."""

        def at(t: float) -> float:
            s = self.samples
            if not s:
                return 0.0
            if t <= s[0][0]:
                return s[0][1]
            for (ta, ca, _), (tb, cb, _) in zip(s, s[1:]):
                if ta <= t <= tb:
                    return ca + (cb - ca) * (t - ta) / ((tb - ta) or 1.0)
            return s[-1][1]

        return at(t1) - at(t0)

    def gpu_peak(self) -> float:
        """Device-wide memory in use above the level before the run, max over samples and GPUs (MiB)."""
        peaks = [max(used[i] for _, _, used in self.samples) - self.base[i] for i in range(self.gpus)]
        return max(peaks) if peaks else 0.0


def run_embed(overrides: list[str], inp: str, out: Path, gpus: int) -> dict[str, Any]:
    """One `clipline embed` command in a child process, monitored; its figures from the monitor and the stats."""
    cmd = [sys.executable, "-m", "pipeline.cli", "embed", f"input={inp}", f"output={out}", *overrides]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mon = Monitor(proc.pid, gpus)
    stdout, stderr = proc.communicate()
    mon.stop()
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"clipline embed exited {proc.returncode}:\n{stderr[-3000:]}")
    stats = [json.loads(p.read_text()) for p in (out / "stats").glob("stats_*.json")]
    start, end = min(s["started"] for s in stats), max(s["finished"] for s in stats)
    samples = sum(s["samples"] for s in stats)
    span = end - start
    return {
        "samples": samples,
        "rate": samples / span,
        "wall_rate": samples / wall,
        "cores": mon.cpu_between(start, end) / span,
        "gpu_peak": mon.gpu_peak() if gpus else None,
        "rss_peak": mon.rss_peak,
        "device_decoded": sum(s.get("device_decoded", 0) for s in stats),
    }


def bench_model(args: argparse.Namespace, arch: str, work: Path, inp: str, gpus: int) -> None:
    import open_clip

    device = "cuda" if gpus else "cpu"
    config = TINY if arch == "tiny" else None
    name = "bench-tiny" if config else arch
    if config:
        open_clip.factory._MODEL_CONFIGS[name] = config
    ov = save_checkpoint(name, work / f"{name}.pt", config) + [
        f"model.device={device}",
        f"model.precision={args.precision}",
        f"embed.batch_size={args.batch}",
        "embed.text=false",
        "embed.output_dtype=float16",
        "embed.decode_priority=normal",  # auto's choice on a GPU; on the CPU, idle threads starve on a busy machine
        "log_level=WARNING",
    ]
    bare, bare_peak = bare_model(name, f"{device}:0" if gpus else "cpu", args.batch, args.precision, args.bare_seconds)
    where = f"{gpus} x {_gpu_name()}" if gpus else f"CPU ({os.cpu_count()} cores)"
    print(f"{arch} {args.precision} on {where}, batch {args.batch}, {args.samples_total} samples of 256-384 px JPEGs")
    mem = f", memory peak {bare_peak:.0f} MiB" if bare_peak is not None else ""
    print(f"  bare model             {bare:10.1f} images/s per {'GPU' if gpus else 'CPU'}{mem}", flush=True)
    unit = "GPU" if gpus else "CPU"
    for mode in ("cpu", "device"):
        label = "host decode" if mode == "cpu" else "device decode"
        runs = [
            run_embed(ov + [f"embed.decode={mode}"], inp, work / f"{name}-{mode}-{i}", gpus) for i in range(args.reps)
        ]
        r = sorted(runs, key=lambda x: x["rate"])[len(runs) // 2]
        per = r["rate"] / max(gpus, 1)
        if gpus:
            mem = f"GPU memory peak {r['gpu_peak']:.0f} MiB"
        else:
            mem = f"GPU memory peak n/a (CPU run; largest worker RSS {r['rss_peak']:.0f} MiB)"
        print(
            f"  embed, {label:13s}  {r['rate']:10.1f} samples/s ({per:.1f} per {unit}; {r['wall_rate']:.1f}/s over "
            f"the whole command)  ratio to bare {per / bare:.2f}  CPU cores busy "
            f"{'per GPU ' if gpus else ''}{r['cores'] / max(gpus, 1):.2f}  {mem}"
            + (f"  [{r['device_decoded']} decoded on the device]" if mode == "device" else ""),
            flush=True,
        )


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="ViT-B-32,ViT-L-14", help="comma-separated open_clip archs, or 'tiny'")
    ap.add_argument("--shards", type=int, default=0, help="input shards (0 = 12 per GPU, 2 on the CPU)")
    ap.add_argument("--per-shard", type=int, default=0, help="samples per shard (0 = 2048 on GPUs, 96 on the CPU)")
    ap.add_argument("--batch", type=int, default=0, help="embed.batch_size (0 = 256 on GPUs, 32 on the CPU)")
    ap.add_argument("--precision", default="", help="model.precision (default fp16 on GPUs, fp32 on the CPU)")
    ap.add_argument("--reps", type=int, default=1, help="embed runs per decode mode (the median is printed)")
    ap.add_argument("--bare-seconds", type=float, default=10.0, help="how long the bare model is timed")
    args = ap.parse_args()
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    args.shards = args.shards or (12 * gpus if gpus else 2)
    args.per_shard = args.per_shard or (2048 if gpus else 96)
    args.batch = args.batch or (256 if gpus else 32)
    args.precision = args.precision or ("fp16" if gpus else "fp32")
    args.samples_total = args.shards * args.per_shard
    print(f"machine: {os.cpu_count()} cores, {gpus} GPU(s), torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="clipline-bench-gpu-") as tmp:
        work = Path(tmp)
        (work / "in").mkdir()
        for s in range(args.shards):
            make_shard(work / "in" / f"{s:05d}.tar", "256px", args.per_shard, seed=100 + s)
        inp = str(work / "in" / f"{{00000..{args.shards - 1:05d}}}.tar")
        for arch in args.models.split(","):
            bench_model(args, arch.strip(), work, inp, gpus)


if __name__ == "__main__":
    main()
