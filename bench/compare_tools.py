"""clipline against the tools users know, on the same data: clip-retrieval inference, img2dataset, autofaiss.

Usage: python bench/compare_tools.py [--reps 3] [--quick] [--only embed,download,index]
                                     [--clip-retrieval-python /work/crvenv/bin/python] [--threads N] [--keep DIR]

Each comparison runs both sides on identical input, alternated within a rep (rep 0 clipline first, rep 1 the
other tool first, ...) and repeated; it prints every rep, then medians and the clipline/other ratio of each rep
(on a machine whose speed drifts, the ratio within one rep says more than the absolute figures). Every command
runs in a child process and is timed from its start to its exit (imports, model load, start-up included); its
peak RSS is that of the largest process in its tree (ru_maxrss of a small wrapper's children).

1. embed vs `clip-retrieval inference` (2.45.0). clip-retrieval is not a dependency: install it in a separate
   venv, as was done for the figures: `python3 -m venv /work/crvenv`, `/work/crvenv/bin/pip install
   torch==2.14.1 torchvision==0.29.1`, `/work/crvenv/bin/pip install clip-retrieval==2.45.0` (its own pins
   resolve: open_clip_torch 2.32.0, all_clip 1.3.0, pyarrow 15), then `/work/crvenv/bin/pip install
   'setuptools<81'` (clip-anytorch, imported by all_clip, needs pkg_resources, which setuptools 81+ lacks). Pass
   its interpreter (or its `clip-retrieval` executable) with --clip-retrieval-python; without it this
   comparison is skipped. Input: WebDataset shards made by bench_embed.make_shards; model: open_clip ViT-B-32
   with random weights saved by bench_embed.save_checkpoint. clip-retrieval loads models through all_clip, whose
   open_clip loader splits `--clip_model` at "/" into the architecture and everything after it, and hands the
   latter to open_clip.create_model_and_transforms(pretrained=...), which loads a file path as a state dict. So
   `--clip_model open_clip:ViT-B-32//abs/path/vitb32.pt` (architecture, "/", then the absolute path with its own
   leading "/") loads the same local file without network; HF_HUB_OFFLINE=1 guards against any hub call.
   Settings matched: batch 64, image+text, fp32 compute on CPU, torch threads = --threads (OMP_NUM_THREADS for
   clip-retrieval, local.threads for clipline), --workers preprocessing workers (clip-retrieval's
   --num_prepro_workers DataLoader processes, clipline's embed.decode_threads threads), float16 stored
   embeddings (clip-retrieval always stores float16), no JIT. Reported: samples/s over the whole command, each
   tool's own in-loop rate (clipline: first shard start to last shard end; clip-retrieval: its stats file's
   summed batch durations; clip-retrieval also warms up on 2 batches before its loop), keys in both outputs, the
   cosine of the two tools' image and text embeddings per key, and whether embedding-reader (what autofaiss and
   clip-retrieval's own index read with) reads both outputs.
2. download vs img2dataset called directly: the 1,000 loopback URLs of bench/download_1000.py (5% bad), served
   by pipeline.run.httpserver. The direct run calls img2dataset.download() with exactly the keyword arguments
   clipline derives from the same settings (pipeline.download.stage.img2dataset_kwargs), so what differs is
   clipline's wrapper: URL-list checks, repair, per-URL accounting, run record. Reported: URLs/s over the
   command and inside shards, and whether both outputs agree URL by URL (status, failure reason).
3. index vs autofaiss.build_index directly: generated clustered float16 embeddings (bench_index.generate),
   the same memory budget, memory available, index key (autofaiss's choice unless --index-key), query-time
   budget and faiss threads; autofaiss reads img_emb/ itself, as `clip-retrieval index` does. Both indices are
   then measured by the same code (pipeline.index.quality.measure, with each side's index_param applied):
   recall@10/@100 against exact search and single-query latency.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

CL = "clipline"
TIMEOUT_S = 3600

# Runs argv[2:] and writes its children's peak RSS (KiB) to argv[1].
WRAP = (
    "import resource,subprocess,sys;r=subprocess.run(sys.argv[2:]);"
    "open(sys.argv[1],'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss));sys.exit(r.returncode)"
)
# img2dataset called the way a user of its Python API calls it, with the keyword arguments given as JSON.
I2D_CODE = "import json,sys,img2dataset;img2dataset.download(**json.loads(sys.argv[1]))"
# autofaiss called the way `clip-retrieval index` and autofaiss's README call it; exit 1 when it gives up.
AF_CODE = (
    "import json,sys;from autofaiss import build_index;"
    "i,_=build_index(**json.loads(sys.argv[1]));sys.exit(0 if i is not None else 1)"
)


# ---- running and reporting ---------------------------------------------------------------------------------


class Failed(RuntimeError):
    """A command of the comparison exited non-zero: the comparison stops and says why."""


def run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run cmd (output to `log`); returns (wall seconds, peak RSS MiB of the largest process in its tree).

    The command runs under a small Python wrapper that reads its children's ru_maxrss: measured from this (large)
    process, a child's peak would start at this process's size, copied at fork.
    """
    rss_file = log.with_suffix(".rss")
    with open(log, "w") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(
            [sys.executable, "-c", WRAP, str(rss_file), *cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        try:
            p.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        wall = time.perf_counter() - t0
    if p.returncode != 0:
        tail = log.read_text(errors="replace")[-2500:]
        raise Failed(f"{' '.join(cmd[:6])} ... exited {p.returncode}; last output:\n{tail}")
    return wall, int(rss_file.read_text()) / 1024


def order(rep: int, other: str) -> list[str]:
    return [CL, other] if rep % 2 == 0 else [other, CL]


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def ratios(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b)]


def row(label: str, cl: list[float], other: list[float], fmt: str = "{:.2f}") -> str:
    r = ratios(cl, other)
    return (
        f"  {label:<28} {fmt.format(med(cl)):>10} {fmt.format(med(other)):>10}   "
        f"{med(r):5.2f}  ({', '.join(f'{x:.2f}' for x in r)})"
    )


def header(other: str) -> str:
    return f"  {'median over reps':<28} {CL:>10} {other[:10]:>10}   clipline/other: median of per-rep ratios (each rep)"


# ---- 1. embed vs clip-retrieval inference ------------------------------------------------------------------


def clip_retrieval_command(path: str | None) -> tuple[list[str] | None, str]:
    """The `clip-retrieval inference` command prefix and its versions, or (None, why it is not usable)."""
    if not path:
        return None, "no --clip-retrieval-python given (see this file's docstring for how to install it)"
    if not Path(path).exists():
        return None, f"{path} does not exist"
    exe = Path(path)
    if exe.name.startswith("clip-retrieval"):
        prefix, python = [str(exe), "inference"], exe.parent / "python"
    else:
        prefix, python = [str(exe), "-m", "clip_retrieval.cli", "inference"], exe
    code = "import importlib.metadata as m;print(m.version('clip-retrieval'), m.version('open_clip_torch'))"
    r = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        return None, f"{python} cannot import clip_retrieval: {r.stderr.strip()[-300:]}"
    return prefix, r.stdout.strip()


def read_with_embedding_reader(root: Path, modality: str, key_col: str) -> dict[str, np.ndarray]:
    """key -> vector of one output folder, read by embedding-reader (npy embeddings + parquet metadata)."""
    from embedding_reader import EmbeddingReader

    with contextlib.redirect_stderr(io.StringIO()):  # its progress bars
        reader = EmbeddingReader(
            str(root / f"{modality}_emb"),
            file_format="parquet_npy",
            metadata_folder=str(root / "metadata"),
            meta_columns=[key_col],
        )
        out: dict[str, np.ndarray] = {}
        for emb, meta in reader(batch_size=1 << 20, show_progress=False):
            out.update(zip(meta[key_col].astype(str), emb.astype(np.float32)))
    return out


def agreement(cl_out: Path, cr_out: Path) -> dict[str, Any]:
    """Keys in both outputs and the cosine of the two tools' embeddings per key (vectors are unit-norm)."""
    res: dict[str, Any] = {}
    for mod in ("img", "text"):
        a = read_with_embedding_reader(cl_out, mod, "key")
        b = read_with_embedding_reader(cr_out, mod, "image_path")  # clip-retrieval keeps the key there
        keys = sorted(set(a) & set(b))
        cos = np.array([float(a[k] @ b[k]) for k in keys] or [np.nan])
        res[mod] = {"cl": len(a), "cr": len(b), "both": len(keys), "min": cos.min(), "median": np.median(cos)}
    return res


def clipline_index_accepts(cr_out: Path, work: Path) -> str:
    """Whether `clipline index` takes clip-retrieval's output folder (it needs the embed manifest)."""
    from pipeline.core.config import load_config
    from pipeline.index.stage import build

    cfg = load_config([f"input={cr_out}", f"output={work / 'ix-of-cr'}", "index.recall_queries=10"])
    try:
        build(cfg)
    except Exception as e:  # whatever it raises is the answer
        return f"no: {type(e).__name__}: {str(e)[:150]}"
    return "yes"


def embed_loop_rate_clipline(out: Path) -> float:
    stats = [json.loads(p.read_text()) for p in (out / "stats").glob("stats_*.json")]
    span = max(s["finished"] for s in stats) - min(s["started"] for s in stats)
    return sum(s["samples"] for s in stats) / span


def embed_loop_rate_cr(out: Path) -> float:
    s = json.loads((out / "stats" / "0.json").read_text())
    return s["sample_count"] / s["total_duration"]


def compare_embed(args: argparse.Namespace, work: Path) -> None:
    prefix, version = clip_retrieval_command(args.clip_retrieval_python)
    print("\n== 1. embed vs clip-retrieval inference ==", flush=True)
    if prefix is None:
        print(f"  skipped: {version}")
        return
    import open_clip
    from bench_embed import make_shards, save_checkpoint

    per = args.samples // args.shards
    make_shards(work / "shards", args.shards, per)
    inp = str(work / "shards" / f"{{00000..{args.shards - 1:05d}}}.tar")
    ckpt = work / "vitb32.pt"
    cr_model = f"open_clip:ViT-B-32/{ckpt.resolve()}"  # all_clip: architecture "/" then the path, see the docstring
    with contextlib.redirect_stderr(io.StringIO()):
        cl_model = save_checkpoint("ViT-B-32", ckpt)
    n = per * args.shards
    t, w = str(args.threads), str(args.workers)
    env = dict(os.environ, OMP_NUM_THREADS=t, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")
    print(
        f"  {n} samples in {args.shards} shards, ViT-B-32 random weights, batch {args.batch}, image+text, fp32 on CPU, "
        f"{t} torch threads, {w} preprocessing workers; clipline open_clip {open_clip.__version__}, "
        f"clip-retrieval + its open_clip: {version}",
        flush=True,
    )
    rate: dict[str, list[float]] = {CL: [], "cr": []}
    loop: dict[str, list[float]] = {CL: [], "cr": []}
    rss: dict[str, list[float]] = {CL: [], "cr": []}
    for rep in range(args.reps):
        outs = {CL: work / f"emb_cl{rep}", "cr": work / f"emb_cr{rep}"}
        for side in order(rep, "cr"):
            if side == CL:
                cmd = [
                    sys.executable,
                    "-m",
                    "pipeline.cli",
                    "embed",
                    f"input={inp}",
                    f"output={outs[CL]}",
                    *cl_model,
                ]
                cmd += [f"embed.batch_size={args.batch}", "embed.output_dtype=float16", "model.precision=fp32"]
                cmd += ["model.device=cpu", "local.processes=1", f"local.threads={t}", f"embed.decode_threads={w}"]
                cmd += ["log_level=WARNING"]
            else:
                cmd = [*prefix, "--input_dataset", inp, "--output_folder", str(outs["cr"]), "--input_format"]
                cmd += ["webdataset", "--batch_size", str(args.batch), "--num_prepro_workers", w, "--use_jit", "False"]
                cmd += ["--clip_model", cr_model, "--enable_image", "True"]
                cmd += ["--enable_text", "True", "--enable_metadata", "False"]
            wall, peak = run(cmd, work / f"emb_{side}{rep}.log", env)
            rate[side].append(n / wall)
            rss[side].append(peak)
        loop[CL].append(embed_loop_rate_clipline(outs[CL]))
        loop["cr"].append(embed_loop_rate_cr(outs["cr"]))
        agree = agreement(outs[CL], outs["cr"])
        print(
            f"  rep {rep}: clipline {rate[CL][-1]:.2f}/s (loop {loop[CL][-1]:.2f}/s)  clip-retrieval "
            f"{rate['cr'][-1]:.2f}/s (loop {loop['cr'][-1]:.2f}/s)  ratio {rate[CL][-1] / rate['cr'][-1]:.2f}  "
            f"cosine img min {agree['img']['min']:.5f} text min {agree['text']['min']:.5f}",
            flush=True,
        )
    print(header("clip-retrieval"))
    print(row("samples/s, whole command", rate[CL], rate["cr"]))
    print(row("samples/s, in its loop", loop[CL], loop["cr"]))
    print(row("peak RSS MiB", rss[CL], rss["cr"], "{:.0f}"))
    for mod, a in agree.items():
        print(
            f"  {mod}_emb read by embedding-reader: {a['cl']} clipline rows, {a['cr']} clip-retrieval rows, "
            f"{a['both']} keys in both; "
            f"cosine clipline vs clip-retrieval per key: min {a['min']:.5f}, median {a['median']:.5f}"
        )
    print(f"  `clipline index` on clip-retrieval's output: {clipline_index_accepts(outs['cr'], work)}")


# ---- 2. download vs img2dataset ----------------------------------------------------------------------------


def download_outcome(out: Path) -> dict[str, Any]:
    """Per-URL status/reason from img2dataset's parquet files, images in the tars, in-shard URLs/s."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.download.layout import classify_error

    t = pa.concat_tables(pq.read_table(p, columns=["url", "status", "error_message"]) for p in out.glob("*.parquet"))
    per_url = {
        u: ("success", "") if s == "success" else (s, classify_error(e))
        for u, s, e in zip(*(t.column(c).to_pylist() for c in ("url", "status", "error_message")))
    }
    images = 0
    for p in out.glob("*.tar"):
        with tarfile.open(p) as tf:
            images += sum(m.name.endswith(".jpg") for m in tf.getmembers())
    stats = [json.loads(p.read_text()) for p in out.glob("*_stats.json")]
    span = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    return {"rows": t.num_rows, "per_url": per_url, "images": images, "in_shard": sum(s["count"] for s in stats) / span}


def compare_download(args: argparse.Namespace, work: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from download_1000 import make_site

    from pipeline.core.config import load_config
    from pipeline.download.stage import img2dataset_kwargs, plan_input
    from pipeline.run.httpserver import serve_directory

    print("\n== 2. download vs img2dataset ==", flush=True)
    names = make_site(work / "dl")[: args.urls]
    settings = [
        f"download.processes_count={args.processes}",
        f"download.thread_count={args.dl_threads}",
        f"download.number_sample_per_shard={args.per_shard}",
        "download.allow_private_addresses=true",  # the site is on 127.0.0.1
    ]
    rate: dict[str, list[float]] = {CL: [], "i2d": []}
    inshard: dict[str, list[float]] = {CL: [], "i2d": []}
    rss: dict[str, list[float]] = {CL: [], "i2d": []}
    with serve_directory(work / "dl" / "site") as base:
        urls = [f"{base}/{n}" for n in names]
        url_list = work / "dl" / "urls.parquet"
        pq.write_table(pa.table({"url": urls, "caption": [f"photo {n}" for n in names]}), url_list)
        print(f"  {len(urls)} URLs on 127.0.0.1, settings: {' '.join(settings)}", flush=True)
        for rep in range(args.reps):
            outs = {CL: work / f"dl_cl{rep}", "i2d": work / f"dl_i2d{rep}"}
            for side in order(rep, "i2d"):
                if side == CL:
                    cmd = [sys.executable, "-m", "pipeline.cli", "download", f"input={url_list}"]
                    cmd += [f"output={outs[CL]}", *settings, "log_level=WARNING"]
                else:
                    cfg = load_config([f"input={url_list}", f"output={outs['i2d']}", *settings])
                    cmd = [sys.executable, "-c", I2D_CODE, json.dumps(img2dataset_kwargs(cfg, plan_input(cfg)))]
                wall, peak = run(cmd, work / f"dl_{side}{rep}.log")
                rate[side].append(len(urls) / wall)
                rss[side].append(peak)
            got = {side: download_outcome(out) for side, out in outs.items()}
            for side in outs:
                inshard[side].append(got[side]["in_shard"])
            differ = sum(got[CL]["per_url"].get(u) != got["i2d"]["per_url"].get(u) for u in urls)
            print(
                f"  rep {rep}: clipline {rate[CL][-1]:.1f} URLs/s  img2dataset {rate['i2d'][-1]:.1f} URLs/s  "
                f"ratio {rate[CL][-1] / rate['i2d'][-1]:.2f}  URLs whose outcome differs: {differ}",
                flush=True,
            )
    print(header("img2dataset"))
    print(row("URLs/s, whole command", rate[CL], rate["i2d"], "{:.1f}"))
    print(row("wall s", [len(urls) / r for r in rate[CL]], [len(urls) / r for r in rate["i2d"]], "{:.1f}"))
    print(row("URLs/s inside shards", inshard[CL], inshard["i2d"], "{:.0f}"))
    print(row("peak RSS MiB", rss[CL], rss["i2d"], "{:.0f}"))
    for side, g in got.items():
        ok = sum(v[0] == "success" for v in g["per_url"].values())
        reasons = Counter(v[1] for v in g["per_url"].values() if v[0] != "success")
        print(
            f"  {'clipline' if side == CL else 'img2dataset'} (last rep): {g['rows']} parquet rows for {len(urls)} URLs, "
            f"{ok} success, {g['images']} images in tars, failures {dict(reasons.most_common())}"
        )
    summary = json.loads((outs[CL] / "_clipline" / "run.json").read_text())["summary"]
    print(
        f"  clipline's own summary: {summary['images_written']} written, {summary['failed']} failed, "
        f"{summary['unaccounted']} unaccounted (img2dataset prints per-shard stats only)"
    )


# ---- 3. index vs autofaiss ---------------------------------------------------------------------------------


def measured(index_path: Path, index_param: str | None, blocks: Any, queries: int) -> dict[str, Any]:
    import faiss

    from pipeline.index.quality import measure

    index = faiss.read_index(str(index_path))
    if index_param:
        faiss.ParameterSpace().set_index_parameters(index, index_param)
    return measure(index, blocks, queries)


def autofaiss_seconds(log: Path) -> float:
    """build_index's own total from its log ('Finished "Launching the whole pipeline" in X secs')."""
    m = re.search(r'Finished "Launching the whole pipeline" in ([0-9.]+) secs', log.read_text(errors="replace"))
    if m is None:
        raise Failed(f"{log}: no autofaiss timing line")
    return float(m.group(1))


def compare_index(args: argparse.Namespace, work: Path) -> None:
    import faiss
    from bench_index import generate

    from pipeline.embeddings.read import EmbeddingSet

    print("\n== 3. index vs autofaiss ==", flush=True)
    data = Path(args.index_data) / f"n{args.n}-d{args.dim}-c{args.clusters}"
    generate(data, args.n, args.dim, 10_000, args.clusters)
    emb = EmbeddingSet(str(data))
    faiss.omp_set_num_threads(args.threads)

    def blocks() -> Any:
        return emb.iter_kept("image")

    budget = {
        "max_index_memory_usage": args.budget,
        "current_memory_available": args.memory,
        "index_key": args.index_key,
        "max_index_query_time_ms": args.query_ms,
        "nb_cores": args.threads,
    }
    print(f"  {args.n} x {args.dim} float16, {args.clusters} clusters, {data}; settings {budget}", flush=True)
    stats: dict[str, dict[str, list[float]]] = {s: {} for s in (CL, "af")}
    keys: dict[str, str] = {}
    for rep in range(args.reps):
        for side in order(rep, "af"):
            out = work / f"ix_{side}{rep}"
            if side == CL:
                cmd = [sys.executable, "-m", "pipeline.cli", "index", f"input={data}", f"output={out}"]
                cmd += ["index.modalities=[image]", f"index.recall_queries={args.queries}"]
                # INFO: autofaiss's own timing lines then reach the log, as they do in the direct run
                cmd += [f"index.{k}={v}" for k, v in budget.items() if v is not None] + ["log_level=INFO"]
                path, infos = out / "image.index", out / "image.json"
            else:
                out.mkdir()
                path, infos = out / "knn.index", out / "infos.json"
                kw = dict(budget, embeddings=str(data / "img_emb"), index_path=str(path), index_infos_path=str(infos))
                cmd = [sys.executable, "-c", AF_CODE, json.dumps(dict(kw, metric_type="ip"))]
            wall, peak = run(cmd, work / f"ix_{side}{rep}.log")
            stats[side].setdefault("inner", []).append(autofaiss_seconds(work / f"ix_{side}{rep}.log"))
            info = json.loads(infos.read_text())
            key, param = info["index_key"], info["index_param"]
            m = measured(path, param, blocks, args.queries)
            keys[side] = f"{key} ({param}), {path.stat().st_size / 1e6:.0f} MB"
            if side == CL:
                own = info["quality"]["recall@10"]
            for name, v in (("build", wall), ("rss", peak), ("r10", m["recall@10"]), ("r100", m["recall@100"])):
                stats[side].setdefault(name, []).append(v)
            stats[side].setdefault("lat", []).append(m["avg_latency_ms"])
            stats[side].setdefault("p99", []).append(m["p99_latency_ms"])
        cl, af = stats[CL], stats["af"]
        print(
            f"  rep {rep}: clipline {cl['build'][-1]:.1f}s recall@10 {cl['r10'][-1]:.4f} {cl['lat'][-1]:.3f} ms  "
            f"autofaiss {af['build'][-1]:.1f}s recall@10 {af['r10'][-1]:.4f} {af['lat'][-1]:.3f} ms  "
            f"build time ratio {cl['build'][-1] / af['build'][-1]:.2f}",
            flush=True,
        )
    cl, af = stats[CL], stats["af"]
    print(header("autofaiss"))
    print(row("build s, whole command", cl["build"], af["build"], "{:.1f}"))
    print(row("  of which autofaiss's own", cl["inner"], af["inner"], "{:.1f}"))
    print(row("recall@10", cl["r10"], af["r10"], "{:.4f}"))
    print(row("recall@100", cl["r100"], af["r100"], "{:.4f}"))
    print(row("avg single-query ms (k=10)", cl["lat"], af["lat"], "{:.3f}"))
    print(row("p99 single-query ms", cl["p99"], af["p99"], "{:.3f}"))
    print(row("peak RSS MiB", cl["rss"], af["rss"], "{:.0f}"))
    print(f"  index chosen: clipline {keys[CL]}; autofaiss {keys['af']}")
    print(f"  clipline's own recorded recall@10 (same query sample, last rep): {own}")
    print(
        '  autofaiss\'s own = its "Launching the whole pipeline" time (index choice, training, adding, efSearch/nprobe'
        " tuning, its fast metrics); the rest of clipline's time is start-up, copying the kept vectors, the id map and"
        " its own recall/latency measurement"
    )


# ---- main --------------------------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny inputs, one rep")
    ap.add_argument("--only", default="embed,download,index", help="comma-separated subset")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch / faiss threads")
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temp folder, deleted)")
    e = ap.add_argument_group("embed")
    e.add_argument("--clip-retrieval-python", default=os.environ.get("CLIP_RETRIEVAL_PYTHON"))
    e.add_argument("--samples", type=int, default=256)
    e.add_argument("--shards", type=int, default=4)
    e.add_argument("--batch", type=int, default=64)
    e.add_argument("--workers", type=int, default=2, help="preprocessing workers on each side")
    d = ap.add_argument_group("download")
    d.add_argument("--urls", type=int, default=1000, help="at most 1000")
    d.add_argument("--processes", type=int, default=2)
    d.add_argument("--dl-threads", type=int, default=32)
    d.add_argument("--per-shard", type=int, default=250)
    i = ap.add_argument_group("index")
    i.add_argument("--n", type=int, default=100_000)
    i.add_argument("--dim", type=int, default=512)
    i.add_argument("--clusters", type=int, default=100)
    i.add_argument("--budget", default="4G", help="max_index_memory_usage")
    i.add_argument("--memory", default="16G", help="current_memory_available")
    i.add_argument("--index-key", default=None)
    i.add_argument("--queries", type=int, default=500, help="recall and latency queries (both sides)")
    i.add_argument("--query-ms", type=float, default=10.0, help="max_index_query_time_ms (tunes efSearch/nprobe)")
    i.add_argument("--index-data", default="/tmp/clipline-bench-index", help="generated embeddings (reused)")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.samples, args.shards, args.batch = 1, 16, 2, 8
        args.urls, args.per_shard, args.n, args.queries, args.query_ms = 100, 50, 10_000, 200, 2.0
    return args


def main() -> int:
    args = parse()
    print(
        f"machine: {os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
        f"python {sys.version.split()[0]}, {args.reps} reps, sides alternated",
        flush=True,
    )
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="clipline-compare-"))
    root.mkdir(parents=True, exist_ok=True)
    t0, failed = time.perf_counter(), []
    steps = {"embed": compare_embed, "download": compare_download, "index": compare_index}
    try:
        for name in args.only.split(","):
            t1 = time.perf_counter()
            try:
                (root / name).mkdir(exist_ok=True)
                steps[name](args, root / name)
            except Failed as e:
                failed.append(name)
                print(f"  FAILED: {e}", flush=True)
            print(f"  ({name}: {time.perf_counter() - t1:.0f} s)", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(
        f"\ntotal {time.perf_counter() - t0:.0f} s; load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"bench process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )
    return 1 if failed else 0


if __name__ == "__main__":  # img2dataset and the local pool spawn processes that re-import their parent's main
    sys.exit(main())
