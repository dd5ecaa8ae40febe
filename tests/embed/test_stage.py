"""The embed stage end to end through the CLI: resume, kill -9 and resume, manifest, ecosystem readers."""

from __future__ import annotations

import filecmp
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.cli.main import main
from pipeline.embeddings.layout import committed_shards
from tests.support.helpers import make_shards, make_tiny_checkpoint, overrides

pytestmark = pytest.mark.slow


def _embed_args(shards: Path, out: Path, model: dict[str, str], *extra: str) -> list[str]:
    return [
        "embed",
        f"input={shards}/{{00000..00003}}.tar",
        f"output={out}",
        *overrides(model),
        "embed.batch_size=8",
        "local.processes=1",
        *extra,
    ]


def _data_files(out: Path) -> list[Path]:
    return sorted(p for sub in ("img_emb", "text_emb", "metadata") for p in (out / sub).iterdir())


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    make_shards(root, n_shards=4, per_shard=30)
    return root


@pytest.fixture(scope="module")
def clean_run(shards: Path, tiny_model: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "emb"
    assert main(_embed_args(shards, out, tiny_model)) == 0
    return out


def test_outputs_layout_and_run_json(clean_run: Path) -> None:
    assert committed_shards(str(clean_run)) == ["00000", "00001", "00002", "00003"]
    for sid in committed_shards(str(clean_run)):
        img = np.load(clean_run / "img_emb" / f"img_emb_{sid}.npy")
        meta = pq.read_table(clean_run / "metadata" / f"metadata_{sid}.parquet").to_pandas()
        assert img.dtype == np.float16 and img.shape == (30, 32) and len(meta) == 30
        assert meta["key"].tolist() == [f"{sid}{i:04d}" for i in range(30)]
    run = json.loads((clean_run / "run.json").read_text())
    assert run["exit_status"] == 0 and run["config"]["embed"]["batch_size"] == 8
    assert {"torch", "open_clip_torch", "img2dataset", "pyarrow", "python", "autofaiss"} <= set(run["versions"])
    assert run["summary"]["samples"] == 120 and run["end_time"] >= run["start_time"]
    manifest = json.loads((clean_run / "manifest.json").read_text())
    assert manifest["dim"] == 32 and manifest["model"]["checkpoint_sha256"]


def test_rerun_skips_committed_shards(
    clean_run: Path, shards: Path, tiny_model: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    before = {p: p.stat().st_mtime_ns for p in _data_files(clean_run)}
    assert main(_embed_args(shards, clean_run, tiny_model)) == 0
    assert "shards_skipped: 4" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in _data_files(clean_run)} == before


def test_other_model_into_same_output_is_refused(
    clean_run: Path, shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = make_tiny_checkpoint(tmp_path / "other", seed=1)
    before = {p: p.stat().st_mtime_ns for p in _data_files(clean_run)}
    assert main(_embed_args(shards, clean_run, other)) == 2
    assert "made differently" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in _data_files(clean_run)} == before


def test_killed_twice_then_resumed_equals_clean_run(
    clean_run: Path, shards: Path, tiny_model: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "emb"
    args = [sys.executable, "-m", "pipeline.cli", *_embed_args(shards, out, tiny_model)]
    rng = random.Random(7)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Kill 1: at a random moment early on (start-up, model load or first shard), at the latest as the first shard
    # commits (on a fast machine the whole job can end within the random delay).
    # Kill 2: right after this run has committed some, but not all, shards.
    for first in (True, False):
        before = len(committed_shards(str(out)))
        p = subprocess.Popen(
            args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + (rng.uniform(1.0, 4.0) if first else 300)
        while len(committed_shards(str(out))) <= before and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.05)
        if not first:
            time.sleep(rng.uniform(0.0, 0.3))
        os.killpg(p.pid, signal.SIGKILL)  # the driver and its workers, mid-job
        p.wait()
    assert 1 <= len(committed_shards(str(out))) < 4, "the second kill must land mid-job"
    r = subprocess.run(args, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert committed_shards(str(out)) == committed_shards(str(clean_run))
    names = [p.relative_to(out) for p in _data_files(out)]
    assert names == [p.relative_to(clean_run) for p in _data_files(clean_run)]
    for rel in names:
        if rel.suffix == ".npy":
            assert filecmp.cmp(out / rel, clean_run / rel, shallow=False), rel
        else:
            pd.testing.assert_frame_equal(
                pq.read_table(out / rel).to_pandas(), pq.read_table(clean_run / rel).to_pandas()
            )
    leftovers = [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_embedding_reader_and_autofaiss_read_output(clean_run: Path, tmp_path: Path) -> None:
    from autofaiss import build_index
    from embedding_reader import EmbeddingReader

    reader = EmbeddingReader(str(clean_run / "img_emb"), file_format="npy")
    assert reader.count == 120 and reader.dimension == 32
    total = sum(len(emb) for emb, _ in reader(batch_size=50, start=0, end=reader.count, show_progress=False))
    assert total == 120
    pr = EmbeddingReader(
        str(clean_run / "img_emb"),
        file_format="parquet_npy",
        metadata_folder=str(clean_run / "metadata"),
        meta_columns=["key", "caption"],
    )
    emb, meta = next(pr(batch_size=120, start=0, end=pr.count, show_progress=False))
    first = np.load(clean_run / "img_emb" / "img_emb_00000.npy")
    assert meta["key"].iloc[0] == "000000000" and np.allclose(emb[0], first[0], atol=1e-3)
    index, infos = build_index(
        str(clean_run / "img_emb"),
        index_path=str(tmp_path / "k.index"),
        index_infos_path=str(tmp_path / "i.json"),
        max_index_memory_usage="100M",
        current_memory_available="1G",
        verbose=40,
    )
    assert index is not None and index.ntotal == 120


def test_tar_with_every_bad_data_kind_exits_0(
    tmp_path: Path, tiny_model: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.support.helpers import hostile_samples, write_tar

    samples = hostile_samples()
    write_tar(tmp_path / "in" / "00000.tar", samples)
    args = [
        "embed",
        f"input={tmp_path}/in",
        f"output={tmp_path}/out",
        *overrides(tiny_model),
        "embed.max_pixels=50000000",
    ]
    assert main(args) == 0
    meta = pq.read_table(tmp_path / "out" / "metadata" / "metadata_00000.parquet").to_pandas()
    assert len(meta) == len(samples) and meta["index"].tolist() == list(range(len(samples)))
    out = capsys.readouterr().out
    assert "samples: 12" in out and "decode_error=2" in out and "too_large=1" in out


# ---- storage requests per shard ---------------------------------------------------------------------------

COUNTING_WORKER = "tests.support.countfs:counting_embed_worker"
SIZES = (5, 50)
MAX_PER_SHARD = {"LIST": 0, "HEAD": 4, "GET": 2, "PUT": 5, "COPY": 5, "DELETE": 5}  # generous: the order, not the count


@pytest.fixture(scope="module")
def request_counts(tmp_path_factory: pytest.TempPathFactory, tiny_model: dict[str, str]) -> dict[str, dict[int, Any]]:
    """Storage requests, in every process, of planning, a whole local job and a no-op resume, at 5 and 50 shards."""
    from pipeline.core.config import load_config
    from pipeline.embed.stage import embed, plan
    from tests.support.countfs import ENV, totals

    counts: dict[str, dict[int, Any]] = {"planning": {}, "job": {}, "resume": {}}
    for n in SIZES:
        root = tmp_path_factory.mktemp(f"requests{n}")
        make_shards(root / "in", n_shards=n, per_shard=1)
        cfg = load_config(
            overrides(tiny_model)
            + [f"input=countfile://{root}/in", f"output=countfile://{root}/out", "local.processes=1"]
        )
        for step in counts:
            folder = root / f"requests_{step}"
            folder.mkdir()
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv(ENV, str(folder))  # spawned workers inherit it
                if step == "planning":
                    assert len(plan(cfg)) == n
                else:
                    done = embed(cfg, worker=COUNTING_WORKER)["shards_done"]
                    assert done == (n if step == "job" else 0)
            counts[step][n] = totals(folder)
    return counts


@pytest.mark.parametrize("step", ["planning", "job", "resume"])
def test_storage_requests_per_shard_stay_constant(step: str, request_counts: dict[str, dict[int, Any]]) -> None:
    """Requests grow by the same whole number per shard from 5 to 50 shards, and nothing lists per shard: a
    listing per shard or per progress poll would break it (the Spark driver used to list every stats marker per
    poll)."""
    small, big = (request_counts[step][n] for n in SIZES)
    for kind, bound in MAX_PER_SHARD.items():
        grew = big[kind] - small[kind]
        assert grew % (SIZES[1] - SIZES[0]) == 0, (kind, small, big)
        assert 0 <= grew // (SIZES[1] - SIZES[0]) <= bound, (kind, small, big)
    if step == "job":
        assert small["PUT"] >= SIZES[0] and small["GET"] >= SIZES[0]  # every shard was read and written


# ---- the embed stage's side of the distributor contract ---------------------------------------------------


def test_worker_applies_the_assigned_device_unless_cpu_and_reports_progress(
    tmp_path: Path, tiny_model: dict[str, str]
) -> None:
    from pipeline.core.config import load_config
    from pipeline.core.tasks import ShardTask
    from pipeline.distribute.base import WorkerContext
    from pipeline.embed.runner import embed_worker, on_device

    cfg = load_config(overrides(tiny_model))
    assert on_device(cfg, "cuda:3").model.device == "cuda:3" and cfg.model.device == "auto"  # a copy
    assert on_device(cfg, None) is cfg
    cpu = load_config([*overrides(tiny_model), "model.device=cpu"])
    assert on_device(cpu, "cuda:0").model.device == "cpu"

    make_shards(tmp_path / "in", n_shards=1, per_shard=10)
    task = ShardTask("00000", str(tmp_path / "in" / "00000.tar"), str(tmp_path / "out"), "webdataset")
    seen: list[int] = []
    ctx = WorkerContext(attempt=2, device=None, threads=1, progress=seen.append)
    stats = embed_worker(task, load_config([*overrides(tiny_model), "embed.batch_size=4"]), ctx)
    assert seen == [4, 8, 10] and stats["samples"] == 10 and stats["attempt"] == 2


def test_committed_probe_reads_the_commit_marker_and_says_none_under_overwrite(
    tmp_path: Path, tiny_model: dict[str, str]
) -> None:
    from pipeline.core.config import load_config
    from pipeline.core.tasks import ShardTask
    from pipeline.embed.runner import get_model, run_shard
    from pipeline.embed.stage import committed_stats

    make_shards(tmp_path / "in", n_shards=1, per_shard=3)
    cfg = load_config([*overrides(tiny_model), f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}"])
    task = ShardTask("00000", str(tmp_path / "in" / "00000.tar"), str(tmp_path / "out"), "webdataset")
    assert committed_stats(task, cfg) is None
    run_shard(task, get_model(cfg), cfg.embed)
    stats = committed_stats(task, cfg)
    assert stats is not None and stats["shard"] == "00000" and stats["rows"] == 3
    assert committed_stats(task, load_config([*overrides(tiny_model), "embed.overwrite=true"])) is None
