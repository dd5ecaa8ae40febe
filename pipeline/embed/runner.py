"""The per-shard loop: read -> decode (thread pool) -> model -> write, timed, with bounded prefetch."""

from __future__ import annotations

import collections
import ctypes
import json
import logging
import os
import socket
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np

from pipeline.core import storage_retries
from pipeline.core.config import Config, EmbedConfig
from pipeline.core.errors import ConfigError
from pipeline.core.tasks import ShardTask
from pipeline.distribute.base import WorkerContext
from pipeline.embed.batch import OK, DecodedBatch, EmbeddedBatch, RawSample
from pipeline.embed.decode import BatchDecoder
from pipeline.embed.reader import ShardDamaged, iter_samples, threaded
from pipeline.embed.writer import ShardWriter
from pipeline.models import EmbeddingModel, load_model

log = logging.getLogger(__name__)

_MODEL_CACHE: dict[str, EmbeddingModel] = {}


def get_model(cfg: Config) -> EmbeddingModel:
    """Load the model once per process (local worker or Spark executor) and reuse it across shards."""
    key = json.dumps(cfg.model.model_dump(mode="json"), sort_keys=True)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        t0 = time.perf_counter()
        model = load_model(cfg.model)
        if hasattr(model, "trim_text"):
            model.trim_text = bool(model.trim_text and cfg.embed.trim_text)
        _MODEL_CACHE[key] = model
        if cfg.embed.reuse_memory and model.device.type == "cpu":
            keep_freed_memory()
        name = cfg.model.arch if cfg.model.family == "open_clip" else (cfg.model.path or cfg.model.family)
        log.info("loaded %s model %s in %.1fs on %s", cfg.model.family, name, time.perf_counter() - t0, model.device)
    return _MODEL_CACHE[key]


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks for reuse instead of returning them to the kernel; False where not glibc.

    A CPU forward allocates and frees the same large activations every batch (39 MB for one ViT-B-32 MLP layer at
    batch 64). glibc serves blocks above 32 MB with mmap and gives them back on free, so every batch faulted in
    and zeroed those pages again: ~170,000 page faults per batch, 4% of the time. With mmap off and no trimming,
    the process's heap keeps them and the next batch reuses them; the peak stays what the batch needs.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (raises AttributeError on musl and others)
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def _batched(samples: Iterator[RawSample], size: int) -> Iterator[list[RawSample]]:
    buf: list[RawSample] = []
    try:
        for s in samples:
            buf.append(s)
            if len(buf) == size:
                yield buf
                buf = []
    except ShardDamaged:
        if buf:  # the samples read before the damage are kept
            yield buf
        raise
    if buf:
        yield buf


def embed_batch(
    model: EmbeddingModel,
    batch: DecodedBatch,
    image: bool,
    text: bool,
    model_input: Callable[[Any], Any] | None = None,
) -> EmbeddedBatch:
    """`model_input` turns the decoded pixels into encode_image's input (the uint8 batch normalized on the device)."""
    n = len(batch.rows)
    img = np.zeros((n, model.dim), dtype=np.float32)
    txt = np.zeros((n, model.dim), dtype=np.float32)
    if image and batch.pixels is not None:
        pixels = model_input(batch.pixels) if model_input is not None else batch.pixels
        img[batch.image_rows] = model.encode_image(pixels).numpy()
    if text and batch.tokens is not None:
        txt[batch.text_rows] = model.encode_text(batch.tokens).numpy()
    return EmbeddedBatch(batch.shard_id, batch.rows, img, txt)


def decode_threads(cfg: EmbedConfig, model: EmbeddingModel) -> int:
    """Decode threads per worker process: threads, not processes, by measurement (bench/bench_input.py).

    The uint8 hot loop holds the GIL ~36 us per 256 px sample (row, header checks, geometry, dispatch; libjpeg-turbo,
    the resize and the batch copy run without it), so one worker's threads top out near 27,000 samples/s, above
    what one GPU consumes (ViT-B-32 fp16 ~12,000/s on a 4090), and there is one worker per GPU. A process pool
    would pickle every uint8 batch back: 2 processes cost ~10% more CPU per sample than 2 threads (measured).
    """
    if cfg.decode_threads:
        return cfg.decode_threads
    if model.device.type == "cuda":
        return max(2, (os.cpu_count() or 2) - 1)
    return 2


def decode_idle(cfg: EmbedConfig, model: EmbeddingModel) -> bool:
    """Whether the decode threads take only the cycles the model leaves free (see embed.decode_priority).

    On a CPU model the compute threads already fill every core the worker has: a decode thread at normal priority
    preempts one of them and its partners wait at the next barrier, so decode can cost up to twice its own CPU
    time. At idle priority it runs in the model's gaps, and at worst while the model waits for it, on every core
    at once. (With ViT-B-32 on 2 cores decode is ~4% of the work, so the difference measured within noise.)
    """
    if cfg.decode_priority == "auto":
        return model.device.type == "cpu" and hasattr(os, "SCHED_IDLE")
    return cfg.decode_priority == "idle"


def _idle_thread() -> None:
    """Put the calling thread (on Linux scheduling is per thread) in the SCHED_IDLE class."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError) as e:  # not Linux, or a sandbox that forbids it: normal priority
        log.debug("decode threads keep normal priority: %s", e)


def _draft_size(model: EmbeddingModel, cfg: EmbedConfig) -> int | None:
    if not cfg.draft:
        return None
    size = model.preprocess_info().get("size")
    if isinstance(size, (list, tuple)):
        size = max(size)
    return int(size) if size else None


def _is_open_clip(model: EmbeddingModel) -> bool:
    """Without importing open_clip for a family that does not use it: an OpenClipModel's module is loaded already."""
    module = sys.modules.get("pipeline.models.openclip")
    return module is not None and isinstance(model, module.OpenClipModel)


def uses_uint8(model: EmbeddingModel, cfg: EmbedConfig) -> bool:
    """Whether images go to the model as uint8 crops normalized on its device (embed.preprocess, embed.decode)."""
    from pipeline.embed.transform import unsupported

    if cfg.decode == "device":  # uint8 by construction (check_config refuses embed.preprocess=model with it)
        return True
    if cfg.preprocess == "model":
        return False
    reason = "not an open_clip model" if not _is_open_clip(model) else unsupported(model.preprocess_info())
    if reason and cfg.preprocess == "uint8":
        raise ConfigError(f"embed.preprocess=uint8: {reason}; use embed.preprocess=auto or model")
    return reason is None


def make_decoder(model: EmbeddingModel, cfg: EmbedConfig) -> BatchDecoder:
    """The shard's decoder: the model's tokenizer and, with the uint8 pipeline, the host (and device) decoders that
    reproduce its preprocess config; otherwise the model's own preprocess."""
    host = device_decoder = None
    if cfg.image and uses_uint8(model, cfg):
        from pipeline.embed.hostdecode import HostDecoder
        from pipeline.embed.transform import PixelTransform

        transform = PixelTransform(model.preprocess_info(), model.device)
        margin = cfg.draft_margin if cfg.draft else None
        host = HostDecoder(transform, cfg.max_pixels, margin, pin=model.device.type == "cuda")
        if cfg.decode == "device":
            from pipeline.embed.devicedecode import DeviceDecoder

            device_decoder = DeviceDecoder(transform)
    return BatchDecoder(
        model.preprocess,
        model.tokenize if cfg.text else None,
        cfg.max_pixels,
        tuple(cfg.background),  # type: ignore[arg-type]
        embed_image=cfg.image,
        draft_size=_draft_size(model, cfg),
        device=device_decoder,
        host=host,
    )


def run_shard(
    task: ShardTask,
    model: EmbeddingModel,
    cfg: EmbedConfig,
    attempt: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Embed one shard and commit its files; returns the stats written as its commit marker. `progress` is told the
    samples embedded so far after each batch."""
    started = time.time()
    decoder = make_decoder(model, cfg)
    writer = ShardWriter(task.output, task.shard_id, model.dim, cfg.output_dtype, cfg.write_parquet)
    timings: dict[str, float] = collections.defaultdict(float)
    status_counts = collections.Counter[str]()
    caption_counts = collections.Counter[str]()
    read_error = None
    device_decoded = 0  # images decoded on the model's device (decode=device)
    samples = threaded(iter_samples(task, cfg.image_keys, cfg.caption_keys), 4 * cfg.batch_size, cfg.read_timeout_s)
    pending: collections.deque[Future[DecodedBatch]] = collections.deque()
    workers = decode_threads(cfg, model)

    def consume(fut: Future[DecodedBatch]) -> None:
        nonlocal device_decoded
        t0 = time.perf_counter()
        decoded = fut.result()
        timings["wait_decode"] += time.perf_counter() - t0
        timings["decode"] += decoded.decode_seconds
        device_decoded += decoded.device_decoded
        t0 = time.perf_counter()
        emb = embed_batch(model, decoded, cfg.image, cfg.text, decoder.model_input)
        timings["model"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        writer.write(emb)
        timings["write"] += time.perf_counter() - t0
        for r in emb.rows:
            status_counts[r.status] += 1
            caption_counts[r.caption_status] += 1
        if progress is not None:
            progress(status_counts.total())

    init = _idle_thread if decode_idle(cfg, model) else None
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode", initializer=init) as pool:
        it = _batched(samples, cfg.batch_size)
        try:
            while True:
                t0 = time.perf_counter()
                raw = next(it, None)
                timings["read"] += time.perf_counter() - t0
                if raw is None:
                    break
                pending.append(pool.submit(decoder, task.shard_id, raw))
                # Bounded prefetch: never more decoded batches in memory than prefetch + decode threads.
                while len(pending) > cfg.prefetch + workers - 1:
                    consume(pending.popleft())
        except ShardDamaged as e:
            read_error = str(e)
            log.warning("shard %s is damaged; keeping the samples before the damage: %s", task.shard_id, e)
        while pending:
            consume(pending.popleft())
    stats = {
        "shard": task.shard_id,
        "input": task.input_url,
        "samples": sum(status_counts.values()),
        "ok": status_counts.get(OK, 0),
        "status_counts": dict(status_counts),
        "caption_status_counts": dict(caption_counts),
        "read_error": read_error,
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "started": started,
        "finished": time.time(),
        "attempt": attempt,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "dim": model.dim,
        "members_sha256": task.members_digest(),
    }
    if decoder.device is not None:
        stats["device_decoded"] = device_decoded  # the other ok images took the CPU (Pillow) path
    return writer.close(stats, skip_if_committed=not cfg.overwrite)


def on_device(cfg: Config, device: str | None) -> Config:
    """A copy of cfg whose model runs on the device the distributor assigned (model.device=cpu is kept)."""
    if not device or cfg.model.device == "cpu":
        return cfg
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"device": device})})


def embed_worker(task: ShardTask, cfg: Config, ctx: WorkerContext | None = None) -> dict[str, Any]:
    """The importable worker function every distributor calls for one embed task (ctx: the attempt, device,
    threads and progress callback the distributor gives it)."""
    if cfg.embed.decode == "device":
        from pipeline.embed.devicedecode import check_config

        check_config(cfg)
    with storage_retries.counting() as retried:
        if ctx is None:  # called directly, not by a distributor
            stats = run_shard(task, get_model(cfg), cfg.embed)
        else:
            model = get_model(on_device(cfg, ctx.device))
            if model.device.type == "cpu":
                import torch

                torch.set_num_threads(ctx.threads)  # the cores the distributor gave this attempt
            stats = run_shard(task, model, cfg.embed, ctx.attempt, ctx.progress)
    # what this attempt retried travels back to the driver's summary; the committed stats file does not hold it
    return {**stats, "storage_retries": retried()}
