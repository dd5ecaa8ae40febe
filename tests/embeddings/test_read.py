"""The read side over every input format: listing and pairing, keys and metadata columns, the validity rule and
normalization with their counts, chunked and ranged reads, and the exit-2 refusals of folders that do not align."""

from __future__ import annotations

import io
import re
import typing
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from pipeline.cli.main import main
from pipeline.core.config import EmbeddingsConfig, load_config
from pipeline.core.errors import ConfigError
from pipeline.dedup.stage import dedup
from pipeline.embeddings.read import EmbeddingSet
from pipeline.embeddings.registry import SOURCES, source_for
from pipeline.embeddings.rows import NpyHeader, NpyRows, ParquetRows, read_npy_header
from tests.support.foreign import (
    clip_retrieval_names,
    embedding_array,
    make_samples,
    write_clip_retrieval,
    write_clipline,
    write_npy,
    write_parquet,
)


def opts(**kw: Any) -> EmbeddingsConfig:
    return EmbeddingsConfig(**kw)


@pytest.fixture(scope="module")
def data() -> Any:
    return make_samples(n_shards=3, per_shard=40, dim=16)


def test_registry_names_every_format_of_the_config_and_refuses_others() -> None:
    field = EmbeddingsConfig.model_fields["input_format"].annotation
    assert set(typing.get_args(field)) == set(SOURCES)
    with pytest.raises(ValueError, match="unknown embeddings.input_format 'lance'.*clip-retrieval"):
        source_for("/x", EmbeddingsConfig.model_construct(input_format="lance"), lambda w, f: f())


def test_clip_retrieval_layout_pairs_by_name_and_keys_by_the_named_column(data: Any, tmp_path: Path) -> None:
    root = write_clip_retrieval(str(tmp_path / "cr"), data)
    emb = EmbeddingSet(root, options=opts(input_format="clip-retrieval", key_column="image_path"))
    names = clip_retrieval_names(data)
    assert emb.shards == [names[s] for s in data.shards] and emb.modalities == ["image", "text"] and emb.dim == 16
    for s in data.shards:
        meta = emb.metadata(names[s], ["key", "shard", "index", "caption", "url", "sha256", "clip_score"])
        assert meta["key"].tolist() == data.keys[s] and set(meta["shard"]) == {names[s]}
        assert meta["index"].tolist() == list(range(40)) and meta["caption"].tolist() == data.captions[s]
        assert meta["sha256"].tolist() == data.sha256[s] and meta["clip_score"].isna().all()
        for modality, vecs in (("image", data.img), ("text", data.txt)):
            kept = np.concatenate([c.vectors for c in emb.chunks(names[s], modality)])
            np.testing.assert_array_equal(kept.astype(np.float32), vecs[s])
    # without a key column a row is (file, row number)
    plain = EmbeddingSet(root, options=opts(input_format="clip-retrieval"))
    assert plain.metadata(names[data.shards[1]], ["key"])["key"].tolist() == [str(i) for i in range(40)]


def test_clip_retrieval_shards_sort_as_numbers_and_lone_files_are_not_read(
    data: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "cr"
    for part in ("2", "10", "9"):
        for sub, name, payload in (
            ("img_emb", f"img_emb_{part}.npy", data.img["00000"]),
            ("metadata", f"metadata_{part}.parquet", None),
        ):
            (root / sub).mkdir(parents=True, exist_ok=True)
            if payload is None:
                pd.DataFrame({"image_path": data.keys["00000"]}).to_parquet(root / sub / name)
            else:
                np.save(root / sub / name, payload.astype(np.float16))
    np.save(root / "img_emb" / "img_emb_11.npy", data.img["00001"])  # no metadata_11
    (root / "metadata" / "metadata_3.parquet.tmp-0123456789ab").write_bytes(b"half")
    emb = EmbeddingSet(str(root), options=opts(input_format="clip-retrieval"))
    assert emb.shards == ["2", "9", "10"] and emb.modalities == ["image"]
    assert "img_emb_11.npy" in caplog.text


def test_npy_files_and_a_single_file(data: Any, tmp_path: Path) -> None:
    root = write_npy(str(tmp_path / "npy"), data, "text")
    emb = EmbeddingSet(root, options=opts(input_format="npy", modality="text"))
    assert emb.shards == data.shards and emb.modalities == ["text"] and emb.dtype == np.float32
    r = emb.read("00002", "text", ("key", "shard", "caption"))
    assert r.meta["key"].tolist() == [str(i) for i in range(40)] and r.meta["caption"].isna().all()
    np.testing.assert_array_equal(r.kept(), data.txt["00002"])
    one = EmbeddingSet(f"{root}/00001.npy", options=opts(input_format="npy"))
    assert one.shards == ["00001"] and len(list(one.iter_kept("image"))[0]) == 40
    with pytest.raises(ConfigError, match="output: required when input=.*00001.npy is a file"):
        dedup(load_config([f"input={root}/00001.npy", "embeddings.input_format=npy"]))
    with pytest.raises(ConfigError, match="npy files hold no metadata"):
        EmbeddingSet(root, options=opts(input_format="npy", key_column="key"))


@pytest.mark.parametrize("kind", ["list", "fixed_size_list"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_parquet_embedding_column_kinds_and_dtypes(data: Any, tmp_path: Path, kind: str, dtype: Any) -> None:
    root = write_parquet(str(tmp_path / "pq"), data, kind, dtype, column="vec", row_group_size=15)
    o = opts(input_format="parquet", embedding_column="vec", key_column="uid", columns={"caption": "caption"})
    emb = EmbeddingSet(root, options=o)
    assert emb.shards == data.shards and emb.dim == 16 and emb.dtype == np.dtype(dtype)
    for s in data.shards:
        chunks = list(EmbeddingSet(root, options=o.model_copy(update={"chunk_rows": 7})).chunks(s, "image"))
        assert max(len(c.rows) for c in chunks) <= 7
        assert np.concatenate([c.meta["key"] for c in chunks]).tolist() == data.keys[s]
        np.testing.assert_array_equal(np.concatenate([c.vectors for c in chunks]).astype(np.float32), data.img[s])
    rows = np.array([39, 0, 16, 15, 14, 16])  # across row groups, unsorted, repeated
    np.testing.assert_array_equal(emb.vectors("00001", "image")[rows].astype(np.float32), data.img["00001"][rows])


def test_zero_nonfinite_and_unnormalized_rows_are_skipped_normalized_and_counted(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32) * 3  # nothing unit-norm
    x[2] = 0
    x[5, 3] = np.nan
    x[7, 0] = np.inf
    (tmp_path / "v").mkdir()
    np.save(tmp_path / "v" / "a.npy", x)
    emb = EmbeddingSet(str(tmp_path / "v"), options=opts(input_format="npy"))
    r = emb.read("a", "image", ("key",))
    assert r.rows.tolist() == [0, 1, 3, 4, 6, 8, 9]
    kept = r.kept()
    np.testing.assert_allclose(np.linalg.norm(kept, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(kept, x[r.rows] / np.linalg.norm(x[r.rows], axis=1, keepdims=True), rtol=1e-6)
    again = list(emb.chunks("a", "image"))  # a shard read twice is counted once
    assert [c.meta["key"].tolist() for c in again] == [["0", "1", "3", "4", "6", "8", "9"]]
    assert emb.report() == {
        "input_format": "npy",
        "skipped_zero_vectors": 1,
        "skipped_nonfinite_vectors": 2,
        "normalized_vectors": 7,
    }


def test_clipline_format_keeps_its_status_rule(tmp_path: Path) -> None:
    data = make_samples(n_shards=2, per_shard=40, dim=8)
    root = write_clipline(str(tmp_path / "emb"), data)
    emb = EmbeddingSet(root)
    assert emb.input_format == "clipline" and emb.model is not None and emb.read("00000", "image").valid.all()


def test_a_folder_without_manifest_names_the_format_it_looks_like(data: Any, tmp_path: Path) -> None:
    root = write_clip_retrieval(str(tmp_path / "cr"), data)
    with pytest.raises(ConfigError, match="no manifest.json.*input_format=clip-retrieval"):
        EmbeddingSet(root)
    with pytest.raises(ConfigError, match="holds .npy files: set embeddings.input_format=npy"):
        EmbeddingSet(write_npy(str(tmp_path / "npy"), data))


# ---- refusals: exit 2, naming the files, nothing written --------------------------------------------------


def _misaligned(data: Any, root: Path) -> Path:
    write_clip_retrieval(str(root), data)
    np.save(root / "img_emb" / "img_emb_1.npy", data.img["00001"][:-1].astype(np.float16))  # one vector short
    return root


def _mis_sized(data: Any, root: Path) -> Path:
    write_npy(str(root), data)
    np.save(root / "00002.npy", np.ones((40, 24), np.float32))
    return root


@pytest.mark.parametrize("command", ["index", "dedup"])
@pytest.mark.parametrize(
    "broken, fmt, message",
    [
        (_misaligned, "clip-retrieval", r"metadata_1.parquet has 40 rows but .*img_emb_1.npy has 39 vectors"),
        (_mis_sized, "npy", r"00000.npy has width 16, .*00002.npy has width 24"),
    ],
    ids=["misaligned", "mis-sized"],
)
def test_inputs_that_do_not_align_exit_2_before_anything_is_written(
    data: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, broken: Any, fmt: str, message: str
) -> None:
    root = broken(data, tmp_path / "in")
    out = tmp_path / "out"
    before = sorted(p for p in root.rglob("*"))
    assert main([command, f"input={root}", f"output={out}", f"embeddings.input_format={fmt}"]) == 2
    err = capsys.readouterr().err
    assert f"clipline {command}:" in err
    assert re.search(message, err), err
    assert not out.exists() and sorted(p for p in root.rglob("*")) == before


def test_parquet_refusals_name_the_file(data: Any, tmp_path: Path) -> None:
    root = write_parquet(str(tmp_path / "pq"), data, "list", np.float32)
    with pytest.raises(ConfigError, match=r"00000.parquet has no embedding column 'emb'"):
        EmbeddingSet(root, options=opts(input_format="parquet", embedding_column="emb"))
    with pytest.raises(ConfigError, match=r"00000.parquet has no column 'key' \(it has uid, caption"):
        EmbeddingSet(root, options=opts(input_format="parquet", key_column="key"))
    with pytest.raises(ConfigError, match="embeddings.columns: title are not columns stages use"):
        EmbeddingSet(root, options=opts(input_format="parquet", columns={"title": "caption"}))
    bad = data.img["00001"].tolist()
    bad[6] = bad[6][:-1]
    pq.write_table(pa.table({"uid": data.keys["00001"], "embedding": bad}), f"{root}/00001.parquet")
    emb = EmbeddingSet(root, options=opts(input_format="parquet"))
    with pytest.raises(
        ConfigError, match=r"00001.parquet \(embedding\): row 6 has a vector of 15 values, the others 16"
    ):
        emb.read("00001", "image")
    pq.write_table(pa.table({"embedding": pa.array([["a"]])}), f"{root}/00002.parquet")
    with pytest.raises(ConfigError, match=r"00002.parquet: column 'embedding' holds string, expected float16"):
        EmbeddingSet(root, options=opts(input_format="parquet"))


def test_null_vectors_in_parquet_are_missing_rows(data: Any, tmp_path: Path) -> None:
    vecs = data.img["00000"][:5]
    arr = pa.array([v if i not in (1, 4) else None for i, v in enumerate(vecs.tolist())], pa.list_(pa.float32()))
    pq.write_table(pa.table({"embedding": arr}), tmp_path / "a.parquet")
    emb = EmbeddingSet(str(tmp_path / "a.parquet"), options=opts(input_format="parquet"))
    r = emb.read("a", "image")
    assert r.rows.tolist() == [0, 2, 3] and emb.report()["skipped_zero_vectors"] == 2
    np.testing.assert_array_equal(r.kept(), vecs[[0, 2, 3]])


# ---- reading in place -----------------------------------------------------------------------------------


class CountingFS(MemoryFileSystem):
    """memory:// that counts the bytes files hand out (the ranged reads an object store would serve)."""

    protocol = ("countmem",)
    store: dict[str, Any] = {}
    pseudo_dirs = [""]
    read_bytes = 0

    def _open(self, path: str, mode: str = "rb", **kw: Any) -> Any:
        f = super()._open(path, mode, **kw)
        if "r" in mode and not hasattr(f, "counted"):  # memory:// hands out the same file object again
            f.counted = True
            inner = f.read

            def read(n: int = -1) -> bytes:
                data = inner(n)
                CountingFS.read_bytes += len(data)
                return bytes(data)

            f.read = read
        return f


fsspec.register_implementation("countmem", CountingFS, clobber=True)


def test_remote_npy_rows_are_read_by_range_and_only_those_asked_for() -> None:
    x = np.arange(1000 * 64, dtype=np.float32).reshape(1000, 64)
    buf = io.BytesIO()
    np.save(buf, x)
    fs = fsspec.filesystem("countmem")
    fs.pipe("/big.npy", buf.getvalue())
    header = read_npy_header(fs, "/big.npy")
    assert header == NpyHeader((1000, 64), np.dtype("float32"), 128, False)
    rows = NpyRows(fs, "/big.npy", header, lambda what, fn: fn())
    CountingFS.read_bytes = 0
    np.testing.assert_array_equal(rows[100:110], x[100:110])
    assert CountingFS.read_bytes == 10 * 64 * 4  # one ranged read of exactly those rows
    picks = np.array([999, 3, 500, 3, 4])
    np.testing.assert_array_equal(rows[picks], x[picks])
    mask = np.zeros(1000, bool)
    mask[[1, 998]] = True
    np.testing.assert_array_equal(rows[mask], x[mask])
    with pytest.raises(IndexError):
        rows[np.array([1000])]


def test_parquet_rows_read_one_row_group_at_a_time(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32)
    pq.write_table(pa.table({"e": embedding_array(x, "list")}), tmp_path / "a.parquet", row_group_size=30)
    fs = fsspec.filesystem("file")
    rows = ParquetRows(fs, str(tmp_path / "a.parquet"), "e", 8, lambda what, fn: fn())
    assert len(rows) == 100 and rows.group_starts.tolist() == [0, 30, 60, 90, 100]
    np.testing.assert_array_equal(rows[25:35], x[25:35])
    assert rows._last is not None and rows._last[0] == 1 and len(rows._last[1]) == 30


def test_named_shards_open_without_listing_the_folder(data: Any, tmp_path: Path) -> None:
    root = _misaligned(data, tmp_path / "cr")  # the folder as a whole would be refused
    emb = EmbeddingSet(str(root), options=opts(input_format="clip-retrieval", key_column="image_path"), shards=["2"])
    np.testing.assert_array_equal(emb.vector("2", 4, "image"), data.img["00002"][4])


@pytest.mark.parametrize("where", ["local", "memory"])
def test_streaming_a_file_holds_a_few_chunks_not_the_file(where: str, tmp_path: Path) -> None:
    """Peak of what Python and numpy allocate (tracemalloc) while every vector of a 20 MiB file streams through:
    set by embeddings.chunk_rows, not by the file's size."""
    import tracemalloc

    x = np.random.default_rng(0).standard_normal((40_000, 256)).astype(np.float16)  # not unit-norm: all normalized
    root = str(tmp_path / "v") if where == "local" else f"memory://bounded-{tmp_path.name}"
    fs, path = fsspec.core.url_to_fs(root)
    fs.makedirs(path, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, x)
    fs.pipe(f"{path}/a.npy", buf.getvalue())
    del buf
    emb = EmbeddingSet(root, options=opts(input_format="npy", chunk_rows=1024))
    chunk_bytes = 1024 * 256 * 4
    tracemalloc.start()
    try:
        rows = sum(len(v) for v in emb.iter_kept("image"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rows == 40_000 and emb.report()["normalized_vectors"] == 40_000
    assert peak < 8 * chunk_bytes < x.nbytes / 2, (peak, chunk_bytes, x.nbytes)
