"""A foreign folder read through an `s3://` URL (moto's S3 server on 127.0.0.1, s3fs): dedup, index and a key query
give the results of the same folder on local disk, and vectors come by ranged reads, not whole-file downloads."""

from __future__ import annotations

from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import EmbeddingsConfig, load_config
from pipeline.dedup.stage import dedup
from pipeline.embeddings.read import EmbeddingSet
from pipeline.embeddings.rows import NpyRows
from pipeline.index.stage import build
from pipeline.query.search import Searcher
from tests.support import s3
from tests.support.foreign import make_samples, write_clip_retrieval, write_parquet

moto_endpoint, s3_server, s3_bucket = s3.moto_endpoint, s3.s3_server, s3.s3_bucket  # shared fixtures, by name

OPTIONS = ["embeddings.input_format=clip-retrieval", "embeddings.key_column=image_path", "log_level=WARNING"]


@pytest.mark.slow
def test_clip_retrieval_folder_on_s3_equals_the_local_copy(s3_bucket: str, tmp_path: Path) -> None:
    data = make_samples(n_shards=3, per_shard=50, dim=32)
    url = write_clip_retrieval(f"s3://{s3_bucket}/laion", data)
    local = write_clip_retrieval(str(tmp_path / "laion"), data)
    fsspec.filesystem("s3").invalidate_cache()

    emb = EmbeddingSet(url, options=EmbeddingsConfig(input_format="clip-retrieval", key_column="image_path"))
    assert emb.shards == ["0", "1", "2"] and emb.modalities == ["image", "text"]
    assert isinstance(emb.vectors("1", "image"), NpyRows)  # read in place by range, not downloaded whole
    np.testing.assert_array_equal(emb.vector("1", 5, "image"), data.img["00001"][5])

    for where, inp in (("s3", url), ("local", local)):
        dedup(load_config([f"input={inp}", f"output={tmp_path / where / 'dedup'}", "dedup.mode=exact", *OPTIONS]))
        build(load_config([f"input={inp}", f"output={tmp_path / where / 'index'}", "index.recall_queries=20",
                           "index.nb_cores=1", "embeddings.record_model=false", *OPTIONS]))  # fmt: skip
    for name in ("duplicates", "keep", "drop"):
        a, b = (pd.read_parquet(tmp_path / w / "dedup" / f"{name}.parquet") for w in ("s3", "local"))
        pd.testing.assert_frame_equal(a, b)
    assert len(pd.read_parquet(tmp_path / "s3" / "dedup" / "duplicates.parquet")) == 5
    for m in ("image", "text"):
        a, b = (pd.read_parquet(tmp_path / w / "index" / f"{m}_ids.parquet") for w in ("s3", "local"))
        pd.testing.assert_frame_equal(a, b)
    # a key query reads its stored vector back from S3 with the format options the index recorded
    key = data.keys["00001"][5]
    hits = Searcher(str(tmp_path / "s3" / "index")).search_key([key], k=3)
    assert hits["key"].iloc[0] == key and data.keys["00000"][7] in set(hits["key"])


@pytest.mark.parametrize("kind", ["list", "fixed_size_list"])
def test_parquet_on_s3_is_read_a_row_group_at_a_time(s3_bucket: str, kind: str) -> None:
    data = make_samples(n_shards=2, per_shard=40, dim=16)
    url = write_parquet(f"s3://{s3_bucket}/pq", data, kind, np.float16, row_group_size=15)
    fsspec.filesystem("s3").invalidate_cache()
    emb = EmbeddingSet(url, options=EmbeddingsConfig(input_format="parquet", key_column="uid", chunk_rows=10))
    got = [c for s in emb.shards for c in emb.chunks(s, "image")]
    assert max(len(c.rows) for c in got) <= 10
    assert np.concatenate([c.meta["key"] for c in got]).tolist() == data.keys["00000"] + data.keys["00001"]
    np.testing.assert_array_equal(
        np.concatenate([c.vectors for c in got]).astype(np.float32), np.concatenate([data.img[s] for s in emb.shards])
    )
