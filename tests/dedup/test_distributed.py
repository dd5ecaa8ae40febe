"""The distributed dedup steps on planted data written with the real embed writer: the same drop set as exact
search in one process, on the local pool and on Spark; big clusters split into tiles; exact groups through the
shuffle; recall reported; materialize as tasks; kill -9 at any step, then a re-run equal byte for byte."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import pipeline.dedup.distributed as dist
from pipeline.core.config import load_config
from pipeline.dedup.materialize import member_key, read_table
from pipeline.dedup.stage import dedup
from tests.support.helpers import write_fake_embed_output, write_tar

SHARDS, PER, DIM = 4, 500, 64


def _copy(v: np.ndarray, cos: float, rng: np.random.Generator) -> np.ndarray:
    u = rng.standard_normal(len(v))
    u -= (u @ v) * v
    u /= np.linalg.norm(u)
    return cos * v + np.sqrt(1 - cos * cos) * u


def planted(root: Path) -> dict[str, Any]:
    """Clustered background (30 centres), 60 planted groups of 2-4 copies (cosine 0.99 to a centre, so every
    two copies are >= 0.97 apart) spread over the shards, and three exact pairs (same sha256), one of them with
    unrelated vectors, so only the bytes make them duplicates."""
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((30, DIM))
    vecs = {}
    for s in range(SHARDS):
        x = centres[rng.integers(30, size=PER)] + 0.6 * rng.standard_normal((PER, DIM))
        vecs[f"{s:05d}"] = x / np.linalg.norm(x, axis=1, keepdims=True)
    slots = rng.permutation(SHARDS * PER)[: 60 * 4]
    groups, used = [], 0
    for g in range(60):
        size = 2 + g % 3
        centre = vecs[f"{slots[used] // PER:05d}"][slots[used] % PER]
        members = [(f"{slots[used + i] // PER:05d}", int(slots[used + i] % PER)) for i in range(size)]
        for sid, row in members[1:]:
            vecs[sid][row] = _copy(centre, 0.99, rng)
        groups.append(members)
        used += size
    sha = {sid: [f"sha-{sid}-{i}" for i in range(PER)] for sid in vecs}
    free = [(f"{int(i) // PER:05d}", int(i) % PER) for i in rng.permutation(SHARDS * PER) if i not in set(slots)]
    exact = [(free[2 * i], free[2 * i + 1]) for i in range(3)]
    for i, ((s1, r1), (s2, r2)) in enumerate(exact):
        sha[s2][r2] = sha[s1][r1]
        if i:  # identical bytes embed alike
            vecs[s2][r2] = vecs[s1][r1]
    write_fake_embed_output(
        root / "emb",
        {k: v.astype(np.float32) for k, v in vecs.items()},
        extra_meta={s: {"sha256": sha[s]} for s in sha},
    )
    for sid in vecs:  # the tar shards the embeddings came from, for materialize
        write_tar(root / "tars" / f"{sid}.tar", [(f"{sid}{i:04d}", {"jpg": b"x", "txt": b"t"}) for i in range(PER)])
    return {"emb": str(root / "emb"), "tars": str(root / "tars"), "groups": groups, "exact": exact}


# Two clusters for 2,000 rows and a row cap of 400: every cluster is split into tiles.
CONFIG = ("dedup.semdedup_clusters=2", "dedup.max_cluster_rows=400", "dedup.materialize=true")


def args(data: dict[str, Any], out: Path, *extra: str) -> list[str]:
    return [
        f"input={data['emb']}",
        f"output={out}",
        "dedup.mode=distributed",
        "log_level=WARNING",
        *CONFIG,
        f"dedup.shards={data['tars']}",
        *extra,
    ]


def run(data: dict[str, Any], out: Path, *extra: str) -> dict[str, Any]:
    return dedup(load_config(args(data, out, *extra)))


def drop_set(out: Path) -> set[tuple[str, str]]:
    d = read_table(str(out), "drop")
    return set(zip(d["shard"], d["key"]))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return planted(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def runs(data: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One exact single-process run and one distributed run (tiles, materialize), shared by the tests below."""
    root = tmp_path_factory.mktemp("runs")
    out: dict[str, Any] = {"root": root}
    out["exact"] = dedup(load_config([f"input={data['emb']}", f"output={root / 'exact'}", "dedup.mode=exact"]))
    out["dist"] = run(data, root / "dist")
    return out


@pytest.mark.slow
def test_distributed_drop_set_equals_exact_search(runs: dict[str, Any], data: dict[str, Any]) -> None:
    root = runs["root"]
    # keep=first: all but the lowest (shard, row) of each group go; the planted groups are cliques, where the rule
    # (dropped when a better-ranked duplicate exists) and connected components agree
    expected = {(s, f"{s}{r:04d}") for g in [*data["groups"], *data["exact"]] for s, r in sorted(g)[1:]}
    assert drop_set(root / "exact") == expected
    assert drop_set(root / "dist") == expected
    keep = read_table(str(root / "dist"), "keep")
    assert len(keep) + len(expected) == SHARDS * PER and set(keep["reason"]) == {"unique", "group_keeper"}
    s = runs["dist"]
    assert s["method"] == "distributed" and s["dropped"] == len(expected) and s["groups"] == 60 + 3
    assert not (root / "dist" / dist.WORK).exists()  # intermediates removed once summary.json is written


@pytest.mark.slow
def test_recall_is_reported(runs: dict[str, Any]) -> None:
    s = json.loads((runs["root"] / "dist" / "summary.json").read_text())
    assert s["recall_sample_pairs"] > 10 and s["recall_estimate"] == 1.0 and s["group_recall_estimate"] == 1.0
    assert s["search"]["spill"] >= 1 and s["search"]["tuning_pairs"] > 10
    assert (runs["root"] / "dist" / "similarity_hist.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_cluster_over_the_row_cap_is_split_into_tiles(runs: dict[str, Any]) -> None:
    s = runs["dist"]["search"]
    assert s["clusters"] == 2 and s["largest_cluster"] > 400 and s["tiles"] > 2
    assert s["largest_task_rows"] <= 400  # no task held more rows than dedup.max_cluster_rows
    assert drop_set(runs["root"] / "dist") == drop_set(runs["root"] / "exact")


@pytest.mark.slow
def test_exact_duplicates_are_grouped_through_the_shuffle(runs: dict[str, Any], data: dict[str, Any]) -> None:
    assert runs["dist"]["exact_pairs"] == 3
    dup = read_table(str(runs["root"] / "dist"), "duplicates").set_index("key")
    for (s1, r1), (s2, r2) in data["exact"]:
        first, second = f"{s1}{r1:04d}", f"{s2}{r2:04d}"
        first, second = sorted([first, second])  # keep=first: the lower (shard, row) survives
        assert dup.loc[second, "reason"] == "exact" and dup.loc[second, "matched_key"] == first
        assert not dup.loc[second, "kept"] and dup.loc[first, "kept"] and dup.loc[first, "reason"] == "exact"
    assert runs["dist"]["dropped_by_reason"]["exact"] == 3


@pytest.mark.slow
def test_materialize_runs_as_tasks(runs: dict[str, Any], data: dict[str, Any]) -> None:
    import tarfile

    out = runs["root"] / "dist"
    assert runs["dist"]["materialized"]["shards"] == SHARDS
    keep = read_table(str(out), "keep")
    urls = read_table(str(out), "urls")
    for s in range(SHARDS):
        sid = f"{s:05d}"
        with tarfile.open(out / "shards" / f"{sid}.tar") as t:
            keys = {member_key(m.name) for m in t.getmembers()}
        assert keys == set(keep.loc[keep["shard"] == sid, "key"])
    assert sorted(urls["key"]) == sorted(keep["key"])


def _outputs(out: Path) -> dict[str, bytes]:
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    summary = json.loads(files.pop("summary.json"))
    for k in ("wall_seconds", "time_split_seconds", "output"):
        summary.pop(k)
    files.pop("run.json", None)
    files["summary.json"] = json.dumps(summary, sort_keys=True).encode()
    return files


def _markers(out: Path) -> int:
    return len(list((out / dist.WORK).glob("*/*.done.json"))) + len(list((out / dist.WORK).glob("kmeans.json")))


def _cli(cmd: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "NO_ALBUMENTATIONS_UPDATE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli.main", "dedup", *cmd],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its pool workers share its process group, killed with it
    )


def _kill_after(proc: subprocess.Popen[str], out: Path, markers: int) -> int:
    """SIGKILL the run's process group once `markers` commit markers exist; returns how many there were."""
    while proc.poll() is None:
        seen = _markers(out) if (out / dist.WORK).exists() else 0
        if seen >= markers:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return _markers(out)
        time.sleep(0.005)
    raise AssertionError(f"the run ended before {markers} markers: {proc.stdout.read() if proc.stdout else ''}")


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_same_outputs(data: dict[str, Any], runs: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [a for a in args(data, out) if a != "log_level=WARNING"]
    tasks = runs["dist"]["search"]["pairs_tasks"]
    # markers: scan 4, exact 1, kmeans.json, truth 4, assign 4, pairs, decide 4, materialize 4
    points = [2, 8, 14 + tasks // 2, 14 + tasks + 2, 14 + tasks + 6]
    committed = []
    for markers in points:
        committed.append(_kill_after(_cli(cmd), out, markers))
        assert not (out / "summary.json").exists()
    proc = _cli(cmd)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, log
    assert _outputs(out) == _outputs(runs["root"] / "dist")
    # the last re-run redid nothing that had committed: every step before decide reports all its tasks committed
    reported = {line.split("dedup ")[1].split(":")[0]: line for line in log.splitlines() if "already committed" in line}
    for step, n in [("scan", 4), ("exact", 1), ("truth", 4), ("assign", 4), ("pairs", tasks), ("decide", 4)]:
        assert f"{n} tasks, {n} already committed" in reported[step], reported[step]
    assert committed == sorted(committed) and committed[-1] >= points[-1]


@pytest.mark.spark
@pytest.mark.slow
def test_spark_gives_the_local_drop_set(data: dict[str, Any], runs: dict[str, Any], tmp_path: Path) -> None:
    from pipeline.distribute.spark_session import get_session, stop_session

    old = os.environ.get("PYSPARK_PYTHON")
    os.environ["PYSPARK_PYTHON"] = sys.executable
    spark_cfg = ["spark.master=local[2]", "spark.conf={spark.ui.enabled: 'false', spark.driver.memory: 512m}"]
    session = get_session(load_config(spark_cfg))
    try:
        s = run(data, tmp_path / "spark", "distributor=spark", *spark_cfg)
    finally:
        stop_session(session)
        if old is None:
            os.environ.pop("PYSPARK_PYTHON", None)
        else:
            os.environ["PYSPARK_PYTHON"] = old
    assert s["distributor"] == "spark"
    assert drop_set(tmp_path / "spark") == drop_set(runs["root"] / "exact")
    for name in ("keep", "drop", "duplicates"):
        pd.testing.assert_frame_equal(
            read_table(str(tmp_path / "spark"), name), read_table(str(runs["root"] / "dist"), name)
        )
