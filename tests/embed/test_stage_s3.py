"""The embed stage on `s3://` through a fault-injecting proxy (moto's S3 server behind it): throttling answers are
retried and counted in the summary and the output equals a clean run's; a store that keeps throttling fails the shard
loudly; storage requests per shard stay constant as the number of shards grows."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest

from pipeline.cli.main import main
from pipeline.distribute import base as distributor
from tests.support import s3, s3faults
from tests.support.helpers import make_shards, overrides
from tests.support.s3proxy import Fault, S3Proxy

moto_endpoint, s3_server, s3_bucket = s3.moto_endpoint, s3.s3_server, s3.s3_bucket  # shared fixtures, by name
s3_proxy, via_proxy = s3faults.s3_proxy, s3faults.via_proxy

pytestmark = pytest.mark.slow


def _embed(inp: str, out: str, model: dict[str, str], *extra: str) -> int:
    args = ["embed", f"input={inp}", f"output={out}", *overrides(model), "embed.batch_size=4", "local.processes=1"]
    return main([*args, "log_level=WARNING", *extra])


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("s3shards")
    make_shards(root, n_shards=2, per_shard=6)
    return root


@pytest.fixture(scope="module")
def clean_run(shards: Path, tiny_model: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Local input to local output, in this process (a spawned worker would cost a torch import)."""
    out = tmp_path_factory.mktemp("s3clean") / "emb"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(distributor._BACKENDS, "local", "tests.support.faults_storage:InlineDistributor")
        assert _embed(str(shards), str(out), tiny_model) == 0
    yield out


def _upload(shards: Path, url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    for tar in sorted(shards.glob("*.tar")):
        fs.put_file(str(tar), f"{path}/{tar.name}")


def test_throttled_requests_are_retried_counted_and_the_output_equals_a_clean_run(
    via_proxy: S3Proxy, s3_bucket: str, shards: Path, clean_run: Path, tiny_model: dict[str, str]
) -> None:
    _upload(shards, f"s3://{s3_bucket}/in")
    out = f"s3://{s3_bucket}/out"
    via_proxy.reset(
        Fault(("GET",), first=2, path=f"/{s3_bucket}/in/"),  # the worker's tar reads
        Fault(("PUT",), first=3, path=f"/{s3_bucket}/out/img_emb/"),  # the worker's commit
        Fault(("LIST",), first=2, path="prefix=out/stats"),  # the driver's resume listing
        Fault(("HEAD",), first=1, path=f"/{s3_bucket}/out/manifest.json"),  # the driver's manifest check
    )
    assert _embed(f"s3://{s3_bucket}/in", out, tiny_model) == 0
    injected = dict(via_proxy.injected)
    assert injected == {"GET": 2, "PUT": 3, "LIST": 2, "HEAD": 1}, via_proxy.log
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    run = json.loads(fs.cat_file(f"{s3_bucket}/out/run.json"))
    assert run["exit_status"] == 0 and run["summary"]["storage_retries"] == sum(injected.values())
    for sub in ("img_emb", "text_emb"):
        for local in sorted((clean_run / sub).iterdir()):
            assert fs.cat_file(f"{s3_bucket}/out/{sub}/{local.name}") == local.read_bytes(), local.name
    for local in sorted((clean_run / "metadata").iterdir()):
        with fs.open(f"{s3_bucket}/out/metadata/{local.name}") as f:
            pd.testing.assert_frame_equal(pd.read_parquet(f), pd.read_parquet(local))
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{s3_bucket}/out/stats")) == [
        "stats_00000.json",
        "stats_00001.json",
    ]


def test_a_store_that_keeps_throttling_fails_the_shard_loudly(
    via_proxy: S3Proxy,
    s3_bucket: str,
    shards: Path,
    tiny_model: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    s3faults.use_proxy(monkeypatch, via_proxy, retries={"mode": "standard", "total_max_attempts": 1})
    monkeypatch.setitem(distributor._BACKENDS, "local", "tests.support.faults_storage:InlineDistributor")
    _upload(shards, f"s3://{s3_bucket}/in")
    via_proxy.reset(Fault(("PUT",), always=True, path="/out/img_emb/img_emb_00001"))
    code = _embed(f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out", tiny_model, "embed.max_shard_retries=1")
    assert code == 1
    captured = capsys.readouterr()
    assert "shards_failed: 1" in captured.out and "failed_shards: 00001" in captured.out
    assert "shard 00001 failed after 2 attempts" in captured.err and "reduce your request rate" in captured.err
    # 2 attempts of the shard x s3fs's 5 calls of the PUT (botocore told not to retry)
    assert via_proxy.injected["PUT"] == 10, "\n".join(t for k, t, f in via_proxy.log if f)
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    assert [p.rsplit("/", 1)[1] for p in fs.ls(f"{s3_bucket}/out/stats")] == ["stats_00000.json"]
    assert not [p for p in fs.find(f"{s3_bucket}/out") if "00001" in p]  # nothing of the failed shard is left
    assert np.load(fs.open(f"{s3_bucket}/out/img_emb/img_emb_00000.npy")).shape[0] == 6


# ---- storage requests per shard on S3 ---------------------------------------------------------------------

SIZES = (10, 60)  # both below one LIST page (1,000 keys): any request per shard shows as growth


def test_requests_per_shard_stay_constant_on_s3(via_proxy: S3Proxy, s3_bucket: str, tiny_model: dict[str, str]) -> None:
    """Planning a brace pattern, a no-op resume and a progress poll send as many requests at 60 shards as at 10, as
    the S3 proxy counts them (a name looked up per shard, a listing per poll would break it)."""
    from pipeline.core.config import load_config
    from pipeline.embed.stage import build_manifest
    from tests.support.committed import measured_steps, write_committed

    counts: dict[str, list[dict[str, int]]] = {"planning": [], "resume": [], "poll": []}
    for n in SIZES:
        base = f"s3://{s3_bucket}/n{n}"
        cfg = load_config([*overrides(tiny_model), f"input={base}/in/{{00000..{n - 1:05d}}}.tar", f"output={base}/out"])
        write_committed(f"{base}/in", f"{base}/out", n, build_manifest(cfg))
        for step, run in measured_steps(cfg, n).items():
            fsspec.get_filesystem_class("s3").clear_instance_cache()  # each step starts cold, as a new process
            via_proxy.reset()
            run()
            counts[step].append(dict(via_proxy.counts()))
    for step, (small, big) in counts.items():
        assert small == big, (step, small, big)
    assert counts["planning"][0]["LIST"] >= 1 and counts["resume"][0]["LIST"] >= 1  # the proxy saw the listings
    assert sum(counts["poll"][0].values()) == 0  # the driver's memory only
