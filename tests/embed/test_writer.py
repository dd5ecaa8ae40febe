"""The output format: write-then-read-back, commit protocol, leftovers, manifest checks (local and memory://)."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.embed.batch import EmbeddedBatch, SampleRow
from pipeline.embed.writer import (
    ShardWriter,
    check_or_write_manifest,
    remove_uncommitted,
    sweep_temporary,
    uncommitted_leftovers,
)
from pipeline.embeddings.layout import ManifestMismatch, committed_shards, shard_files


def _rows(n: int, status: str = "ok") -> list[SampleRow]:
    return [SampleRow(f"k{i}", i, f"c{i}", f"u{i}", f"s{i}", 8, 8, status, None, "ok") for i in range(n)]


def _batch(n: int, dim: int = 4) -> EmbeddedBatch:
    v = np.eye(n, dim, dtype=np.float32)
    return EmbeddedBatch("00007", _rows(n), v, v)


@pytest.mark.parametrize("root", ["local", "memory"])
def test_write_then_read_back(root: str, tmp_path) -> None:
    out = str(tmp_path / "out") if root == "local" else "memory://writer-test/out"
    w = ShardWriter(out, "00007", dim=4, dtype="float16", write_parquet=True)
    w.write(_batch(3))
    w.write(_batch(2))
    stats = w.close({"shard": "00007", "samples": 5})
    assert stats["rows"] == 5
    files = shard_files(out, "00007")
    with fsspec.open(files.img_emb, "rb") as f:
        img = np.load(f, allow_pickle=False)
    assert img.shape == (5, 4) and img.dtype == np.float16
    with fsspec.open(files.metadata, "rb") as f:
        meta = pq.read_table(f)
    assert meta.column("key").to_pylist() == ["k0", "k1", "k2", "k0", "k1"]
    assert meta.column("shard").to_pylist() == ["00007"] * 5
    assert np.allclose(meta.column("clip_score").to_numpy(), 1.0)
    with fsspec.open(files.parquet, "rb") as f:
        par = pq.read_table(f)
    assert par.schema.field("embedding").type.list_size == 4
    with fsspec.open(files.stats, "r") as f:
        assert json.load(f)["rows"] == 5
    assert committed_shards(out) == ["00007"]


def test_clip_score_nan_when_a_modality_is_missing() -> None:
    img = np.eye(2, 4, dtype=np.float32)
    txt = np.zeros((2, 4), dtype=np.float32)
    b = EmbeddedBatch("s", _rows(2), img, txt)
    assert np.isnan(b.clip_scores()).all()


def test_uncommitted_files_are_not_shards(tmp_path) -> None:
    out = str(tmp_path)
    files = shard_files(out, "00001")
    for p in (files.img_emb, files.metadata):
        fsspec.filesystem("file").makedirs(p.rsplit("/", 1)[0], exist_ok=True)
        open(p, "wb").write(b"partial")
    open(files.img_emb + ".tmp-abc", "wb").write(b"x")
    assert committed_shards(out) == []
    assert sorted(uncommitted_leftovers(out)) == sorted([files.img_emb, files.metadata])
    assert sweep_temporary(out) == 1 and remove_uncommitted(out) == 2
    assert uncommitted_leftovers(out) == []


def test_manifest_mismatch_is_refused(tmp_path) -> None:
    m = {
        "format_version": 1,
        "model": {"arch": "a", "checkpoint_sha256": "1"},
        "output_dtype": "float16",
        "image": True,
        "text": True,
        "normalized": True,
    }
    check_or_write_manifest(str(tmp_path), m)
    check_or_write_manifest(str(tmp_path), dict(m, created="later"))  # same identity: fine
    # Nothing committed yet: a different model may still take the folder over (a failed first run binds nothing).
    check_or_write_manifest(str(tmp_path), dict(m, model={"arch": "b"}))
    check_or_write_manifest(str(tmp_path), m)
    w = ShardWriter(str(tmp_path), "00000", dim=4)
    w.write(_batch(2))
    w.close({"shard": "00000"})
    with pytest.raises(ManifestMismatch, match="model"):
        check_or_write_manifest(str(tmp_path), dict(m, model={"arch": "a", "checkpoint_sha256": "2"}))
    with pytest.raises(ManifestMismatch, match="output_dtype"):
        check_or_write_manifest(str(tmp_path), dict(m, output_dtype="float32"))


def test_misaligned_rows_refused(tmp_path) -> None:
    w = ShardWriter(str(tmp_path), "00000", dim=4)
    b = _batch(3)
    b.text_emb = b.text_emb[:2]
    with pytest.raises(RuntimeError, match="not aligned"):
        w.write(b)
    assert committed_shards(str(tmp_path)) == []


def test_empty_shard_commits_stats_only(tmp_path) -> None:
    out = str(tmp_path)
    ShardWriter(out, "00000", dim=4).close({"shard": "00000"})
    w = ShardWriter(out, "00001", dim=4)
    w.write(_batch(2))
    w.close({"shard": "00001"})
    assert committed_shards(out, include_empty=True) == ["00000", "00001"]
    assert committed_shards(out) == ["00001"]  # readers only see shards with data
    assert not (tmp_path / "img_emb" / "img_emb_00000.npy").exists()
    assert uncommitted_leftovers(out) == []
