"""Writing dedup results: streamed tar filtering, the materialized dataset end to end, atomic tables, histogram."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import load_config
from pipeline.core.errors import ConfigError
from pipeline.dedup.materialize import filter_tar, member_key, tar_shards, write_histogram
from pipeline.dedup.stage import dedup
from tests.support.helpers import make_shards, random_unit, write_fake_embed_output, write_tar


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t if m.isfile()}  # type: ignore[union-attr]


def tar_keys(path: Path) -> set[str]:
    return {member_key(n) for n in tar_members(path)}  # type: ignore[misc]


def test_filter_tar_keeps_only_listed_samples_byte_for_byte(tmp_path: Path) -> None:
    src = write_tar(
        tmp_path / "in.tar",
        [(f"dir/s{i}", {"jpg": bytes([i]) * 100, "txt": b"c%d" % i, "json": b"{}"}) for i in range(6)],
    )
    counts = filter_tar(str(src), str(tmp_path / "out" / "x.tar"), {"s1", "s4", "s5"})
    assert counts == {"samples_kept": 3, "samples_removed": 3}
    before, after = tar_members(src), tar_members(tmp_path / "out" / "x.tar")
    assert sorted(after) == sorted(n for n in before if n.split("/")[1].split(".")[0] in {"s1", "s4", "s5"})
    assert all(after[n] == before[n] for n in after)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x.tar"]


def test_filter_tar_failure_leaves_no_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(tarfile.TarError):
        filter_tar(str(bad), str(tmp_path / "out" / "x.tar"), {"a"})
    assert not list((tmp_path / "out").iterdir())


def test_materialized_dataset_holds_each_group_once(tmp_path: Path) -> None:
    tars = make_shards(tmp_path / "shards", n_shards=2, per_shard=12)
    # embeddings of the same keys (00000iiii / 00001iiii) with planted groups across both shards
    x = random_unit(24, 32, seed=3)
    x[14] = x[2]
    x[20] = x[2]
    x[7] = x[5] * 0.99 + 0.01 * x[6]
    root = write_fake_embed_output(tmp_path / "emb", {"00000": x[:12], "00001": x[12:]})
    out = tmp_path / "dedup"
    s = dedup(
        load_config([f"input={root}", f"output={out}", "dedup.materialize=true", f"dedup.shards={tmp_path / 'shards'}"])
    )
    keep = pd.read_parquet(out / "keep.parquet")
    assert set(pd.read_parquet(out / "drop.parquet")["key"]) == {"000000007", "000010002", "000010008"}
    written = tar_keys(out / "shards" / "00000.tar") | tar_keys(out / "shards" / "00001.tar")
    assert written == set(keep["key"]) and len(written) == 21
    assert "000000002" in written and "000000005" in written  # each group once: its survivor
    # every field of a kept sample is copied unchanged
    orig = tar_members(tars[1])
    assert all(
        tar_members(out / "shards" / "00001.tar")[n] == orig[n] for n in tar_members(out / "shards" / "00001.tar")
    )
    urls = pd.read_parquet(out / "urls.parquet")
    assert list(urls.columns) == ["key", "url", "caption"] and set(urls["key"]) == set(keep["key"])
    assert s["materialized"] == {"shards": 2, "samples_kept": 21, "samples_removed": 3, "urls": 21}


def test_member_key_follows_webdataset() -> None:
    from webdataset.tariterators import base_plus_ext

    for name in ["a/b/000.jpg", "000.json", "x.y.z", "noext", "dir.v1/key.tar.gz", "./k.jpg", "a/.hidden", "k."]:
        prefix, _ = base_plus_ext(name)
        assert member_key(name) == (prefix.rsplit("/", 1)[-1] if prefix is not None else None), name


def test_tar_shards_maps_ids_and_ignores_other_files(tmp_path: Path) -> None:
    make_shards(tmp_path, n_shards=2, per_shard=1)
    (tmp_path / "00000.parquet").write_bytes(b"x")
    (tmp_path / "00000_stats.json").write_text("{}")
    assert sorted(tar_shards(str(tmp_path))) == ["00000", "00001"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.parquet").write_bytes(b"x")
    with pytest.raises(ConfigError, match="dedup.shards"):
        tar_shards(str(tmp_path / "empty"))


def test_histogram_counts_every_finite_similarity_and_marks_the_threshold(tmp_path: Path) -> None:
    from PIL import Image

    body = np.random.default_rng(0).uniform(0.2, 0.9, 500)
    sims = np.concatenate([body, [0.97, 0.99, -np.inf]]).astype(np.float32)  # -inf: a sample with no neighbour
    counts, edges = write_histogram(sims, 0.95, str(tmp_path / "h.png"), "exact")
    assert len(counts) == 100 and len(edges) == 101 and edges[-1] == 1.0
    assert edges[0] == 0.0  # the axis spans [0, 1] for non-negative similarities
    assert counts.sum() == 502  # every finite value drawn once, the sample without a neighbour left out
    above = edges[:-1] >= 0.95
    assert counts[above].sum() == 2 and counts[(edges[:-1] >= 0.9) & ~above].sum() == 0
    np.testing.assert_array_equal(counts, np.histogram(sims[np.isfinite(sims)], edges)[0])
    # A negative similarity widens the axis down to it; a threshold below zero is kept in view too.
    low = np.array([-0.3, 0.5, 0.99], np.float32)
    counts2, edges2 = write_histogram(low, 0.95, str(tmp_path / "h2.png"), "exact")
    assert edges2[0] == pytest.approx(-0.3) and counts2.sum() == 3 and counts2[0] == 1 and counts2[-1] == 1
    assert write_histogram(low, -0.5, str(tmp_path / "h3.png"), "exact")[1][0] == pytest.approx(-0.55)

    img = Image.open(io.BytesIO((tmp_path / "h.png").read_bytes()))
    assert img.format == "PNG" and img.size[0] > 300
    rgb = np.asarray(img.convert("RGB")).astype(int)
    red = (rgb[..., 0] > 200) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)
    assert red.any(axis=0).sum() >= 1 and red.sum() > 50  # the dashed threshold line (and its legend entry)
    filled = (np.abs(rgb - rgb[0, 0]).sum(axis=2) > 60).mean()
    assert filled > 0.05  # the bars were drawn, not only the axes
