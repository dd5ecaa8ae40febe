"""Zero-shot classification of embedded images (clipline's or another tool's, `embeddings.*`): class names x prompt
templates -> top-k labels per sample."""

from __future__ import annotations

import collections
import logging
import posixpath
import time
from typing import TYPE_CHECKING, Any, Sequence

import fsspec
import numpy as np
import pyarrow as pa

from pipeline.core.errors import ConfigError
from pipeline.core.fsio import put_json, put_parquet
from pipeline.embeddings.read import EmbeddingSet, needs_output

if TYPE_CHECKING:
    from pipeline.core.config import Config, EmbeddingsConfig, ModelConfig
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


def model_for(emb: EmbeddingSet, given: "ModelConfig | None" = None) -> "EmbeddingModel":
    """The model that made these embeddings (clipline's manifest; refused if its weights changed since), else for
    embeddings that record none `given` (model.*); its width checked against the vectors' before any work."""
    from pipeline.embeddings.modelcheck import check_width, load_for
    from pipeline.models import load_recorded

    if emb.input_format == "clipline":  # its manifest names the model, always
        where = f"{emb.folder}/manifest.json"
        model = load_recorded(emb.manifest.get("model_config"), emb.model, where)
        check_width(model.dim, str(emb.model), emb.dim, where)
        return model
    return load_for(None, None, f"input={emb.folder}", given, emb.dim)


def _classify_shard(
    emb: EmbeddingSet, shard_id: str, class_emb: np.ndarray, classes: Sequence[str], k: int
) -> tuple[pa.Table, int]:
    names = np.asarray(classes, dtype=object)
    keys, idx, val, rows = [], [], [], 0
    for chunk in emb.chunks(shard_id, "image", ("key",)):  # a chunk at a time: large foreign files stay bounded
        i, v = top_k(chunk.vectors.astype(np.float32) @ class_emb.T, k)
        keys.append(chunk.meta["key"].to_numpy(object))
        idx.append(i)
        val.append(v)
        rows += len(chunk.rows)
    kk = min(k, len(classes))
    idx_a = np.concatenate(idx) if idx else np.zeros((0, kk), np.int64)
    val_a = np.concatenate(val) if val else np.zeros((0, kk), np.float32)
    cols: dict[str, Any] = {"key": pa.array(np.concatenate(keys).tolist() if keys else [], pa.string())}
    for j in range(idx_a.shape[1]):
        cols[f"label_{j + 1}"] = pa.array(names[idx_a[:, j]].tolist(), pa.string())
    for j in range(idx_a.shape[1]):
        cols[f"score_{j + 1}"] = pa.array(val_a[:, j], pa.float32())
    counts = emb.counts[(shard_id, "image")]
    return pa.table(cols), counts.rows - rows


def zero_shot(
    embed_output_dir: str,
    classes: Sequence[str],
    templates: Sequence[str] | None = None,
    k: int = 5,
    output: str | None = None,
    model: "EmbeddingModel | None" = None,
    options: "EmbeddingsConfig | None" = None,
    model_config: "ModelConfig | None" = None,
) -> dict[str, Any]:
    """Write OUTPUT/zeroshot/zeroshot_{shard}.parquet (key, label_1..k, score_1..k; score = cosine similarity).

    OUTPUT defaults to the embeddings folder. `options` (embeddings.*) picks the input format. The text side uses
    `model` when given, else the model recorded in the manifest, else (embeddings clipline did not write)
    `model_config`. Samples whose image failed are left out. Returns a summary with the top-1 label counts.
    """
    templates = list(templates or DEFAULT_TEMPLATES)
    classes = list(classes)
    _check_inputs(classes, templates, k)
    emb = EmbeddingSet(embed_output_dir, options=options)
    needs_output(emb.folder, output)
    out = (output or emb.folder).rstrip("/")
    if "image" not in emb.modalities:
        raise ConfigError(f"input={emb.folder}: holds no image embeddings to classify ({emb.modalities} only)")
    shards = emb.shards
    t0 = time.perf_counter()
    if model is None:
        model = model_for(emb, model_config)
    else:
        from pipeline.embeddings.modelcheck import check_width

        check_width(model.dim, type(model).__name__, emb.dim, f"input={emb.folder}")
    class_emb = class_embeddings(model, classes, templates)
    counts: collections.Counter[str] = collections.Counter()
    samples = skipped = 0
    for sid in shards:
        table, n_skipped = _classify_shard(emb, sid, class_emb, classes, k)
        put_parquet(zeroshot_path(out, sid), table)
        samples += table.num_rows
        skipped += n_skipped
        counts.update(table.column("label_1").to_pylist())
    info = {
        "classes": classes,
        "templates": templates,
        "k": min(k, len(classes)),
        "model": emb.model or (model_config and _fingerprint(model_config)),
        "input": emb.describe(),
        "shards": shards,
        "score": "cosine similarity of image and class text embeddings",
    }
    put_json(posixpath.join(out, SUBDIR, "zeroshot.json"), info)
    return {
        "output": posixpath.join(out, SUBDIR),
        "shards": len(shards),
        "samples": samples,
        "skipped_failed_images": skipped,
        "classes": len(classes),
        "templates": len(templates),
        "seconds": round(time.perf_counter() - t0, 2),
        "input": emb.report(),
        "top1_counts": dict(counts.most_common()),
    }


def _fingerprint(cfg: "ModelConfig") -> dict[str, Any]:
    from pipeline.models import model_fingerprint

    return model_fingerprint(cfg)


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
        summary = zero_shot(
            cfg.input, names, temps or None, k, output=cfg.output, options=cfg.embeddings, model_config=cfg.model
        )
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
