"""Embed throughput against the model's bare forward, reduced precision, and peak memory as the input grows.

Usage: python bench/bench_embed.py [--samples 2000] [--shards 8] [--reps 3] [--skip-memory]

Prints, measured in one run with the two sides alternated:
  * bare forward samples/s (image+text, text padded to 77 tokens, batch 64, pre-decoded tensors)
  * end-to-end `clipline embed` samples/s (tar in, npy/parquet out, fp32) and the ratio to the bare forward
  * int8 end-to-end samples/s, its ratio to fp32 end-to-end, and the cosine of int8 vs fp32 embeddings
  * peak RSS and time of the embed worker at 1x / 4x / 16x shards (tiny model)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

WORDS = (
    "a photo of the red blue small large old new dog cat car house tree river mountain city street "
    "person woman man child bird boat flower field beach sunset night snow kitchen table"
).split()


def photo_like(rng: np.random.Generator, w: int, h: int) -> bytes:
    """Smooth gradients plus mild noise: decodes like a photo, unlike white noise."""
    from PIL import Image

    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(x / rng.uniform(10, 60) + c) * np.cos(y / rng.uniform(10, 60) - c) for c in (0, 1, 2)], -1)
    arr = ((base * 0.5 + 0.5) * 200 + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def caption(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(8, 25))))


def make_shards(root: Path, n_shards: int, per_shard: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for s in range(n_shards):
        p = root / f"{s:05d}.tar"
        with tarfile.open(p, "w") as t:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                fields = {
                    "jpg": photo_like(rng, int(rng.integers(240, 400)), int(rng.integers(240, 400))),
                    "txt": caption(rng).encode(),
                    "json": json.dumps({"key": key}).encode(),
                }
                for ext, data in fields.items():
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size = len(data)
                    t.addfile(ti, io.BytesIO(data))
        out.append(str(p))
    return out


def save_checkpoint(arch: str, path: Path, config: dict | None = None) -> list[str]:
    import open_clip
    import torch

    overrides = [f"model.arch={arch}", f"model.checkpoint={path}"]
    if config is not None:
        cfg_path = path.with_suffix(".json")
        cfg_path.write_text(json.dumps(config))
        open_clip.factory._MODEL_CONFIGS[arch] = config
        overrides.append(f"model.model_config_file={cfg_path}")
    torch.manual_seed(0)
    torch.save(open_clip.create_model(arch, pretrained=None).state_dict(), path)
    return overrides


def bare_forward(arch: str, ckpt: Path, shard_paths: list[str], batch: int, threads: int) -> float:
    """Model-only samples/s for image+text with open_clip's own encode_* (text padded to 77)."""
    import open_clip
    import torch
    from PIL import Image

    from pipeline.core.tasks import ShardTask
    from pipeline.embed.reader import iter_tar

    torch.set_num_threads(threads)
    model, _, pre = open_clip.create_model_and_transforms(arch, pretrained=str(ckpt))
    model.eval()
    tok = open_clip.get_tokenizer(arch)
    pixels, texts = [], []
    for p in shard_paths:
        for s in iter_tar(ShardTask("x", p, "", "webdataset"), ["jpg"], ["txt"]):
            pixels.append(pre(Image.open(io.BytesIO(s.image)).convert("RGB")))
            texts.append(s.caption.decode())
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(pixels), batch):
            model.encode_image(torch.stack(pixels[i : i + batch]))
            model.encode_text(tok(texts[i : i + batch]))
    return len(pixels) / (time.perf_counter() - t0)


def run_embed(overrides: list[str], inp: str, out: Path) -> tuple[float, int, str]:
    """`clipline embed` in a child process: (samples/s over the whole command, child peak RSS KiB, time split)."""
    args = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "embed",
        f"input={inp}",
        f"output={out}",
        *overrides,
        "log_level=WARNING",
    ]
    code = (
        "import resource,subprocess,sys,time;t=time.perf_counter();"
        "r=subprocess.run(sys.argv[1:]);dt=time.perf_counter()-t;"
        "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);sys.exit(r.returncode)"
    )
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    dt, rss = r.stdout.strip().splitlines()[-1].split()
    stats = [json.loads(p.read_text()) for p in (out / "stats").glob("stats_*.json")]
    n = sum(s["samples"] for s in stats)
    timings: dict[str, float] = {}
    for s in stats:
        for k, v in s["timings"].items():
            timings[k] = timings.get(k, 0.0) + v
    span = max(s["finished"] for s in stats) - min(s["started"] for s in stats)
    return n / float(dt), int(rss), split_line(float(dt), span, timings)


def split_line(dt: float, span: float, t: dict[str, float]) -> str:
    """Where an embed command's time went, from its per-shard stats (span: first shard start to last end)."""
    return (
        f"    time split: command {dt:.1f}s = outside shards {dt - span:.1f}s (start-up, model load, exit) + shards "
        f"{span:.1f}s (model {t.get('model', 0):.1f}s, waiting for decode {t.get('wait_decode', 0):.1f}s, "
        f"write {t.get('write', 0):.1f}s; decode threads busy {t.get('decode', 0):.1f}s)"
    )


def _load_all(out: Path) -> np.ndarray:
    return np.concatenate([np.load(p).astype(np.float32) for p in sorted((out / "img_emb").glob("*.npy"))])


def throughput(args: argparse.Namespace, work: Path) -> None:
    per = args.samples // args.shards
    shard_paths = make_shards(work / "shards", args.shards, per)
    inp = str(work / "shards" / f"{{00000..{args.shards - 1:05d}}}.tar")
    ckpt = work / "vitb32.pt"
    ov = save_checkpoint("ViT-B-32", ckpt) + [
        f"embed.batch_size={args.batch}",
        "embed.output_dtype=float32",
        f"embed.decode={args.decode}",
    ]
    bare, e2e, int8, cos = [], [], [], []
    for rep in range(args.reps):
        bare.append(bare_forward("ViT-B-32", ckpt, shard_paths, args.batch, os.cpu_count() or 1))
        out = work / f"e2e{rep}"
        rate, _, split = run_embed(ov, inp, out)
        e2e.append(rate)
        print(split, flush=True)
        if not args.skip_int8:
            out8 = work / f"int8_{rep}"
            int8.append(run_embed(ov + ["model.precision=int8"], inp, out8)[0])
            a, b = _load_all(out), _load_all(out8)
            cos.append(float(np.median(np.sum(a * b, axis=1))))
        print(
            f"rep {rep}: bare {bare[-1]:.2f}/s  e2e {e2e[-1]:.2f}/s  ratio {e2e[-1] / bare[-1]:.2f}"
            + (f"  int8 {int8[-1]:.2f}/s ({int8[-1] / e2e[-1]:.2f}x fp32, cosine {cos[-1]:.4f})" if int8 else ""),
            flush=True,
        )
    ratios = [e / b for e, b in zip(e2e, bare)]
    print(
        f"ViT-B-32 fp32 image+text, batch {args.batch}, {args.samples} samples in {args.shards} shards, "
        f"embed.decode={args.decode}"
    )
    print(f"  bare forward     median {statistics.median(bare):.2f} samples/s")
    print(f"  clipline embed   median {statistics.median(e2e):.2f} samples/s")
    print(
        f"  end-to-end/bare  median ratio {statistics.median(ratios):.2f}  (per rep: {', '.join(f'{r:.2f}' for r in ratios)})"
    )
    if int8:
        r8 = [a / b for a, b in zip(int8, e2e)]
        print(
            f"  int8 end-to-end  median {statistics.median(int8):.2f} samples/s, {statistics.median(r8):.2f}x fp32, "
            f"median cosine vs fp32 {statistics.median(cos):.4f}"
        )


def memory(args: argparse.Namespace, work: Path) -> None:
    tiny = {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
    }
    ov = save_checkpoint("bench-tiny", work / "tiny.pt", tiny) + ["embed.batch_size=64"]
    make_shards(work / "mshards", 16, 200, seed=1)
    for mult in (1, 4, 16):
        inp = str(work / "mshards" / f"{{00000..{mult - 1:05d}}}.tar")
        t0 = time.perf_counter()
        rate, rss, _ = run_embed(ov, inp, work / f"mem{mult}")
        print(
            f"  {mult:>2}x shards ({mult * 200:>5} samples): {time.perf_counter() - t0:6.1f}s, "
            f"{rate:7.1f} samples/s, peak worker RSS {rss / 1024:.0f} MiB",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode", choices=["cpu", "device"], default="cpu", help="embed.decode for the embed runs")
    ap.add_argument("--skip-int8", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    print(
        f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}, "
        f"RSS limit {resource.getrlimit(resource.RLIMIT_AS)[0]}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="clipline-bench-") as tmp:
        work = Path(tmp)
        if not args.skip_throughput:
            throughput(args, work)
        if not args.skip_memory:
            print("peak memory as the input grows (tiny model, 200 samples per shard):")
            memory(args, work)


if __name__ == "__main__":
    main()
