"""Kills, storage faults and stalled reads for `clipline index` and `clipline dedup` (issue 9).

Kills: the stage runs as a subprocess (the CLI's `main`, with local renames optionally slowed down so that a kill
can land between two renames of one commit) and is SIGKILLed at a seeded kill point: once a file or folder of the
phase aimed at appears, plus a seeded delay. Each kill point also says what the kill must have left, so a kill
that came too late fails the test instead of passing without testing anything. The stage is then run again and
its outputs are compared with an uninterrupted run's; neither the output nor the process's temporary folder
(TMPDIR) may keep anything of the killed run. Storage faults (a write failing half-way, a rename failing) and
stalled reads run in this process on tests/support/faults_storage.py's memory filesystem.

Both stages are deterministic here, so files are compared byte for byte: the index with a forced index key
(`IVF16,Flat`: autofaiss trains on the first vectors it reads, faiss's k-means has a fixed seed) and one faiss
thread (two clean builds gave byte-identical files), dedup in exact mode (every pair verified by its exact
cosine). Only wall times, search latencies and timestamps are left out of the json files.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import fsspec
import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main as cli
from pipeline.core.config import load_config
from pipeline.core.errors import JobFailed
from pipeline.dedup.stage import dedup
from pipeline.index.stage import build
from pipeline.index.store import read_info
from tests.support.faults_storage import FaultyMemoryFS, faults
from tests.support.helpers import make_shards, random_unit, write_fake_embed_output

REPO = Path(__file__).resolve().parents[2]
N_SHARDS, PER_SHARD, DIM = 6, 300, 64
SHARDS = [f"{s:05d}" for s in range(N_SHARDS)]
FIRST = ["00000", "00002", "00004"]  # indexed first; the others are appended (out of shard order)
INDEX_ARGS = [
    "index.index_key=IVF16,Flat",
    "index.nb_cores=1",
    "index.recall_queries=100",
    # generous, so autofaiss's nprobe tuning (stored in the index) never depends on the machine's load
    "index.max_index_query_time_ms=1000",
    "log_level=WARNING",
]
# Fields of the json outputs left out of comparisons: timings, timestamps and the output's own path, nothing else.
INDEX_VOLATILE = {
    "quality": ("avg_latency_ms", "p99_latency_ms"),
    "autofaiss": ("avg_search_speed_ms", "99p_search_speed_ms"),
}
DEDUP_VOLATILE = ("wall_seconds", "time_split_seconds", "output")

# The stage's own entry point, with a pause before every local rename when asked (a kill in the pause finds the
# temporary file written and not yet renamed, and lands between the renames of one commit); run with `python -c`.
ENTRY = """
import os, sys, time
from fsspec.implementations.local import LocalFileSystem
pause = float(os.environ.get("CLIPLINE_TEST_RENAME_PAUSE", "0"))
if pause:
    rename = LocalFileSystem.mv
    def slow_mv(self, *a, **k):
        time.sleep(pause)
        rename(self, *a, **k)
    LocalFileSystem.mv = slow_mv
from pipeline.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def _near(v: np.ndarray, cos: float, rng: np.random.Generator) -> np.ndarray:
    u = rng.standard_normal(len(v)).astype(np.float32)
    u -= (u @ v) * v
    u /= np.linalg.norm(u)
    return (cos * v + np.sqrt(1 - cos * cos) * u).astype(np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One embed output (6 shards x 300 samples, 64-d) with near copies across shards, identical image bytes,
    failed images and missing captions; the same output holding only FIRST; the WebDataset tars embedded."""
    tmp = tmp_path_factory.mktemp("idx_dedup")
    rng = np.random.default_rng(0)
    n = N_SHARDS * PER_SHARD
    img, txt = random_unit(n, DIM, seed=0), random_unit(n, DIM, seed=1)
    for g in range(40):  # near copies, each in another shard than its original
        src = int(rng.integers(n))
        img[(src + 301 * (g % 5 + 1)) % n] = _near(img[src], float(rng.uniform(0.96, 0.995)), rng)
    failed = np.arange(n) % 97 == 13
    no_caption = np.arange(n) % 89 == 7
    img[failed], txt[no_caption] = 0.0, 0.0
    sha = np.array([f"sha-{i}" for i in range(n)], dtype=object)
    sha[np.arange(10, n, 250)] = "same-bytes"  # identical image bytes across shards, unrelated vectors
    meta = {}
    for s, sid in enumerate(SHARDS):
        part = slice(s * PER_SHARD, (s + 1) * PER_SHARD)
        meta[sid] = {
            "status": np.where(failed[part], "decode_error", "ok").tolist(),
            "caption_status": np.where(no_caption[part], "missing", "ok").tolist(),
            "caption": [None if no_caption[i] else f"caption {i}" for i in range(n)[part]],
            "sha256": sha[part].tolist(),
        }

    def write(root: Path, sids: list[str]) -> str:
        idx = {sid: slice(SHARDS.index(sid) * PER_SHARD, (SHARDS.index(sid) + 1) * PER_SHARD) for sid in sids}
        return write_fake_embed_output(
            root,
            {sid: img[p] for sid, p in idx.items()},
            text={sid: txt[p] for sid, p in idx.items()},
            extra_meta={sid: meta[sid] for sid in sids},
        )

    make_shards(tmp / "tars", N_SHARDS, PER_SHARD)  # keys SSSSSIIII, as write_fake_embed_output's
    keys = {f"{sid}{i:04d}" for sid in SHARDS for i in range(PER_SHARD)}
    ok_keys = {
        f"{sid}{i:04d}" for s, sid in enumerate(SHARDS) for i in range(PER_SHARD) if not failed[s * PER_SHARD + i]
    }
    return {
        "tmp": tmp,
        "emb": write(tmp / "emb", SHARDS),
        "first": write(tmp / "emb_first", FIRST),
        "tars": str(tmp / "tars"),
        "keys": keys,
        "ok_keys": ok_keys,
    }


def _index_cfg_args(inp: str, out: Path | str, image_only: bool = False) -> list[str]:
    return [
        "index",
        f"input={inp}",
        f"output={out}",
        *INDEX_ARGS,
        *(["index.modalities=[image]"] if image_only else []),
    ]


def _dedup_cfg_args(data: dict[str, Any], out: Path | str, *extra: str) -> list[str]:
    return [
        "dedup",
        f"input={data['emb']}",
        f"output={out}",
        "dedup.materialize=true",
        f"dedup.shards={data['tars']}",
        "log_level=WARNING",
        *extra,
    ]


def _build(args: list[str]) -> dict[str, Any]:
    return build(load_config(args[1:]))


@pytest.fixture(scope="module")
def index_ref(data: dict[str, Any]) -> dict[str, Path]:
    """Uninterrupted runs: a build of all shards; a build of FIRST, and that build with the rest appended (image
    only: the append tests need no text index)."""
    tmp = data["tmp"]
    _build(_index_cfg_args(data["emb"], tmp / "ref_full"))
    _build(_index_cfg_args(data["first"], tmp / "ref_first", image_only=True))
    shutil.copytree(tmp / "ref_first", tmp / "ref_appended")
    assert _build(_index_cfg_args(data["emb"], tmp / "ref_appended", True))["image"]["action"] == "appended"
    return {"full": tmp / "ref_full", "first": tmp / "ref_first", "appended": tmp / "ref_appended"}


@pytest.fixture(scope="module")
def dedup_ref(data: dict[str, Any]) -> Path:
    out = data["tmp"] / "ref_dedup"
    dedup(load_config(_dedup_cfg_args(data, out)[1:]))
    return out


# ---- comparing outputs -----------------------------------------------------------------------------------


def _files(root: Path, only: str = "") -> dict[str, Path]:
    """Files under root whose relative path starts with `only`, without run.json (the CLI's record, not the
    stage's output)."""
    files = {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file() and p.name != "run.json"}
    return {k: p for k, p in files.items() if k.startswith(only)}


def _temporary(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if ".tmp-" in p.name]


def _stable_index_json(path: Path) -> dict[str, Any]:
    info = json.loads(path.read_text())
    for section, fields in INDEX_VOLATILE.items():
        for f in fields:
            info[section].pop(f)
    for h in info["history"]:
        h.pop("time")
    return info  # type: ignore[no-any-return]


def _stable_dedup_json(path: Path) -> dict[str, Any]:
    summary = json.loads(path.read_text())
    for f in DEDUP_VOLATILE:
        summary.pop(f)
    return summary  # type: ignore[no-any-return]


def assert_same_outputs(out: Path, ref: Path, stable_json: Callable[[Path], dict[str, Any]], only: str = "") -> None:
    mine, theirs = _files(out, only), _files(ref, only)
    assert sorted(mine) == sorted(theirs), f"files differ: {sorted(set(mine) ^ set(theirs))}"
    for name, p in mine.items():
        if p.suffix == ".json":
            assert stable_json(p) == stable_json(theirs[name]), name
        else:
            assert p.read_bytes() == theirs[name].read_bytes(), f"{name} differs from the uninterrupted run's"


def assert_index_maps_every_sample_once(out: Path, data: dict[str, Any]) -> None:
    ids = pd.read_parquet(out / "image_ids.parquet")
    assert list(ids["id"]) == list(range(len(ids)))
    assert ids["key"].is_unique and set(ids["key"]) == data["ok_keys"]


def assert_keep_drop_partition(out: Path, keys: set[str]) -> None:
    listed = Counter(pd.read_parquet(out / "keep.parquet")["key"]) + Counter(
        pd.read_parquet(out / "drop.parquet")["key"]
    )
    assert set(listed) == keys and set(listed.values()) == {1}, "every sample in keep or drop, exactly once"


# ---- killing ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KillPoint:
    """Kill once `ready(output, tmpdir)` holds, after a seeded delay drawn from `delay`; `left(output, tmpdir)` is
    what the kill must have left behind (proof that it landed in the phase aimed at)."""

    phase: str
    ready: Callable[[Path, Path], bool]
    left: Callable[[Path, Path], bool]
    delay: tuple[float, float] = (0.0, 0.0)
    rename_pause: float = 0.0
    append: bool = False
    image_only: bool = False  # index.modalities=[image]: a shorter run, when the kill point is in the image index


def _has(root: Path, pattern: str) -> bool:
    return any(root.glob(pattern))


def _ntotal(out: Path, modality: str) -> int:
    return int(json.loads((out / f"{modality}.json").read_text())["ntotal"])


INDEX_KILLS = {
    1: KillPoint(
        "staging the image vectors / training",
        ready=lambda o, t: _has(o, ".tmp-build-image-*/vectors/*.npy"),
        left=lambda o, t: _has(o, ".tmp-build-image-*") and not (o / "image.json").exists(),
        delay=(0.0, 0.2),
        image_only=True,
    ),
    2: KillPoint(
        "building the text index (image index committed)",
        ready=lambda o, t: (o / "image.json").exists(),
        left=lambda o, t: (o / "image.json").exists() and not (o / "text.json").exists(),
        delay=(0.0, 0.4),
    ),
    3: KillPoint(
        "between the renames of a first build's commit",
        ready=lambda o, t: (o / "image.index").exists(),
        left=lambda o, t: (o / "image.index").exists() and not (o / "image.json").exists(),
        delay=(0.0, 0.1),
        rename_pause=0.5,
        image_only=True,
    ),
    4: KillPoint(
        "between the renames of an append's commit (new index and id map, old json)",
        ready=lambda o, t: _has(o, "image.json.tmp-*") and not _has(o, "image_ids.parquet.tmp-*"),
        left=lambda o, t: _ntotal(o, "image") < len(pd.read_parquet(o / "image_ids.parquet")),
        delay=(0.0, 0.1),
        rename_pause=0.5,
        append=True,
        image_only=True,
    ),
}

DEDUP_KILLS = {
    1: KillPoint(
        "reading the embeddings / searching",
        ready=lambda o, t: _has(t, "clipline-dedup-*"),
        left=lambda o, t: _has(t, "clipline-dedup-*") and not (o / "summary.json").exists(),
        delay=(0.0, 0.3),
    ),
    2: KillPoint(
        "writing the keep/drop tables",
        ready=lambda o, t: (o / "keep.parquet").exists(),
        left=lambda o, t: _has(o, "drop.parquet.tmp-*") and not (o / "summary.json").exists(),
        delay=(0.0, 0.1),
        rename_pause=0.3,
    ),
    3: KillPoint(
        "materializing the filtered shards",
        ready=lambda o, t: (o / "shards" / "00001.tar").exists(),
        left=lambda o, t: _has(o, "shards/00002.tar.tmp-*") and not (o / "summary.json").exists(),
        delay=(0.0, 0.2),
        rename_pause=0.4,
    ),
}


def kill_at(point: KillPoint, args: list[str], out: Path, tmpdir: Path, seed: int) -> None:
    """Run the CLI in a subprocess and SIGKILL it at the kill point."""
    env = dict(os.environ, TMPDIR=str(tmpdir), CLIPLINE_TEST_RENAME_PAUSE=str(point.rename_pause))
    with open(tmpdir.parent / "killed.stderr", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", ENTRY, *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
        try:
            end = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < end and not point.ready(out, tmpdir):
                time.sleep(0.005)
            time.sleep(random.Random(seed).uniform(*point.delay))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = (tmpdir.parent / "killed.stderr").read_text()[-3000:]
    assert proc.returncode == -signal.SIGKILL, f"the job ended ({proc.returncode}) before the kill: {log}"
    listing = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []
    assert point.left(out, tmpdir), f"the kill missed '{point.phase}'; it left {listing} (tmp: {os.listdir(tmpdir)})"


@pytest.fixture
def tmpdir_for_rerun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private TMPDIR for the killed job and for the re-run in this process, to see what is left in it."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


@pytest.mark.slow
@pytest.mark.parametrize("seed", sorted(INDEX_KILLS))
def test_index_killed_then_rerun_equals_an_uninterrupted_run(
    seed: int, data: dict[str, Any], index_ref: dict[str, Path], tmp_path: Path, tmpdir_for_rerun: Path
) -> None:
    point = INDEX_KILLS[seed]
    out = tmp_path / "idx"
    ref = index_ref["full"]
    if point.append:
        shutil.copytree(index_ref["first"], out)
        ref = index_ref["appended"]
    args = _index_cfg_args(data["emb"], out, point.image_only)
    kill_at(point, args, out, tmpdir_for_rerun, seed)

    assert cli.main(args) == 0
    assert_same_outputs(out, ref, _stable_index_json, "image" if point.image_only else "")
    assert_index_maps_every_sample_once(out, data)
    assert _temporary(out) == [] and list(tmpdir_for_rerun.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("seed", sorted(DEDUP_KILLS))
def test_dedup_killed_then_rerun_equals_an_uninterrupted_run(
    seed: int, data: dict[str, Any], dedup_ref: Path, tmp_path: Path, tmpdir_for_rerun: Path
) -> None:
    point = DEDUP_KILLS[seed]
    out = tmp_path / "dedup"
    args = _dedup_cfg_args(data, out)
    kill_at(point, args, out, tmpdir_for_rerun, seed)

    assert cli.main(args) == 0
    assert_same_outputs(out, dedup_ref, _stable_dedup_json)
    assert_keep_drop_partition(out, data["keys"])
    assert _temporary(out) == [] and list(tmpdir_for_rerun.iterdir()) == [], "temporary files left"


def test_reference_outputs_are_not_trivial(data: dict[str, Any], dedup_ref: Path, index_ref: dict[str, Path]) -> None:
    """The data exercise what the kill tests compare: groups of both kinds, failed rows, an out-of-order append."""
    summary = json.loads((dedup_ref / "summary.json").read_text())
    assert summary["dropped_by_reason"]["near"] >= 30 and summary["dropped_by_reason"]["exact"] >= 5
    assert summary["dropped_by_reason"]["not_embedded"] == N_SHARDS * PER_SHARD - len(data["ok_keys"])
    assert_keep_drop_partition(dedup_ref, data["keys"])
    appended = pd.read_parquet(index_ref["appended"] / "image_ids.parquet")
    assert list(pd.unique(appended["shard"])) == [*FIRST, "00001", "00003", "00005"]
    assert not (index_ref["appended"] / "image.index").read_bytes() == (index_ref["full"] / "image.index").read_bytes()


# ---- storage faults (in-process, memory-backed output) ---------------------------------------------------


@pytest.fixture
def faultyfs() -> Iterator[type[FaultyMemoryFS]]:
    FaultyMemoryFS.reset()
    yield FaultyMemoryFS
    FaultyMemoryFS.reset()


def _memory_files(fs: type[FaultyMemoryFS], prefix: str) -> dict[str, bytes]:
    out = {}
    for path, f in fs.store.items():
        if path.startswith(prefix) and not path.endswith("/run.json"):
            out[path[len(prefix) :]] = bytes(f.getbuffer())
    return out


def assert_memory_equals(
    fs: type[FaultyMemoryFS], prefix: str, ref: Path, stable_json: Callable[..., Any], only: str = ""
) -> None:
    mine = _memory_files(fs, prefix)
    theirs = _files(ref, only)
    assert sorted(mine) == sorted(theirs), f"files differ: {sorted(set(mine) ^ set(theirs))}"
    for name, data in mine.items():
        if name.endswith(".json"):
            tmp = ref.parent / f"_cmp_{os.getpid()}.json"
            tmp.write_bytes(data)
            try:
                assert stable_json(tmp) == stable_json(theirs[name]), name
            finally:
                tmp.unlink()
        else:
            assert data == theirs[name].read_bytes(), name


def _reported(capfd: pytest.CaptureFixture[str], text: str) -> bool:
    return text in capfd.readouterr().err


INDEX_FAULTS = {
    # a first build: the id map's write fails half-way, nothing is renamed
    "ids write fails (build)": ({"fail_write": "image_ids.parquet"}, False),
    # a first build: the json (commit marker) cannot be renamed after the index and id map were
    "json rename fails (build)": ({"fail_mv": "image.json"}, False),
    # an append: the id map cannot be renamed after the new index was; the old json still describes the old index
    "ids rename fails (append)": ({"fail_mv": "image_ids.parquet"}, True),
    # an append: the commit journal cannot be written, so nothing of the new commit may be renamed
    "commit journal write fails (append)": ({"fail_write": "image.commit"}, True),
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", sorted(INDEX_FAULTS))
def test_index_storage_fault_leaves_nothing_committed_and_rerun_completes(
    fault: str,
    data: dict[str, Any],
    index_ref: dict[str, Path],
    faultyfs: type[FaultyMemoryFS],
    capfd: pytest.CaptureFixture[str],
) -> None:
    settings, append = INDEX_FAULTS[fault]
    out = "faultymem://idx"
    if append:
        assert cli.main(_index_cfg_args(data["first"], out, image_only=True)) == 0
    before = read_info(out, "image")
    args = _index_cfg_args(data["emb"], out, image_only=True)
    with faults(**settings):
        assert cli.main(args) == 1
    assert _reported(capfd, "index failed: injected")
    info = read_info(out, "image")
    # Nothing new is committed: the marker is absent (first build) or still the old one (append).
    assert (info is None) if before is None else (info == before)
    if fault == "commit journal write fails (append)":
        assert not [p for p in faultyfs.store if ".tmp-" in p], "a failed commit leaves no temporary file"

    assert cli.main(args) == 0
    assert_memory_equals(faultyfs, "/idx/", index_ref["appended" if append else "full"], _stable_index_json, "image")


@pytest.fixture
def stale_dedup(data: dict[str, Any], faultyfs: type[FaultyMemoryFS]) -> str:
    """A complete dedup output of an earlier run with another threshold (other keep/drop lists) in memory."""
    out = "faultymem://dedup"
    dedup(load_config(_dedup_cfg_args(data, out, "dedup.threshold=0.5", "dedup.materialize=false")[1:]))
    assert fsspec.filesystem("faultymem").exists("/dedup/summary.json")
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings",
    [{"fail_write": "drop.parquet"}, {"fail_mv": "shards/00003.tar"}, {"fail_write": "urls.parquet"}],
    ids=["drop table write fails", "filtered shard rename fails", "url list write fails"],
)
def test_dedup_storage_fault_leaves_nothing_committed_and_rerun_completes(
    settings: dict[str, str],
    data: dict[str, Any],
    dedup_ref: Path,
    faultyfs: type[FaultyMemoryFS],
    stale_dedup: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    args = _dedup_cfg_args(data, stale_dedup)
    with faults(**settings):
        assert cli.main(args) == 1
    assert _reported(capfd, "dedup failed: injected")
    # summary.json is the commit marker: the earlier run's must not vouch for a mix of old and new files
    assert not fsspec.filesystem("faultymem").exists("/dedup/summary.json")
    assert not [p for p in faultyfs.store if ".tmp-" in p], "a failed write leaves no temporary file"

    assert cli.main(args) == 0
    assert_memory_equals(faultyfs, "/dedup/", dedup_ref, _stable_dedup_json)


# ---- stalled reads ---------------------------------------------------------------------------------------


def _to_memory(local: str, url: str) -> None:
    fs = fsspec.filesystem("faultymem")
    for p in Path(local).rglob("*"):
        if p.is_file():
            fs.pipe(f"{url}/{p.relative_to(local)}", p.read_bytes())


# A stall after the npy header (the data read blocks) and at the first byte of a parquet file (pyarrow takes a short
# read of its footer for a corrupt file instead of waiting).
STALLS = {"img_emb": 100, "metadata": 0}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stalled", ["img_emb_00002", "metadata_00001"])
def test_index_stalled_read_is_cut_off_by_the_read_timeout(
    stalled: str, data: dict[str, Any], faultyfs: type[FaultyMemoryFS], tmp_path: Path
) -> None:
    _to_memory(data["emb"], "faultymem://emb")
    out = tmp_path / "idx"
    cfg = load_config([*_index_cfg_args("faultymem://emb", out, image_only=True)[1:], "index.read_timeout_s=1"])
    with faults(stall_read=stalled, stall_after=STALLS[stalled[:-6]]):
        t0 = time.monotonic()
        with pytest.raises(JobFailed, match=rf"{stalled[-5:]}.*stalled.*1s.*index\.read_timeout_s"):
            build(cfg)
        assert time.monotonic() - t0 < 30
    assert faultyfs.calls["stall"] >= 1
    assert read_info(str(out), "image") is None and _temporary(out) == [] and not _has(out, ".tmp-build-*")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stalled", ["metadata_00003", "img_emb_00001"])
def test_dedup_stalled_read_is_cut_off_by_the_read_timeout(
    stalled: str, data: dict[str, Any], faultyfs: type[FaultyMemoryFS], tmp_path: Path, tmpdir_for_rerun: Path
) -> None:
    _to_memory(data["emb"], "faultymem://emb")
    out = tmp_path / "dedup"
    cfg = load_config(["input=faultymem://emb", f"output={out}", "dedup.read_timeout_s=1", "log_level=WARNING"])
    with faults(stall_read=stalled, stall_after=STALLS[stalled[:-6]]):
        t0 = time.monotonic()
        with pytest.raises(JobFailed, match=rf"{stalled[-5:]}.*stalled.*1s.*dedup\.read_timeout_s"):
            dedup(cfg)
        assert time.monotonic() - t0 < 30
    assert faultyfs.calls["stall"] >= 1
    assert not (out / "summary.json").exists() and list(tmpdir_for_rerun.iterdir()) == []
