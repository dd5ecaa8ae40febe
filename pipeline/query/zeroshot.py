"""Zero-shot classification of embedded images: class names x prompt templates -> top-k labels per sample."""

from __future__ import annotations

import collections
import io
import json
import logging
import posixpath
import time
from typing import TYPE_CHECKING, Any, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.config import ModelConfig
from pipeline.core.errors import ConfigError
from pipeline.core.fsio import put_bytes
from pipeline.embed.batch import OK
from pipeline.embed.writer import committed_shards, read_manifest, shard_files

if TYPE_CHECKING:
    from pipeline.core.config import Config
    from pipeline.models import EmbeddingModel

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("a photo of a {}.",)
# The seven templates the CLIP authors kept for ImageNet after template selection; good for CLIP models,
# pointless for the offline ConSE model whose class space is already built from one prompt.
CLIP_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
SUBDIR = "zeroshot"


def zeroshot_path(output: str, shard_id: str) -> str:
    return posixpath.join(output, SUBDIR, f"zeroshot_{shard_id}.parquet")


def _check_inputs(classes: Sequence[str], templates: Sequence[str], k: int) -> None:
    if not classes:
        raise ConfigError("zero-shot: no class names given")
    dupes = [c for c, n in collections.Counter(classes).items() if n > 1]
    if dupes:
        raise ConfigError(f"zero-shot: duplicate class names {dupes[:5]}")
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ConfigError(f"zero-shot: every template needs a '{{}}' for the class name; got {bad or templates!r}")
    if k < 1:
        raise ConfigError(f"zero-shot: k must be >= 1, got {k}")


def class_embeddings(
    model: "EmbeddingModel", classes: Sequence[str], templates: Sequence[str], batch_size: int = 256
) -> np.ndarray:
    """(n_classes, dim): each class's template embeddings averaged and re-normalized (CLIP's prompt ensembling)."""
    texts = [t.replace("{}", c) for c in classes for t in templates]
    parts = [
        model.encode_text(model.tokenize(texts[i : i + batch_size])).numpy() for i in range(0, len(texts), batch_size)
    ]
    emb = np.concatenate(parts).astype(np.float32).reshape(len(classes), len(templates), -1).mean(axis=1)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of each row's k largest scores, best first."""
    k = min(k, scores.shape[1])
    idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part = np.take_along_axis(scores, idx, axis=1)
    order = np.argsort(-part, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(part, order, axis=1)


def model_from_manifest(embed_output_dir: str) -> "EmbeddingModel":
    """The model that made these embeddings, refusing one whose weights have changed since."""
    from pipeline.models import ModelLoadError, load_model, model_fingerprint

    manifest = read_manifest(embed_output_dir)
    if manifest is None or "model_config" not in manifest:
        raise ConfigError(
            f"input={embed_output_dir}: no manifest.json with model_config; expected an embed output folder"
        )
    cfg = ModelConfig.model_validate(manifest["model_config"])
    if model_fingerprint(cfg) != manifest.get("model"):
        raise ModelLoadError(
            f"the model configured in {embed_output_dir}/manifest.json no longer has the weights that made these "
            "embeddings (fingerprint differs); text embeddings would not match the image embeddings"
        )
    return load_model(cfg)


def _classify_shard(
    embed_dir: str, shard_id: str, class_emb: np.ndarray, classes: Sequence[str], k: int
) -> tuple[pa.Table, int]:
    files = shard_files(embed_dir, shard_id)
    with fsspec.open(files.img_emb, "rb") as f:
        img = np.load(io.BytesIO(f.read()), allow_pickle=False)
    with fsspec.open(files.metadata, "rb") as f:
        meta = pq.read_table(f, columns=["key", "status"])
    ok = np.asarray(meta.column("status").to_pylist(), dtype=object) == OK
    ok &= np.abs(img).sum(axis=1) > 0  # a failed image is stored as a zero vector; never classify it
    scores = img[ok].astype(np.float32) @ class_emb.T
    idx, val = top_k(scores, k)
    keys = np.asarray(meta.column("key").to_pylist(), dtype=object)[ok]
    names = np.asarray(classes, dtype=object)
    cols: dict[str, Any] = {"key": pa.array(keys.tolist(), pa.string())}
    for j in range(idx.shape[1]):
        cols[f"label_{j + 1}"] = pa.array(names[idx[:, j]].tolist(), pa.string())
    for j in range(idx.shape[1]):
        cols[f"score_{j + 1}"] = pa.array(val[:, j], pa.float32())
    return pa.table(cols), int((~ok).sum())


def zero_shot(
    embed_output_dir: str,
    classes: Sequence[str],
    templates: Sequence[str] | None = None,
    k: int = 5,
    output: str | None = None,
    model: "EmbeddingModel | None" = None,
) -> dict[str, Any]:
    """Write OUTPUT/zeroshot/zeroshot_{shard}.parquet (key, label_1..k, score_1..k; score = cosine similarity).

    OUTPUT defaults to the embed folder. The text side uses the model recorded in its manifest unless `model`
    is given. Samples whose image failed are left out. Returns a summary with the top-1 label counts.
    """
    templates = list(templates or DEFAULT_TEMPLATES)
    classes = list(classes)
    _check_inputs(classes, templates, k)
    embed_dir = embed_output_dir.rstrip("/")
    out = (output or embed_dir).rstrip("/")
    manifest = read_manifest(embed_dir)
    if manifest is None:
        raise ConfigError(f"input={embed_dir}: no manifest.json; expected an embed output folder")
    if manifest.get("image") is False:
        raise ConfigError(f"input={embed_dir}: embedded with embed.image=false; no image embeddings to classify")
    shards = committed_shards(embed_dir)
    if not shards:
        raise ConfigError(f"input={embed_dir}: no committed embed shards")
    t0 = time.perf_counter()
    model = model or model_from_manifest(embed_dir)
    class_emb = class_embeddings(model, classes, templates)
    counts: collections.Counter[str] = collections.Counter()
    samples = skipped = 0
    fs, _ = fsspec.core.url_to_fs(out)
    for sid in shards:
        table, n_skipped = _classify_shard(embed_dir, sid, class_emb, classes, k)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        put_bytes(fs, zeroshot_path(out, sid), buf.getvalue())
        samples += table.num_rows
        skipped += n_skipped
        counts.update(table.column("label_1").to_pylist())
    info = {
        "classes": classes,
        "templates": templates,
        "k": min(k, len(classes)),
        "model": manifest.get("model"),
        "shards": shards,
        "score": "cosine similarity of image and class text embeddings",
    }
    put_bytes(fs, posixpath.join(out, SUBDIR, "zeroshot.json"), json.dumps(info, indent=1).encode())
    return {
        "output": posixpath.join(out, SUBDIR),
        "shards": len(shards),
        "samples": samples,
        "skipped_failed_images": skipped,
        "classes": len(classes),
        "templates": len(templates),
        "seconds": round(time.perf_counter() - t0, 2),
        "top1_counts": dict(counts.most_common()),
    }


def _read_lines(path: str) -> list[str]:
    with fsspec.open(path, "r") as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def classify_cli(
    cfg: "Config",
    classes: list[str] | None = None,
    templates: list[str] | None = None,
    k: int = 5,
    classes_file: str | None = None,
    templates_file: str | None = None,
) -> str:
    """`clipline classify input=EMBED_DIR [output=DIR] --class cat --class dog [--template ...] [-k 5]`."""
    from pipeline.core.config import require
    from pipeline.models import ModelLoadError

    require(cfg, "input")
    if not isinstance(cfg.input, str):
        raise ConfigError("input: expected one embed output folder")
    names = list(classes or []) + (_read_lines(classes_file) if classes_file else [])
    temps = list(templates or []) + (_read_lines(templates_file) if templates_file else [])
    try:
        summary = zero_shot(cfg.input, names, temps or None, k, output=cfg.output)
    except ModelLoadError as e:  # the recorded model cannot be had here: a setup problem, like in `embed`
        raise ConfigError(str(e)) from e
    lines = [
        f"zero-shot: {summary['samples']} images in {summary['shards']} shards, {summary['classes']} classes x "
        f"{summary['templates']} templates -> {summary['output']} ({summary['seconds']}s)",
    ]
    if summary["skipped_failed_images"]:
        lines.append(f"skipped {summary['skipped_failed_images']} samples whose image failed")
    lines.append("top-1 label counts:")
    width = max((len(c) for c in summary["top1_counts"]), default=0)
    lines += [f"  {label:<{width}}  {n}" for label, n in summary["top1_counts"].items()]
    return "\n".join(lines)
