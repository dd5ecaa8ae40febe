"""bench/bench_dedup.py's pure parts: the planted data is what its docstring promises, scoring counts what it says,
processes get the right roles, and the caption zeros become a sparse file with the same bytes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bd() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_dedup", ROOT / "bench" / "bench_dedup.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_dedup"] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


def test_planted_groups_are_cliques_above_the_threshold_and_distractors_stay_below(bd: ModuleType) -> None:
    spec = bd.DataSpec(n=20_000, dim=512, per_shard=10_000)
    topics = bd.topic_bank(spec)
    shards = [bd.plant(spec, s, topics) for s in range(spec.shards)]
    again = bd.plant(spec, 1, topics)
    assert np.array_equal(again["x"], shards[1]["x"]) and list(again["sha"]) == list(shards[1]["sha"])
    x = np.concatenate([p["x"] for p in shards]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    kind = np.concatenate([p["kind"] for p in shards])
    group = np.concatenate([p["group"] for p in shards])
    sha = np.concatenate([p["sha"] for p in shards])
    assert 0.04 < (kind == 1).mean() < 0.06 and 0.003 < (kind == 2).mean() < 0.007
    near = np.flatnonzero(kind == 1)
    sim = x[near] @ x[near].T
    same = group[near][:, None] == group[near][None, :]
    assert same.sum() > len(near)  # groups spanning the two shards exist
    assert sim[same].min() >= 0.96 and sim[~same].max() < 0.9
    dis = np.flatnonzero(kind == 3)
    assert (x[dis] @ x[near].T).max() < 0.94
    for g in np.unique(group[kind == 2]):
        rows = np.flatnonzero((kind == 2) & (group == g))
        assert len(set(sha[rows])) == 1 and np.allclose(x[rows], x[rows[0]])
    assert len(set(sha[kind != 2])) == int((kind != 2).sum())
    bg = np.flatnonzero(kind == 0)[:2000]
    s_bg = x[bg] @ x[bg].T
    assert s_bg[~np.eye(len(bg), dtype=bool)].max() < 0.9


def test_scoring_counts_pairs_and_whole_groups(bd: ModuleType) -> None:
    group_of = {1: 0, 2: 0, 3: 0, 7: 5, 8: 6}
    assert bd.pair_recall(np.array([1, 1, 7]), np.array([2, 3, 8]), group_of) == pytest.approx(2 / 3)
    assert bd.pair_recall(np.array([], int), np.array([], int), group_of) is None
    # planted groups 0 = {1, 2, 3} whole, 1 = {7, 8} split, 2 = {9} a singleton (not a group), 3 = {10, 11} missed
    rows, groups = np.array([1, 2, 3, 7, 8, 9, 10, 11]), np.array([0, 0, 0, 1, 1, 2, 3, 3])
    assert bd.planted_recall(rows, groups, group_of) == (pytest.approx(1 / 3), 3)
    assert list(bd.global_rows(np.array(["0000000017", "0012300004"]), 10_000)) == [17, 123 * 10_000 + 4]


def test_output_read_as_one_file_or_a_folder_of_parts(bd: ModuleType, tmp_path: Path) -> None:
    df = pd.DataFrame({"key": ["a", "b", "c"], "shard": ["0", "0", "1"], "group_id": [0, 0, 1]})
    df.to_parquet(tmp_path / "duplicates.parquet")
    (tmp_path / "p" / "drop").mkdir(parents=True)
    df.iloc[:2].to_parquet(tmp_path / "p" / "drop" / "part-0.parquet")
    df.iloc[2:].to_parquet(tmp_path / "p" / "drop" / "part-1.parquet")
    df.to_parquet(tmp_path / "p" / "drop" / "part-2.parquet.tmp-0123456789ab")
    assert bd.read_output(tmp_path, "duplicates", ["key"])["key"].tolist() == ["a", "b", "c"]
    assert sorted(bd.read_output(tmp_path / "p", "drop", ["key", "group_id"])["key"]) == ["a", "b", "c"]
    with pytest.raises(FileNotFoundError):
        bd.read_output(tmp_path, "keep", ["key"])


def test_process_roles(bd: ModuleType) -> None:
    py = "/venv/bin/python"
    assert bd.role(["/usr/lib/jvm/bin/java", "-cp", "x", "org.apache.spark.deploy.SparkSubmit"], "java") == "jvm"
    assert bd.role([py, "-m", "pyspark.daemon"], "python") == "task"
    assert bd.role([py, "-c", "from multiprocessing.spawn import spawn_main; spawn_main(fd=5)"], "python") == "task"
    tracker = [py, "-c", "from multiprocessing.resource_tracker import main;main(4)"]
    assert bd.role(tracker, "python") == "other"
    assert bd.role(["/bin/bash", "spark-submit"], "bash") == "other"


def test_sparse_zeros_keeps_the_bytes(bd: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "z.npy"
    np.save(path, np.zeros((4096, 512), np.float16))
    before = path.read_bytes()
    bd._sparse_zeros(str(path))
    assert path.read_bytes() == before
    assert path.stat().st_blocks * 512 < len(before) // 4
