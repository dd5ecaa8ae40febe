"""The dedup stage on generated embed outputs: exact and near groups, keep policies, key-based outputs, filters,
cross-dataset removal, the CLI, and threshold calibration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.cli.main import main
from pipeline.core.config import load_config
from pipeline.core.errors import ConfigError
from pipeline.core.units import parse_bytes
from pipeline.dedup.groups import calibrate, exact_pairs, keeper_rank
from pipeline.dedup.stage import choose_mode, dedup
from tests.support.helpers import random_unit, write_fake_embed_output


def near_copy(v: np.ndarray, cos: float, seed: int) -> np.ndarray:
    u = random_unit(1, len(v), seed)[0]
    u -= (u @ v) * v
    u /= np.linalg.norm(u)
    return (cos * v + np.sqrt(1 - cos * cos) * u).astype(np.float32)


def with_scores(img: np.ndarray, scores: list[float], seed: int) -> np.ndarray:
    """Text embeddings whose cosine with each image embedding (the clip_score) is the given score."""
    return np.stack([near_copy(v, s, seed + i) for i, (v, s) in enumerate(zip(img, scores))])


def run(inp: str, out: Path, **options: Any) -> dict[str, Any]:
    return dedup(load_config([f"input={inp}", f"output={out}", *(f"dedup.{k}={v}" for k, v in options.items())]))


def read(out: Path, name: str) -> pd.DataFrame:
    return pd.read_parquet(out / f"{name}.parquet")


@pytest.fixture
def three_shards(tmp_path: Path) -> dict[str, Any]:
    """Shards written in shuffled order with random keys; a near-duplicate trio across all three shards, a
    distractor pair at cosine 0.92, and two samples with identical bytes (same sha256) but unrelated vectors."""
    rng = np.random.default_rng(0)
    vecs = {s: random_unit(40, 64, seed=i) for i, s in enumerate(["00002", "00000", "00001"])}
    keys = {s: [f"k{rng.integers(1 << 40):x}" for _ in range(40)] for s in vecs}
    centre = vecs["00001"][5]
    vecs["00000"][7] = near_copy(centre, 0.985, 1)
    vecs["00002"][3] = near_copy(centre, 0.975, 2)
    vecs["00000"][20] = near_copy(vecs["00000"][30], 0.92, 3)
    sha = {s: [f"sha-{s}-{i}" for i in range(40)] for s in vecs}
    sha["00002"][11] = sha["00001"][9] = "same-bytes"
    meta = {s: {"key": keys[s], "sha256": sha[s]} for s in vecs}
    root = write_fake_embed_output(tmp_path / "emb", vecs, extra_meta=meta)
    k = lambda s, i: keys[s][i]  # noqa: E731
    return {
        "root": root,
        "trio": [k("00000", 7), k("00001", 5), k("00002", 3)],
        "exact": [k("00001", 9), k("00002", 11)],
        "distractor": [k("00000", 20), k("00000", 30)],
        "all": {key for s in keys for key in keys[s]},
    }


def test_groups_keyed_by_sample_key(three_shards: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    s = run(three_shards["root"], out)
    dup = read(out, "duplicates").set_index("key")
    trio, exact = three_shards["trio"], three_shards["exact"]
    # first in (shard, index) order survives: shard 00000 row 7, although shard 00002 was written first
    assert set(dup.loc[trio, "matched_key"]) == {trio[0]} and dup.loc[trio, "kept"].tolist() == [True, False, False]
    assert (dup.loc[trio, "reason"] == "near").all() and dup.loc[trio[0], "similarity"] == 1.0
    assert dup.loc[trio[1], "similarity"] == pytest.approx(0.985, abs=2e-3)
    assert dup.loc[exact, "reason"].tolist() == ["exact", "exact"] and dup.loc[exact[1], "matched_key"] == exact[0]
    assert dup.loc[trio, "shard"].tolist() == ["00000", "00001", "00002"]
    assert not set(three_shards["distractor"]) & set(dup.index)  # 0.92 is not a duplicate
    keep, drop = read(out, "keep"), read(out, "drop")
    assert set(drop["key"]) == {trio[1], trio[2], exact[1]}
    assert set(keep["key"]) | set(drop["key"]) == three_shards["all"] and not set(keep["key"]) & set(drop["key"])
    assert s["groups"] == 2 and s["dropped_by_reason"] == {"exact": 1, "near": 2} and s["method"] == "exact"
    assert s["fraction_kept"] == pytest.approx(117 / 120)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["threshold"] == 0.95 and summary["samples"] == 120
    assert (out / "similarity_hist.png").read_bytes()[:4] == b"\x89PNG"


def test_exact_grouping_can_be_turned_off(three_shards: dict[str, Any], tmp_path: Path) -> None:
    s = run(three_shards["root"], tmp_path / "out", exact="false")
    assert s["groups"] == 1 and s["dropped_by_reason"] == {"near": 2}


@pytest.mark.parametrize("mode", ["ivf", "semdedup"])
def test_approximate_modes_find_the_same_groups(three_shards: dict[str, Any], tmp_path: Path, mode: str) -> None:
    s = run(three_shards["root"], tmp_path / "out", mode=mode)
    assert s["method"] == mode and s["recall_estimate"] in (None, 1.0)
    assert set(read(tmp_path / "out", "drop")["key"]) == {*three_shards["trio"][1:], three_shards["exact"][1]}


@pytest.fixture
def policy_set(tmp_path: Path) -> str:
    """One group of three near copies with different size, clip score and URL; each policy picks another one."""
    x = random_unit(10, 32, seed=7)
    x[4] = near_copy(x[1], 0.99, 1)
    x[8] = near_copy(x[1], 0.98, 2)
    scores = [0.3] * 10
    scores[1], scores[4], scores[8] = 0.20, 0.35, 0.31
    width, url = [64] * 10, [f"http://h/{i}/long/path.jpg" for i in range(10)]
    width[8] = 512
    url[4] = "http://h/4.jpg"
    meta = {"00000": {"width": width, "url": url}}
    return write_fake_embed_output(
        tmp_path / "emb", {"00000": x}, text={"00000": with_scores(x, scores, 9)}, extra_meta=meta
    )


@pytest.mark.parametrize("keep,survivor", [("first", 1), ("largest", 8), ("clip_score", 4), ("shortest_url", 4)])
def test_keep_policies(policy_set: str, tmp_path: Path, keep: str, survivor: int) -> None:
    out = tmp_path / keep
    run(policy_set, out, keep=keep)
    dup = read(out, "duplicates")
    assert sorted(dup["key"]) == ["000000001", "000000004", "000000008"]
    assert set(dup["matched_key"]) == {f"00000{survivor:04d}"}
    assert dup.loc[dup["kept"], "key"].tolist() == [f"00000{survivor:04d}"]


def test_keep_policy_ties_go_to_the_first_key() -> None:
    rows = pd.DataFrame(
        {
            "key": list("abcd"),
            "shard": pd.Categorical(["1", "0", "0", "1"], categories=["0", "1"]),
            "index": [0, 5, 2, 1],
            "width": [10, 10, 10, 10],
            "height": [2, 2, 2, 2],
            "clip_score": [0.3, 0.3, np.nan, 0.3],
            "url": ["ab", "ab", "ab", "ab"],
        }
    )
    eligible = np.ones(4, bool)
    for keep in ("first", "largest", "shortest_url"):
        assert np.argmin(keeper_rank(rows, keep, eligible)) == 2  # shard 0, index 2
    assert np.argmin(keeper_rank(rows, "clip_score", eligible)) == 1  # a missing score never wins
    eligible[2] = False
    assert np.argmin(keeper_rank(rows, "first", eligible)) == 1


def test_exact_pairs_link_each_repeat_to_the_first() -> None:
    a, b = exact_pairs(pd.Series(["x", None, "y", "x", "x", "y", "z"]), np.ones(7, bool))
    assert sorted(zip(a.tolist(), b.tolist())) == [(0, 3), (0, 4), (2, 5)]


def test_min_clip_score_and_failed_rows(policy_set: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    s = run(policy_set, out, min_clip_score=0.25)
    drop = read(out, "drop").set_index("key")["reason"]
    # the group's first member has a low score: it is dropped for that and the next member survives the group
    assert drop["000000001"] == "low_clip_score" and drop["000000008"] == "near" and "000000004" not in drop
    assert s["dropped_by_reason"] == {"low_clip_score": 1, "near": 1}


def test_failed_samples_are_dropped_and_never_grouped(tmp_path: Path) -> None:
    x = random_unit(6, 16, seed=1)
    x[[2, 3]] = 0.0
    meta = {"00000": {"status": ["ok", "ok", "decode_error", "decode_error", "ok", "ok"], "sha256": [None] * 6}}
    root = write_fake_embed_output(tmp_path / "emb", {"00000": x}, extra_meta=meta)
    s = run(root, tmp_path / "out", threshold=-0.5)
    dup, drop = read(tmp_path / "out", "duplicates"), read(tmp_path / "out", "drop")
    assert not {"000000002", "000000003"} & set(dup["key"])
    assert set(drop.loc[drop["reason"] == "not_embedded", "key"]) == {"000000002", "000000003"}
    assert s["samples_embedded"] == 4


def test_no_duplicates_gives_typed_empty_tables(tmp_path: Path) -> None:
    root = write_fake_embed_output(
        tmp_path / "emb", {"00000": random_unit(30, 16, seed=1), "00001": random_unit(1, 16)}
    )
    s = run(root, tmp_path / "out")
    dup = pq.read_table(tmp_path / "out" / "duplicates.parquet")
    assert dup.num_rows == 0 and dup.schema.field("key").type == "string" and dup.schema.field("kept").type == "bool"
    assert s["groups"] == 0 and s["fraction_kept"] == 1.0 and len(read(tmp_path / "out", "keep")) == 31


def test_manifest_without_dim_reads_it_from_the_shards(three_shards: dict[str, Any], tmp_path: Path) -> None:
    manifest = Path(three_shards["root"]) / "manifest.json"
    m = json.loads(manifest.read_text())
    del m["dim"]
    manifest.write_text(json.dumps(m))
    assert run(three_shards["root"], tmp_path / "out")["groups"] == 2


def test_reference_removes_cross_dataset_duplicates(tmp_path: Path) -> None:
    train = random_unit(50, 32, seed=1)
    evals = random_unit(20, 32, seed=2)
    train[10] = near_copy(evals[3], 0.99, 5)
    train[40] = evals[17]
    train[41] = near_copy(evals[5], 0.90, 6)  # similar, not a copy
    root = write_fake_embed_output(tmp_path / "train", {"00000": train[:25], "00001": train[25:]})
    ref = write_fake_embed_output(tmp_path / "eval", {"00000": evals})
    out = tmp_path / "out"
    s = run(root, out, reference=ref)
    drop = read(out, "drop")
    assert set(drop.loc[drop["reason"] == "near_reference", "key"]) == {"000000010", "000010015"}
    m = read(out, "reference_matches").set_index("key")
    assert m.loc["000000010", "reference_key"] == "000000003" and m.loc["000010015", "similarity"] == pytest.approx(1.0)
    assert s["dropped_by_reason"] == {"near_reference": 2}
    other = write_fake_embed_output(tmp_path / "other", {"00000": evals}, model={"arch": "another"})
    with pytest.raises(ConfigError, match="dedup.reference"):
        run(root, tmp_path / "out2", reference=other)


def test_cli_writes_outputs_and_defaults_output_under_input(three_shards: dict[str, Any], tmp_path: Path) -> None:
    root = three_shards["root"]
    assert main(["dedup", f"input={root}", "dedup.keep=largest", "dedup.mode=semdedup"]) == 0
    out = Path(root) / "dedup"
    for name in ("duplicates.parquet", "keep.parquet", "drop.parquet", "summary.json", "similarity_hist.png"):
        assert (out / name).is_file(), name
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert json.loads((out / "summary.json").read_text())["dropped"] == 3
    assert main(["dedup", f"input={root}", f"output={tmp_path / 'o'}"]) == 0
    assert json.loads((tmp_path / "o" / "run.json").read_text())["exit_status"] == 0


@pytest.mark.parametrize(
    "args",
    [
        ["dedup.materialize=true"],
        ["dedup.mode=exact", "dedup.memory_budget=1K"],
        ["dedup.memory_budget=lots"],
        ["dedup.mode=bogus"],
    ],
)
def test_cli_config_errors_exit_2(three_shards: dict[str, Any], tmp_path: Path, args: list[str]) -> None:
    assert main(["dedup", f"input={three_shards['root']}", f"output={tmp_path / 'o'}", *args]) == 2
    assert not (tmp_path / "o" / "keep.parquet").exists()


def test_cli_empty_input_exits_2(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["dedup", f"input={tmp_path / 'empty'}"]) == 2


def test_calibrate_table() -> None:
    sims = np.array([0.99, 0.97, 0.96, 0.94, 0.93, 0.90])
    labels = np.array([True, True, False, True, False, False])
    t = calibrate(sims, labels, thresholds=[0.95, 0.935, 1.0]).set_index("threshold")
    assert t.loc[0.95, "precision"] == pytest.approx(2 / 3) and t.loc[0.95, "recall"] == pytest.approx(2 / 3)
    assert t.loc[0.935, "precision"] == pytest.approx(3 / 4) and t.loc[0.935, "recall"] == 1.0
    assert np.isnan(t.loc[1.0, "precision"]) and t.loc[1.0, "recall"] == 0.0
    default = calibrate(sims, labels)
    assert default["threshold"].iloc[0] == 0.8 and default["threshold"].iloc[-1] == 1.0
    assert default["recall"].is_monotonic_decreasing
    with pytest.raises(ValueError):
        calibrate(sims, labels[:3])


def test_parse_bytes_and_choose_mode() -> None:
    assert parse_bytes("4G") == 4 << 30 and parse_bytes("512MiB") == 512 << 20 and parse_bytes(1000) == 1000
    with pytest.raises(ValueError):
        parse_bytes("lots")
    assert choose_mode("auto", 20_000, 512, 4 << 30) == "exact"
    assert choose_mode("auto", 1_000_000, 512, 4 << 30) == "semdedup"  # fits, but n^2 work is hours on CPU
    assert choose_mode("auto", 1_000_000, 512, 4 << 30, gpus=1) == "exact"
    assert choose_mode("auto", 3_000_000, 512, 8 << 30, gpus=1) == "ivf"
    assert choose_mode("auto", 3_000_000, 512, 1 << 30, gpus=1) == "semdedup"
    assert choose_mode("ivf", 10, 4, 1) == "ivf"
