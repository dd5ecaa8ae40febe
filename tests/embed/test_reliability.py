"""Fault injection and hostile input for the embed stage: crashing and hanging workers, storage faults, stalled
reads, a hostile corpus under a memory bound, bad configuration. Bugs found are strict xfails naming the fix."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main as cli
from pipeline.core.config import Config, load_config
from pipeline.core.errors import JobFailed
from pipeline.core.tasks import ShardTask
from pipeline.distribute import base as distributor
from pipeline.embed.reader import ReadTimeout
from pipeline.embed.runner import get_model, run_shard
from pipeline.embed.stage import embed
from pipeline.embed.writer import uncommitted_leftovers
from pipeline.embeddings.layout import committed_shards, read_stats
from tests.support.faults_storage import (
    FAULT_DIR,
    FaultyMemoryFS,
    InjectedFault,
    faults,
    ico_wrapping,
    jpeg_header_claiming,
    png_1bit,
)
from tests.support.helpers import jpeg_bytes, load_shard, make_shards, overrides, write_tar

REPO = Path(__file__).resolve().parents[2]


# ---- shared helpers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cfg(tiny_model: dict[str, str]) -> Config:
    return load_config(overrides(tiny_model) + ["embed.batch_size=4", "embed.output_dtype=float32"])


@pytest.fixture
def inline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run shards in this process (memory filesystems, cheap driver tests): the 'local' backend is swapped."""
    monkeypatch.setitem(distributor._BACKENDS, "local", "tests.support.faults_storage:InlineDistributor")


@pytest.fixture
def faultyfs() -> Any:
    FaultyMemoryFS.reset()
    yield FaultyMemoryFS
    FaultyMemoryFS.reset()


def _with(cfg: Config, **fields: Any) -> Config:
    c = cfg.model_copy(deep=True)
    for k, v in fields.items():
        section, _, key = k.rpartition("__")
        setattr(getattr(c, section) if section else c, key, v)
    return c


def _samples(n: int, seed: int = 0) -> list[tuple[str, dict[str, bytes]]]:
    return [(f"{i:04d}", {"jpg": jpeg_bytes(seed * 1000 + i), "txt": f"caption {seed} {i}".encode()}) for i in range(n)]


def _tar_bytes(tmp_path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    return write_tar(tmp_path / f"t{len(list(tmp_path.iterdir()))}.tar", samples).read_bytes()


_load = load_shard


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in files}


def _memory_paths(fs: type[FaultyMemoryFS], prefix: str) -> list[str]:
    return sorted(p for p in fs.store if p.startswith(prefix))


# ---- crashing and hanging workers (spawned processes) ---------------------------------------------------

# Covers a task's model load and 10 samples on a loaded 2-core machine (10 s was too short under the full suite).
SHARD_TIMEOUT_S = 25.0


@pytest.fixture(scope="module")
def faulty_job(tmp_path_factory: pytest.TempPathFactory, tiny_model: dict[str, str]) -> dict[str, Any]:
    """One CLI embed run whose worker hangs on 00000 (first attempt) and dies mid-shard on 00001 (every attempt)."""
    root = tmp_path_factory.mktemp("faulty_job")
    make_shards(root / "in", n_shards=3, per_shard=10)
    fault_dir = root / "faults"
    fault_dir.mkdir()
    out = root / "out"
    # Two worker processes: the crash retries in one overlap the wait for the hung one's timeout in the other.
    argv = [
        "embed",
        f"input={root}/in",
        f"output={out}",
        *overrides(tiny_model),
        "local.processes=2",
        "embed.batch_size=4",
        "embed.max_shard_retries=1",
        f"embed.shard_timeout_s={SHARD_TIMEOUT_S}",
    ]
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAULT_DIR, str(fault_dir))
        faulty = dataclasses.replace(cli.COMMANDS["embed"], fn="tests.support.faults_storage:embed_crash_and_hang")
        mp.setitem(cli.COMMANDS, "embed", faulty)
        t0 = time.monotonic()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cli.main(argv)
        wall = time.monotonic() - t0
    return {
        "root": root,
        "out": out,
        "argv": argv,
        "code": code,
        "stdout": stdout.getvalue(),
        "stderr": stderr.getvalue(),
        "wall": wall,
        "faults": fault_dir,
    }


@pytest.mark.slow
def test_worker_dying_mid_shard_is_retried_then_reported(faulty_job: dict[str, Any]) -> None:
    out: Path = faulty_job["out"]
    assert faulty_job["code"] == 1, faulty_job["stderr"][-3000:]
    assert "failed_shards: 00001" in faulty_job["stdout"] and "shards_done: 2" in faulty_job["stdout"]
    assert faulty_job["stderr"].count("shard 00001 failed after 2 attempts: worker process died") == 1  # logged once
    assert (faulty_job["faults"] / "attempts_00001").read_text() == "2"  # 1 + embed.max_shard_retries
    run = json.loads((out / "run.json").read_text())
    assert run["exit_status"] == 1 and "00001" in run["error"]
    # The others completed and committed; the failed one left nothing, not even temporary files.
    assert committed_shards(str(out)) == ["00000", "00002"]
    assert [p.name for p in out.rglob("*") if "00001" in p.name or ".tmp-" in p.name] == []
    for sid in ("00000", "00002"):
        img, txt, meta = _load(str(out), sid)
        assert len(img) == len(txt) == len(meta) == 10 and (meta["status"] == "ok").all()


@pytest.mark.slow
def test_hung_worker_is_killed_by_shard_timeout_and_retried(faulty_job: dict[str, Any]) -> None:
    assert (faulty_job["faults"] / "attempts_00000").read_text() == "2"
    pid = int((faulty_job["faults"] / "hung_pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped by the local distributor
    assert f"shard 00000 failed (attempt 1), retrying: timed out after {SHARD_TIMEOUT_S:.0f}s" in faulty_job["stderr"]
    assert read_stats(str(faulty_job["out"]), "00000")["attempt"] == 1
    assert SHARD_TIMEOUT_S <= faulty_job["wall"] < SHARD_TIMEOUT_S + 240


@pytest.mark.slow
def test_rerun_with_normal_worker_finishes_only_the_failed_shard(
    faulty_job: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    out: Path = faulty_job["out"]
    kept = {k: v for k, v in _snapshot(out).items() if k != "run.json"}
    assert cli.main(faulty_job["argv"]) == 0
    assert "shards_skipped: 2" in capsys.readouterr().out
    assert committed_shards(str(out)) == ["00000", "00001", "00002"]
    after = _snapshot(out)
    assert {k: after[k] for k in kept} == kept  # committed shards were not touched
    img, _, meta = _load(str(out), "00001")
    assert len(img) == len(meta) == 10 and meta["key"].tolist() == [f"00001{i:04d}" for i in range(10)]


# ---- storage faults (in-process, memory-backed) ---------------------------------------------------------

COMMIT_FAULTS = {
    "img_emb write fails half-way": {"fail_nth_write": 1},
    "text_emb rename fails": {"fail_mv": "text_emb_00000"},
    "metadata rename fails": {"fail_mv": "metadata_00000"},
    "stats write fails half-way": {"fail_write": "stats_00000"},
    "stats rename fails": {"fail_mv": "stats_00000"},
}


@pytest.mark.parametrize("fault", sorted(COMMIT_FAULTS))
def test_storage_fault_during_commit_leaves_no_committed_shard(
    fault: str, tmp_path: Path, cfg: Config, faultyfs: Any, inline: None
) -> None:
    fsspec.filesystem("faultymem").pipe("faultymem://in/00000.tar", _tar_bytes(tmp_path, _samples(6)))
    out = "faultymem://out"
    task = ShardTask("00000", "faultymem://in/00000.tar", out, "webdataset")
    with faults(**COMMIT_FAULTS[fault]):
        with pytest.raises(InjectedFault):
            run_shard(task, get_model(cfg), cfg.embed)
    assert committed_shards(out) == []
    assert not any(p.startswith("/out/stats/stats_00000.json") and ".tmp-" not in p for p in faultyfs.store)
    # Whatever final-named data files the fault left are recognisably uncommitted.
    finals = [p for p in _memory_paths(faultyfs, "/out/") if ".tmp-" not in p and "/stats/" not in p]
    assert sorted(uncommitted_leftovers(out)) == finals
    # The next run of the stage cleans up and completes the shard.
    summary = embed(_with(cfg, input="faultymem://in/00000.tar", output=out))
    assert summary["shards_done"] == 1 and committed_shards(out) == ["00000"]
    img, txt, meta = _load(out, "00000")
    assert len(img) == len(txt) == len(meta) == 6 and (meta["status"] == "ok").all()
    assert [p for p in faultyfs.store if ".tmp-" in p] == [] and uncommitted_leftovers(out) == []


def test_storage_fault_in_driver_reports_failed_shard_and_rerun_completes(
    tmp_path: Path, cfg: Config, faultyfs: Any, inline: None, caplog: pytest.LogCaptureFixture
) -> None:
    fs = fsspec.filesystem("faultymem")
    for s in range(3):
        fs.pipe(f"faultymem://in/{s:05d}.tar", _tar_bytes(tmp_path, _samples(5, seed=s)))
    c = _with(cfg, input="faultymem://in", output="faultymem://out", embed__max_shard_retries=1)
    with faults(fail_mv="metadata_00001"):
        with pytest.raises(JobFailed, match="00001") as e:
            embed(c)
    assert e.value.summary["failed_shards"] == ["00001"] and e.value.summary["shards_done"] == 2
    assert committed_shards("faultymem://out") == ["00000", "00002"]
    assert "injected rename failure" in caplog.text and caplog.text.count("00001 failed after 2 attempts") == 1
    summary = embed(c)
    assert summary["shards_done"] == 1 and summary["shards_skipped"] == 2
    assert committed_shards("faultymem://out") == ["00000", "00001", "00002"]
    assert uncommitted_leftovers("faultymem://out") == [] and [p for p in faultyfs.store if ".tmp-" in p] == []


def test_overwrite_interrupted_mid_commit_never_leaves_a_mixed_committed_shard(
    tmp_path: Path, cfg: Config, faultyfs: Any
) -> None:
    fs = fsspec.filesystem("faultymem")
    out = "faultymem://out"
    task = ShardTask("00000", "faultymem://in/00000.tar", out, "webdataset")
    fs.pipe(task.input_url, _tar_bytes(tmp_path, _samples(10)))
    run_shard(task, get_model(cfg), cfg.embed)
    fs.pipe(task.input_url, _tar_bytes(tmp_path, _samples(4, seed=9)))  # the input changed: the reason to overwrite
    redo = cfg.embed.model_copy(update={"overwrite": True})
    with faults(fail_mv="metadata_00000"):
        with pytest.raises(InjectedFault):
            run_shard(task, get_model(cfg), redo)
    for sid in committed_shards(out):
        img, txt, meta = _load(out, sid)
        assert len(img) == len(txt) == len(meta) == read_stats(out, sid)["rows"]


def test_failed_job_leaves_no_uncommitted_files_for_ecosystem_readers(
    tmp_path: Path, cfg: Config, inline: None
) -> None:
    from embedding_reader import EmbeddingReader

    make_shards(tmp_path / "in", n_shards=2, per_shard=6)
    out = tmp_path / "out"
    c = _with(cfg, input=str(tmp_path / "in"), output=str(out), embed__max_shard_retries=0)
    with pytest.raises(JobFailed, match="00001"):
        embed(c, worker="tests.support.faults_storage:fail_commit_of_00001")
    assert committed_shards(str(out)) == ["00000"]
    assert uncommitted_leftovers(str(out)) == []
    assert EmbeddingReader(str(out / "img_emb"), file_format="npy").count == 6


# ---- hangs ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_stalled_read_is_cut_off_by_read_timeout(
    tmp_path: Path, cfg: Config, faultyfs: Any, inline: None, caplog: pytest.LogCaptureFixture
) -> None:
    fs = fsspec.filesystem("faultymem")
    data = _tar_bytes(tmp_path, _samples(12))
    fs.pipe("faultymem://in/00000.tar", data)
    out = "faultymem://out"
    task = ShardTask("00000", "faultymem://in/00000.tar", out, "webdataset")
    c = _with(cfg, embed__read_timeout_s=1.0)
    with faults(stall_read="00000.tar", stall_after=len(data) // 2):
        t0 = time.monotonic()
        with pytest.raises(ReadTimeout, match="embed.read_timeout_s"):
            run_shard(task, get_model(cfg), c.embed)
        assert time.monotonic() - t0 < 30
        assert committed_shards(out) == []
        # Through the stage: each attempt is cut off, the shard is reported failed, the job does not hang.
        c = _with(c, input="faultymem://in/00000.tar", output=out, embed__max_shard_retries=1)
        with pytest.raises(JobFailed, match="00000"):
            embed(c)
    assert faultyfs.calls["stall"] == 3
    assert "no data for 1s (embed.read_timeout_s)" in caplog.text and committed_shards(out) == []


# ---- hostile input corpus through the CLI, under a memory bound ------------------------------------------

MEMORY_BOUND_KB = 2 * 1024 * 1024
ONE_MB_CAPTION = b"a long caption word " * (1024 * 1024 // 20)


def _encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def _hostile_shard() -> list[tuple[str, dict[str, bytes]]]:
    good = jpeg_bytes(3)
    rng = np.random.default_rng(0)
    png16 = _encode(Image.fromarray((rng.random((20, 24)) * 65535).astype(np.uint16)), "PNG")
    frames = [Image.new("P", (16, 12), i * 40) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    webp = _encode(Image.fromarray((rng.random((18, 22, 3)) * 255).astype(np.uint8)), "WEBP")
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>'
    return [
        ("good1", {"jpg": good, "txt": b"a good photo", "json": json.dumps({"url": "http://h/good1.jpg"}).encode()}),
        ("junk", {"bin": rng.bytes(3000)}),  # a garbage member with its own key, between samples
        ("png16", {"png": png16, "txt": b"sixteen bit"}),
        ("gif", {"gif": gif.getvalue(), "txt": b"animated"}),
        ("webp", {"webp": webp, "txt": b"webp"}),
        ("bomb", {"png": png_1bit(30_000, 30_000), "txt": b"decompression bomb"}),
        ("jpegclaim", {"jpg": jpeg_header_claiming(30_000, 30_000), "txt": b"header claims 30000x30000"}),
        ("svg", {"jpg": svg, "txt": b"svg saved as jpg"}),
        ("bigcaption", {"jpg": good, "txt": ONE_MB_CAPTION}),
        ("nocaption", {"jpg": good}),
        ("dup", {"jpg": good, "txt": b"first"}),
        ("dup", {"jpg": good, "txt": b"second"}),
        ("onlycaption", {"txt": b"only a caption"}),
        ("badjson", {"jpg": good, "txt": b"bad json", "json": b"{not json"}),
        ("listjson", {"jpg": good, "json": b"[1, 2]"}),
        ("mixed", {"jpg": good, "xyz": rng.bytes(500), "txt": b"junk member inside a sample"}),
        ("atlimit", {"png": png_1bit(9000, 9000), "txt": b"81 Mpx, just under embed.max_pixels"}),
        ("good1", {"jpg": good, "txt": b"same key again, not adjacent"}),
    ]


EXPECTED_STATUS = {
    "good1": "ok",
    "junk": "no_image",
    "png16": "ok",
    "gif": "ok",
    "webp": "ok",
    "bomb": "too_large",
    "jpegclaim": "too_large",
    "svg": "decode_error",
    "bigcaption": "ok",
    "nocaption": "ok",
    "dup": "ok",
    "onlycaption": "no_image",
    "badjson": "ok",
    "listjson": "ok",
    "mixed": "ok",
    "atlimit": "ok",
}

RSS_WRAPPER = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
)


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: dict[str, str]) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("hostile")
    inp = root / "in"
    samples = _hostile_shard()
    write_tar(inp / "00000.tar", samples)
    cut = write_tar(root / "whole.tar", _samples(8, seed=1)).read_bytes()
    (inp / "00001.tar").write_bytes(cut[: len(cut) * 5 // 8])  # truncated inside a member
    (inp / "00002.tar").write_bytes(np.random.default_rng(2).bytes(20_000))  # not a tar at all
    (inp / "00003.tar").write_bytes(gzip.compress(write_tar(root / "gz.tar", _samples(3, seed=2)).read_bytes()))
    out = root / "out"
    cmd = [
        sys.executable,
        "-c",
        RSS_WRAPPER,
        sys.executable,
        "-m",
        "pipeline.cli",
        "embed",
        f"input={inp}",
        f"output={out}",
        *overrides(tiny_model),
        "local.processes=1",
        "embed.batch_size=8",
    ]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    maxrss = int(r.stdout.rsplit("MAXRSS_KB", 1)[1].split()[0])
    return {
        "out": out,
        "samples": samples,
        "code": r.returncode,
        "stdout": r.stdout,
        "stderr": r.stderr,
        "maxrss_kb": maxrss,
        "wall": time.monotonic() - t0,
    }


@pytest.mark.slow
def test_hostile_corpus_exits_0_within_memory_bound(hostile_run: dict[str, Any]) -> None:
    assert hostile_run["code"] == 0, hostile_run["stderr"][-3000:]
    assert hostile_run["maxrss_kb"] < MEMORY_BOUND_KB, f"peak RSS {hostile_run['maxrss_kb'] // 1024} MB"
    out = hostile_run["stdout"]
    assert "damaged_shards: 00001, 00002" in out and "shards_failed: 0" in out
    assert "too_large=2" in out and "decode_error=1" in out and "no_image=2" in out


@pytest.mark.slow
def test_hostile_corpus_every_sample_has_a_row_and_a_reason(hostile_run: dict[str, Any]) -> None:
    out = str(hostile_run["out"])
    assert committed_shards(out, include_empty=True) == ["00000", "00001", "00002", "00003"]
    assert committed_shards(out) == ["00000", "00001", "00003"]  # the not-a-tar shard has no rows, so no data files
    img, txt, meta = _load(out, "00000")
    samples = hostile_run["samples"]
    assert meta["key"].tolist() == [k for k, _ in samples] and meta["index"].tolist() == list(range(len(samples)))
    assert len(img) == len(txt) == len(meta)
    assert meta["status"].tolist() == [EXPECTED_STATUS[k] for k, _ in samples]
    failed = meta["status"] != "ok"
    assert meta.loc[failed, "error"].str.len().gt(0).all()  # every failure says why
    bad = failed.to_numpy()
    assert np.all(img[bad] == 0) and np.allclose(np.linalg.norm(img[~bad], axis=1), 1, atol=1e-2)
    row = {k: meta[meta["key"] == k].iloc[0] for k in EXPECTED_STATUS}
    assert "30000x30000" in row["bomb"]["error"] and "30000x30000" in row["jpegclaim"]["error"]
    assert (row["atlimit"]["width"], row["atlimit"]["height"]) == (9000, 9000)
    assert (row["gif"]["width"], row["png16"]["width"], row["webp"]["width"]) == (16, 24, 22)
    assert row["nocaption"]["caption_status"] == "missing" and row["onlycaption"]["caption_status"] == "ok"
    assert len(row["bigcaption"]["caption"]) == len(ONE_MB_CAPTION) and row["bigcaption"]["caption_status"] == "ok"
    assert meta[meta["key"] == "dup"]["caption"].tolist() == ["first", "second"]
    assert row["good1"]["url"] == "http://h/good1.jpg" and row["badjson"]["url"] is None

    _, _, cut = _load(out, "00001")  # truncated: the samples before the damage, the cut one flagged
    assert 1 <= len(cut) < 8 and cut["key"].tolist() == [f"{i:04d}" for i in range(len(cut))]
    assert (cut["status"].iloc[:-1] == "ok").all() and cut["status"].iloc[-1] in ("ok", "read_error")
    stats = {s: read_stats(out, s) for s in committed_shards(out, include_empty=True)}
    assert stats["00001"]["read_error"] and stats["00002"]["read_error"] and stats["00002"]["rows"] == 0
    _, _, gz = _load(out, "00003")  # a gzip-compressed tar named .tar is read transparently
    assert (gz["status"] == "ok").all() and len(gz) == 3
    assert sum(s["rows"] for s in stats.values()) == sum(s["samples"] for s in stats.values())


def test_icon_hiding_a_huge_png_is_rejected_without_decoding_it(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.ico"
    bomb.write_bytes(ico_wrapping(png_1bit(30_000, 30_000)))
    code = (
        "import resource, sys; from pipeline.embed.decode import decode_image, SampleError\n"
        f"try:\n    decode_image(open({str(bomb)!r}, 'rb').read(), 89_478_485)\n"
        "except SampleError as e:\n    print('STATUS', e.status)\n"
        # VmHWM belongs to this exec'd image; ru_maxrss would include the forked pytest parent's pages.
        "print('MAXRSS_KB', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    # Rejected before any pixel is decoded: ICO is not an accepted container (decode_error) or too large.
    assert "STATUS decode_error" in r.stdout or "STATUS too_large" in r.stdout, r.stderr[-2000:]
    assert int(r.stdout.rsplit("MAXRSS_KB", 1)[1].split()[0]) < 400 * 1024


@pytest.mark.slow
def test_one_megabyte_single_word_caption_is_tokenized_quickly() -> None:
    code = (
        "import signal, random, string, time, open_clip, torch\n"
        "from pipeline.embed.batch import RawSample\nfrom pipeline.embed.decode import BatchDecoder\n"
        "d = BatchDecoder(None, open_clip.tokenize, 10**8, (255, 255, 255), embed_image=False)\n"
        "rnd = random.Random(0)\n"
        "word = ''.join(rnd.choice(string.ascii_lowercase) for _ in range(1 << 20)).encode()\n"
        "signal.alarm(3)\nt0 = time.perf_counter()\nd('00000', [RawSample('k', 0, None, word)])\n"
        # disarmed before the interpreter's teardown, which under load can take longer than the call itself
        "signal.alarm(0)\nprint('SECONDS', time.perf_counter() - t0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0 and "SECONDS" in r.stdout, f"killed by the 3 s alarm (rc {r.returncode})"


def test_invalid_json_sidecar_is_noted_in_metadata(tmp_path: Path, cfg: Config) -> None:
    tar = write_tar(tmp_path / "00000.tar", [("k", {"jpg": jpeg_bytes(1), "json": b"{not json"})])
    run_shard(ShardTask("00000", str(tar), str(tmp_path / "out"), "webdataset"), get_model(cfg), cfg.embed)
    _, _, meta = _load(str(tmp_path / "out"), "00000")
    assert meta["error"].iloc[0] and "json" in meta["error"].iloc[0]


# ---- bad configuration and arguments ----------------------------------------------------------------------


@pytest.fixture
def existing(tmp_path: Path, tiny_model: dict[str, str]) -> dict[str, Any]:
    """A valid input folder and an output folder already holding a committed shard and a run.json."""
    from tests.support.helpers import random_unit, write_fake_embed_output

    make_shards(tmp_path / "in", n_shards=1, per_shard=3)
    out = tmp_path / "out"
    write_fake_embed_output(out, {"00000": random_unit(3, 32)})
    (out / "run.json").write_text('{"exit_status": 0}')
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no shards here")
    base = [f"input={tmp_path / 'in'}", f"output={out}", *overrides(tiny_model)]
    return {"tmp": tmp_path, "out": out, "base": base, "before": _snapshot(out)}


BAD_ARGS = {
    "wrong type": (["embed.batch_size=abc"], "embed.batch_size"),
    "negative retries": (["embed.max_shard_retries=-1"], "embed.max_shard_retries"),
    "zero timeout": (["embed.shard_timeout_s=0"], "embed.shard_timeout_s"),
    "unknown nested key": (["embed.batchsize=8"], "embed.batchsize: unknown key"),
    "bad dtype": (["embed.output_dtype=float64"], "embed.output_dtype"),
    "input does not exist": (["input={tmp}/missing/{{00000..00002}}.tar"], "does not exist"),
    "input folder without shards": (["input={tmp}/notes"], "input"),
    "empty input folder": (["input={tmp}/empty"], "names no files"),
    "input set to null": (["input=null"], "input="),
    "nothing to embed": (["embed.image=false", "embed.text=false"], "nothing to embed"),
    "checkpoint missing": (["model.checkpoint={tmp}/nope.pt"], "model.checkpoint"),
    "device decode for a family without open_clip preprocessing": (
        ["model=offline", "embed.decode=device"],
        "embed.decode=device needs model.family=open_clip",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGS))
def test_bad_arguments_exit_2_and_touch_nothing(
    case: str, existing: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    extra, needle = BAD_ARGS[case]
    args = [a.format(tmp=existing["tmp"]) for a in extra]
    assert cli.main(["embed", *existing["base"], *args]) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert _snapshot(existing["out"]) == existing["before"]  # nothing written or overwritten, run.json included


@pytest.mark.parametrize("where", ["under a regular file", "in /proc"])
def test_unusable_output_location_fails_with_its_path(
    where: str, tmp_path: Path, tiny_model: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    make_shards(tmp_path / "in", n_shards=1, per_shard=2)
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    out = str(blocker / "emb") if where == "under a regular file" else "/proc/clipline-test-output"
    code = cli.main(["embed", f"input={tmp_path / 'in'}", f"output={out}", *overrides(tiny_model)])
    assert code in (1, 2)
    assert out in capsys.readouterr().err
    assert blocker.read_text() == "keep me" and not os.path.exists(out)


def test_output_that_is_a_regular_file_returns_an_exit_code(
    tmp_path: Path, tiny_model: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    make_shards(tmp_path / "in", n_shards=1, per_shard=2)
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    code = cli.main(["embed", f"input={tmp_path / 'in'}", f"output={blocker}", *overrides(tiny_model)])
    assert code in (1, 2) and str(blocker) in capsys.readouterr().err
    assert blocker.read_text() == "keep me"


def test_corrupt_manifest_is_named(existing: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    (existing["out"] / "manifest.json").write_text('{"format_ver')
    before = _snapshot(existing["out"])
    assert cli.main(["embed", *existing["base"]]) == 2
    assert "manifest.json" in capsys.readouterr().err
    assert _snapshot(existing["out"]) == before


def test_failed_run_with_a_broken_model_does_not_lock_the_output(
    tmp_path: Path, tiny_model: dict[str, str], inline: None, capsys: pytest.CaptureFixture[str]
) -> None:
    make_shards(tmp_path / "in", n_shards=1, per_shard=2)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    base = ["embed", f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}", "embed.max_shard_retries=0"]
    assert cli.main(base + overrides(dict(tiny_model, **{"model.checkpoint": str(broken)}))) == 1
    assert committed_shards(str(tmp_path / "out")) == []
    capsys.readouterr()
    assert cli.main(base + overrides(tiny_model)) == 0, capsys.readouterr().err[-1500:]


def test_output_inside_input_folder_is_not_reembedded(tmp_path: Path, tiny_model: dict[str, str], inline: None) -> None:
    make_shards(tmp_path / "data", n_shards=2, per_shard=3)
    argv = ["embed", f"input={tmp_path / 'data'}", f"output={tmp_path / 'data' / 'emb'}", *overrides(tiny_model)]
    first = cli.main(argv)
    second = cli.main(argv)
    assert (first, second) == (0, 0)
    assert committed_shards(str(tmp_path / "data" / "emb")) == ["00000", "00001"]


def test_images_added_to_a_folder_input_are_embedded_on_rerun(
    tmp_path: Path, tiny_model: dict[str, str], inline: None
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(12):
        (folder / f"img_{i:03d}.jpg").write_bytes(jpeg_bytes(i))
    argv = [
        "embed",
        f"input={folder}",
        f"output={tmp_path / 'out'}",
        *overrides(tiny_model),
        "embed.folder_shard_size=5",
    ]
    assert cli.main(argv) == 0
    for i in range(12, 14):  # sort last: they belong in the last, partly filled shard
        (folder / f"img_{i:03d}.jpg").write_bytes(jpeg_bytes(i))
    assert cli.main(argv) == 0
    keys = [k for s in committed_shards(str(tmp_path / "out")) for k in _load(str(tmp_path / "out"), s)[2]["key"]]
    assert sorted(keys) == [f"img_{i:03d}" for i in range(14)]


def test_empty_shard_keeps_output_readable_by_embedding_reader(
    tmp_path: Path, tiny_model: dict[str, str], inline: None
) -> None:
    """A 0-row npy broke embedding-reader's parquet_npy mode for the whole folder: empty shards commit stats only."""
    from embedding_reader import EmbeddingReader

    make_shards(tmp_path / "in", n_shards=3, per_shard=4)
    with tarfile.open(tmp_path / "in" / "00001.tar", "w"):
        pass  # a valid tar with no members
    out = tmp_path / "out"
    assert cli.main(["embed", f"input={tmp_path / 'in'}", f"output={out}", *overrides(tiny_model)]) == 0
    reader = EmbeddingReader(
        str(out / "img_emb"), file_format="parquet_npy", metadata_folder=str(out / "metadata"), meta_columns=["key"]
    )
    rows = sum(len(emb) for emb, _ in reader(batch_size=3, start=0, end=reader.count, show_progress=False))
    assert rows == 8
    assert committed_shards(str(out)) == ["00000", "00002"] and not (out / "img_emb" / "img_emb_00001.npy").exists()
    marker = out / "stats" / "stats_00001.json"
    before = marker.stat().st_mtime_ns
    assert cli.main(["embed", f"input={tmp_path / 'in'}", f"output={out}", *overrides(tiny_model)]) == 0
    assert marker.stat().st_mtime_ns == before and read_stats(str(out), "00001")["rows"] == 0  # done, not redone
