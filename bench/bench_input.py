"""Input pipeline throughput per CPU core: tar bytes -> model-ready image batch, the model replaced by a no-op.

Usage: python bench/bench_input.py [--small 256] [--large 48] [--reps 5] [--batch 64] [--arch ViT-B-32]
                                   [--skip-cosine] [--skip-overhead] [--skip-workers]

Two generated shards, img2dataset-like (jpg + json with sha256): 256-384 px JPEGs (short side 256) and 2,000 px
JPEGs (long side 2000, short 1100-1600), quality 90. Per shard, in one process, the candidates alternated within
every repeat (the order rotates), each timed by the process's CPU time with torch on one thread, so samples per
CPU-second is samples/s per core whatever else the machine runs; medians of the repeats:
  * open_clip       open_clip's preprocess on Pillow: Image.open + convert("RGB") + preprocess, torch.stack
  * clipline model  embed.preprocess=model: decode_image (Pillow, draft) + the model's preprocess (today's path)
  * clipline uint8  embed.preprocess=uint8: libjpeg-turbo at a reduced DCT scale, uint8 resize and crop, the
                    uint8 batch normalized on the model's device (the CPU here: that cost is counted)
and the ratio uint8 / open_clip (goal >= 2.0 on both kinds). Then:
  * cosine of the uint8 path's embeddings to open_clip's (the random-weight --arch model), per kind, and on the
    fallbacks (PNG, WebP, grayscale, CMYK, progressive and EXIF-rotated JPEGs);
  * the per-sample Python overhead of the uint8 hot loop: the same loop with the decode and resize kernels
    replaced by cached results (what is left holds the GIL: a thread pool's ceiling is 1 / overhead per process);
  * decode workers on the 256 px shard: 1 thread, 2 threads (the runner's pool) and 2 processes (uint8 batches
    pickled back), samples per wall-second and per CPU-second.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import statistics
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from bench_embed import photo_like, save_checkpoint  # noqa: E402  (bench scripts share their generators)

KINDS = ("256px", "2000px")
# A tiny open_clip config for smoke runs (`--arch tiny`, bench_gpu's `--models tiny`): the tests run them on it.
TINY = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}


def make_shard(path: Path, kind: str, n: int, seed: int) -> str:
    """img2dataset's members: key.jpg, key.json (url, key, sha256 of the bytes as img2dataset computes it)."""
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as t:
        for i in range(n):
            short, long = (
                (256, int(rng.integers(256, 385))) if kind == "256px" else (int(rng.integers(1100, 1600)), 2000)
            )
            w, h = (long, short) if i % 2 else (short, long)
            jpg = photo_like(rng, w, h)
            key = f"{i:09d}"
            meta = {"url": f"http://example.invalid/{key}.jpg", "key": key, "sha256": hashlib.sha256(jpg).hexdigest()}
            for ext, data in (("jpg", jpg), ("json", json.dumps(meta).encode())):
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
    return str(path)


_CHECKPOINTS: dict[str, list[str]] = {}  # arch -> its model.* overrides, saved once per run


def load(arch: str, work: Path, preprocess: str) -> tuple[Any, Any]:
    """The embed runner's own model and decoder for embed.preprocess=`preprocess` (images only)."""
    from pipeline.core.config import load_config
    from pipeline.embed.runner import get_model, make_decoder

    config = TINY if arch == "tiny" else None
    name = "bench-tiny" if config else arch
    if name not in _CHECKPOINTS:
        _CHECKPOINTS[name] = save_checkpoint(name, work / f"{name}.pt", config)
    cfg = load_config(_CHECKPOINTS[name] + ["embed.text=false", f"embed.preprocess={preprocess}"])
    model = get_model(cfg)  # also applies embed.reuse_memory as a CPU worker does
    return model, make_decoder(model, cfg.embed)


def raw_batches(shard: str, batch: int) -> list[list[Any]]:
    from pipeline.core.tasks import ShardTask
    from pipeline.embed.reader import iter_samples

    samples = list(iter_samples(ShardTask("00000", shard, "", "webdataset"), ["jpg"], ["txt"]))
    return [samples[i : i + batch] for i in range(0, len(samples), batch)]


def candidates(model: Any, decoders: dict[str, Any]) -> dict[str, Callable[[list[Any]], Any]]:
    """name -> raw samples -> the batch encode_image would take (then dropped: the model is a no-op)."""
    import torch
    from PIL import Image

    pre = model.preprocess  # open_clip's own transform, as create_model_and_transforms returns it

    def open_clip_pillow(raw: list[Any]) -> Any:
        return torch.stack([pre(Image.open(io.BytesIO(s.image)).convert("RGB")) for s in raw])

    def clipline(dec: Any) -> Callable[[list[Any]], Any]:
        return lambda raw: dec.model_input(dec("00000", raw).pixels)

    return {"open_clip": open_clip_pillow, **{f"clipline {k}": clipline(d) for k, d in decoders.items()}}


def cpu_rate(fn: Callable[[list[Any]], Any], batches: list[list[Any]]) -> float:
    """Samples per CPU-second of this process (torch runs on one thread: per core)."""
    n = sum(len(b) for b in batches)
    t0 = time.process_time()
    for b in batches:
        fn(b)
    return n / (time.process_time() - t0)


def throughput(args: argparse.Namespace, shards: dict[str, str], model: Any, decoders: dict[str, Any]) -> None:
    cands = candidates(model, decoders)
    names = list(cands)
    print(f"samples/s per core (CPU time, torch on 1 thread), median of {args.reps} alternated repeats:", flush=True)
    for kind, shard in shards.items():
        batches = raw_batches(shard, args.batch)
        for fn in cands.values():  # warm-up: page cache, allocator, lazy imports
            fn(batches[0])
        rates: dict[str, list[float]] = {k: [] for k in names}
        for rep in range(args.reps):
            for k in names[rep % len(names) :] + names[: rep % len(names)]:
                rates[k].append(cpu_rate(cands[k], batches))
        base = rates["open_clip"]
        for k in names:
            ratio = statistics.median(r / b for r, b in zip(rates[k], base))
            spread = f"{min(rates[k]):.0f}-{max(rates[k]):.0f}"
            print(f"  {kind:7s} {k:16s} {statistics.median(rates[k]):8.1f}/s  ({spread})  x{ratio:.2f} open_clip")
        u8 = statistics.median(r / b for r, b in zip(rates["clipline uint8"], base))
        print(f"  {kind:7s} uint8 / open_clip per core: {u8:.2f} (goal >= 2.0)", flush=True)


def special_images() -> dict[str, bytes]:
    """The fallbacks (every non-JPEG and unusual JPEG) and the JPEG kinds the fast path handles itself."""
    from PIL import Image

    rng = np.random.default_rng(7)
    photo = Image.open(io.BytesIO(photo_like(rng, 640, 480))).convert("RGB")
    big = Image.open(io.BytesIO(photo_like(rng, 2000, 1500))).convert("RGB")

    def enc(img: Image.Image, fmt: str, **kw: Any) -> bytes:
        b = io.BytesIO()
        img.save(b, fmt, **kw)
        return b.getvalue()

    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "png": enc(photo, "PNG"),
        "webp": enc(photo, "WEBP", quality=90),
        "png_rgba": enc(photo.convert("RGBA"), "PNG"),
        "jpeg_gray": enc(photo.convert("L"), "JPEG", quality=90),
        "jpeg_cmyk": enc(photo.convert("CMYK"), "JPEG", quality=90),
        "jpeg_progressive": enc(photo, "JPEG", quality=90, progressive=True),
        "jpeg_exif_rotated": enc(photo, "JPEG", quality=90, exif=exif),
        "jpeg_2000_exif_rotated": enc(big, "JPEG", quality=90, exif=exif),
    }


def cosine(args: argparse.Namespace, shards: dict[str, str], model: Any, decoders: dict[str, Any]) -> None:
    """Embeddings of the uint8 path against open_clip's preprocess of the same (upright) image."""
    import torch

    from pipeline.core.images import decode_image
    from pipeline.embed.batch import RawSample

    dec = decoders["uint8"]
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"cosine of clipline uint8 to open_clip's preprocess ({args.arch}, random weights, fp32):")
    sets = {kind: raw_batches(shard, args.batch)[0][: args.cosine_samples] for kind, shard in shards.items()}
    sets["fallbacks"] = [RawSample(k, i, d) for i, (k, d) in enumerate(special_images().items())]
    for name, raw in sets.items():
        # decode_image without draft = Image.open + EXIF transpose + RGB: open_clip on the upright image
        ref = torch.stack([model.preprocess(decode_image(s.image, 10**9)) for s in raw])
        got = dec.model_input(dec("0", raw).pixels)
        cos = (model.encode_image(ref) * model.encode_image(got)).sum(1)
        worst = raw[int(cos.argmin())].key
        print(
            f"  {name:9s} n={len(raw):3d}  min {cos.min().item():.6f} (key {worst})  median {cos.median().item():.6f}"
        )
    torch.set_num_threads(1)


def overhead(args: argparse.Namespace, shards: dict[str, str], decoders: dict[str, Any]) -> None:
    """CPU per sample of the uint8 hot loop with the decode and resize kernels replaced by cached results."""
    import pipeline.embed.hostdecode as hostdecode
    from pipeline.embed.transform import PixelTransform

    dec = decoders["uint8"]
    batches = raw_batches(shards["256px"], args.batch)
    decoded: dict[int, Any] = {}
    resized: dict[tuple[int, int], Any] = {}
    real_decode, real_resize = hostdecode.decode_reduced, PixelTransform._resize

    def cached_decode(data: bytes, plan: Any, denom: int) -> Any:
        if id(data) not in decoded:
            decoded[id(data)] = real_decode(data, plan, denom)
        return decoded[id(data)]

    def cached_resize(self: PixelTransform, img: Any, size: tuple[int, int], extent: Any) -> Any:
        if size not in resized:
            resized[size] = real_resize(self, img, size, extent)
        return resized[size]

    full = statistics.median(cpu_rate(lambda b: dec("0", b), batches) for _ in range(args.reps))
    hostdecode.decode_reduced = cached_decode  # type: ignore[assignment]
    PixelTransform._resize = cached_resize  # type: ignore[method-assign]
    try:
        cpu_rate(lambda b: dec("0", b), batches)  # fill the caches
        stubbed = statistics.median(cpu_rate(lambda b: dec("0", b), batches) for _ in range(args.reps))
        crops = [dec.host.fast_jpeg(s.image)[0] for s in batches[0]]
        copy = statistics.median(cpu_rate(lambda b: dec.host.stack(crops), [crops]) for _ in range(args.reps))
    finally:
        hostdecode.decode_reduced = real_decode
        PixelTransform._resize = real_resize  # type: ignore[method-assign]
    us, copy_us = 1e6 / stubbed, 1e6 / copy
    held = us - copy_us  # the copy is a torch kernel, run without the GIL
    print(
        f"per-sample Python overhead of the uint8 hot loop (256 px shard, batch {args.batch}): {us:.0f} us of "
        f"{1e6 / full:.0f} us per sample (row, header checks, geometry, crop view, copy into the batch), of which "
        f"the copy kernel {copy_us:.0f} us; ~{held:.0f} us hold the GIL: one process's decode threads top out "
        f"near {1e6 / held:,.0f} samples/s",
        flush=True,
    )


_CHILD: dict[str, Any] = {}


def _child_init(info: dict[str, Any], max_pixels: int, margin: float) -> None:
    import torch

    from pipeline.embed.decode import BatchDecoder
    from pipeline.embed.hostdecode import HostDecoder
    from pipeline.embed.transform import PixelTransform

    torch.set_num_threads(1)
    host = HostDecoder(PixelTransform(info, torch.device("cpu")), max_pixels, margin, pin=False)
    _CHILD["dec"] = BatchDecoder(None, None, max_pixels, (255, 255, 255), host=host)  # type: ignore[arg-type]


def _child_decode(raw: list[Any]) -> tuple[Any, float]:
    """The uint8 batch (pickled back to the parent) and the CPU seconds this child spent, unpickling included."""
    t0 = time.process_time()
    return _CHILD["dec"]("0", raw).pixels, time.process_time() - t0


def workers(args: argparse.Namespace, shards: dict[str, str], model: Any, decoders: dict[str, Any]) -> None:
    """The 256 px shard through 1 thread, 2 threads and 2 processes: per wall-second and per CPU-second."""
    import torch

    from pipeline.core.config import EmbedConfig

    dec = decoders["uint8"]
    batches = raw_batches(shards["256px"], args.batch) * 2
    n = sum(len(b) for b in batches)
    e = EmbedConfig()
    ctx = multiprocessing.get_context("spawn")
    init = (model.preprocess_info(), e.max_pixels, e.draft_margin)
    print(f"decode workers, {n} samples of 256 px, batch {args.batch} (wall-clock figures depend on the load):")
    with ctx.Pool(2, initializer=_child_init, initargs=init) as procs, ThreadPoolExecutor(2) as pool:
        procs.map(_child_decode, batches[:2])  # start-up and imports outside the timing
        runs: dict[str, Callable[[], Any]] = {
            "1 thread": lambda: [(dec("0", b).pixels, 0.0) for b in batches],
            "2 threads": lambda: list(pool.map(lambda b: (dec("0", b).pixels, 0.0), batches)),
            "2 processes": lambda: procs.map(_child_decode, batches),
        }
        for name, run in runs.items():
            walls, cpus = [], []
            for _ in range(args.reps):
                c0, t0 = time.process_time(), time.perf_counter()  # this process: decoding, or pickling and IPC
                out = run()
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0 + sum(c for _, c in out))
                assert sum(len(x) for x, _ in out) == n and all(x.dtype == torch.uint8 for x, _ in out)
            print(
                f"  {name:12s} {n / statistics.median(walls):8.1f} samples/wall-s  "
                f"{n / statistics.median(cpus):8.1f} samples/CPU-s",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=256, help="samples in the 256 px shard")
    ap.add_argument("--large", type=int, default=48, help="samples in the 2,000 px shard")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--arch", default="ViT-B-32", help="open_clip architecture (random weights), or 'tiny'")
    ap.add_argument("--cosine-samples", type=int, default=16)
    ap.add_argument("--skip-cosine", action="store_true")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--skip-workers", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="clipline-bench-input-") as tmp:
        work = Path(tmp)
        shards = {
            kind: make_shard(work / f"{kind}.tar", kind, args.small if kind == "256px" else args.large, seed=i)
            for i, kind in enumerate(KINDS)
        }
        model, uint8 = load(args.arch, work, "uint8")
        _, model_path = load(args.arch, work, "model")
        decoders = {"model": model_path, "uint8": uint8}
        throughput(args, shards, model, decoders)
        if not args.skip_cosine:
            cosine(args, shards, model, decoders)
        if not args.skip_overhead:
            overhead(args, shards, decoders)
        if not args.skip_workers:
            workers(args, shards, model, decoders)


if __name__ == "__main__":
    main()
