"""clipline's embed output on disk: every file name (built here and parsed back here), the metadata schema, the commit
markers and the manifest. The embed writer writes these files and every later stage reads them, both through this
module.

OUTPUT/
  img_emb/img_emb_{shard}.npy       float16 [n, d], L2-normalized, row i = metadata row i (zero where it failed)
  text_emb/text_emb_{shard}.npy     same for captions
  metadata/metadata_{shard}.parquet METADATA_SCHEMA
  parquet/{shard}.parquet           optional: metadata plus an `embedding` column (embed.write_parquet)
  stats/stats_{shard}.json          the commit marker, written last: a shard is done when it exists
  manifest.json                     the model and format every shard of the folder was made with

The names are clip-retrieval's, so embedding-reader, autofaiss and clip-retrieval's tools read the folder unchanged.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa

from pipeline.core.fsio import is_temporary, read_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"

METADATA_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("index", pa.int32()),
        ("caption", pa.string()),
        ("url", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("clip_score", pa.float32()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("caption_status", pa.string()),
    ]
)

# kind -> (subfolder, file name prefix, suffix); the only place the names are spelled
KINDS: dict[str, tuple[str, str, str]] = {
    "img_emb": ("img_emb", "img_emb_", ".npy"),
    "text_emb": ("text_emb", "text_emb_", ".npy"),
    "metadata": ("metadata", "metadata_", ".parquet"),
    "parquet": ("parquet", "", ".parquet"),
    "stats": ("stats", "stats_", ".json"),
}
DATA_KINDS = ("img_emb", "text_emb", "metadata", "parquet")
VECTOR_KIND = {"image": "img_emb", "text": "text_emb"}


@dataclass(frozen=True)
class ShardFiles:
    """Every path one output shard owns."""

    img_emb: str
    text_emb: str
    metadata: str
    parquet: str
    stats: str

    def vectors(self, modality: str) -> str:
        return str(getattr(self, VECTOR_KIND[modality]))


def file_name(kind: str, shard_id: str) -> str:
    sub, prefix, suffix = KINDS[kind]
    return f"{sub}/{prefix}{shard_id}{suffix}"


def shard_files(output: str, shard_id: str) -> ShardFiles:
    return ShardFiles(**{k: posixpath.join(output, file_name(k, shard_id)) for k in KINDS})


def parse_name(path: str) -> tuple[str, str] | None:
    """(kind, shard id) of a path inside an embed output; None for anything else (temporary files included)."""
    if is_temporary(path):
        return None
    parts = path.rstrip("/").split("/")
    if len(parts) < 2:
        return None
    folder, name = parts[-2], parts[-1]
    for kind, (sub, prefix, suffix) in KINDS.items():
        if folder == sub and name.startswith(prefix) and name.endswith(suffix) and len(name) > len(prefix + suffix):
            return kind, name[len(prefix) : -len(suffix)]
    return None


def list_kind(output: str, kind: str) -> dict[str, str]:
    """shard id -> path of every final-named file of one kind (one listing of its subfolder)."""
    fs, root = fsspec.core.url_to_fs(output)
    folder = posixpath.join(root, KINDS[kind][0])
    try:
        names = fs.ls(folder, detail=False)  # one LIST; a separate existence check would cost two more on S3
    except FileNotFoundError:
        return {}
    out = {}
    for p in names:
        parsed = parse_name(p)
        if parsed is not None and parsed[0] == kind:
            out[parsed[1]] = p
    return out


def committed_shards(output: str, include_empty: bool = False) -> list[str]:
    """Shard ids whose stats file (the commit marker, written last) exists, sorted.

    A shard whose input held no sample commits a stats file only (no data files: embedding-reader's
    parquet_npy mode would pair the following shards with the wrong metadata). Readers of embeddings get
    only shards with data; the embed driver asks for empty ones too, so it does not redo them.
    """
    done = sorted(list_kind(output, "stats"))
    if include_empty or not done:
        return done
    with_data = list_kind(output, "metadata")
    return [s for s in done if s in with_data]


def read_stats(output: str, shard_id: str) -> dict[str, Any]:
    stats = read_json(shard_files(output, shard_id).stats)
    if stats is None:
        raise FileNotFoundError(f"{output}: shard {shard_id} is not committed (no stats file)")
    return stats  # type: ignore[no-any-return]


# ---- manifest -------------------------------------------------------------------------------------------


class ManifestMismatch(ValueError):
    """The output folder was made with a different model, preprocessing or dtype, or its manifest is unreadable."""


def new_manifest(
    model: dict[str, Any],
    model_config: dict[str, Any],
    output_dtype: str = "float16",
    image: bool = True,
    text: bool = True,
) -> dict[str, Any]:
    """The manifest of an embed output: the one place its fields are spelled."""
    return {
        "format_version": FORMAT_VERSION,
        "model": model,
        "model_config": model_config,
        "output_dtype": output_dtype,
        "image": image,
        "text": text,
        "normalized": True,
        "failed_rows": "zero vector; see metadata status / caption_status",
    }


def manifest_path(output: str) -> str:
    return posixpath.join(output, MANIFEST)


def read_manifest(output: str) -> dict[str, Any] | None:
    try:
        return read_json(manifest_path(output))  # type: ignore[no-any-return]
    except ValueError as e:
        raise ManifestMismatch(
            f"{manifest_path(output)} is not valid JSON ({e}); restore it or use a new output"
        ) from e


def manifest_identity(m: dict[str, Any]) -> dict[str, Any]:
    """The fields that must match for two runs to write into the same output."""
    return {k: m.get(k) for k in ("format_version", "model", "output_dtype", "image", "text", "normalized")}


def manifest_difference(existing: dict[str, Any], requested: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Identity fields that differ: name -> (existing, requested); empty when the two describe the same embeddings."""
    old, new = manifest_identity(existing), manifest_identity(requested)
    return {k: (old[k], new[k]) for k in old if old[k] != new[k]}
