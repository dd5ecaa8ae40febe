"""Reading shards: tar grouping and keys, damaged tars, img2dataset parquet, folders, stalls."""

from __future__ import annotations

import json
import tarfile
import time
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.tasks import ShardTask
from pipeline.embed.batch import RawSample
from pipeline.embed.reader import ReadTimeout, ShardDamaged, iter_samples, threaded
from tests.support.helpers import jpeg_bytes, write_tar

IMG = ["jpg", "png"]
CAP = ["txt"]


def _task(path: Path, kind: str = "webdataset", members: tuple[str, ...] = ()) -> ShardTask:
    return ShardTask("00000", str(path), "/out", kind, members)


def test_tar_samples_in_order_with_fields(tmp_path: Path) -> None:
    p = write_tar(
        tmp_path / "00000.tar",
        [
            ("a/000", {"jpg": b"J0", "txt": b"cap0", "json": json.dumps({"url": "u0", "sha256": "s0"}).encode()}),
            ("a/001", {"png": b"P1"}),
            ("a/002", {"txt": b"only caption"}),
        ],
    )
    got = list(iter_samples(_task(p), IMG, CAP))
    assert [(s.key, s.index) for s in got] == [("000", 0), ("001", 1), ("002", 2)]
    assert got[0].image == b"J0" and got[0].caption == b"cap0" and got[0].meta["url"] == "u0"
    assert got[1].image == b"P1" and got[1].caption is None
    assert got[2].image is None and got[2].caption == b"only caption"


def test_duplicate_key_becomes_two_samples(tmp_path: Path) -> None:
    p = write_tar(tmp_path / "00000.tar", [("k", {"jpg": b"1", "txt": b"a"}), ("k", {"jpg": b"2", "txt": b"b"})])
    got = list(iter_samples(_task(p), IMG, CAP))
    assert [(s.key, s.image) for s in got] == [("k", b"1"), ("k", b"2")]


def _issue_tar(tmp_path: Path, n: int = 21) -> tuple[Path, bytes, dict[str, tarfile.TarInfo]]:
    """n samples (image + caption) written whole; returns the tar, its bytes and its members by name."""
    samples = [(f"{i:04d}", {"jpg": jpeg_bytes(i, (64, 64)), "txt": f"c{i}".encode()}) for i in range(n)]
    p = write_tar(tmp_path / "00000.tar", samples)
    with tarfile.open(p) as t:
        members = {m.name: m for m in t.getmembers()}
    return p, p.read_bytes(), members


def _read_cut(p: Path, data: bytes, cut: int) -> tuple[list[RawSample], str | None]:
    p.write_bytes(data[:cut])
    got: list[RawSample] = []
    try:
        for s in iter_samples(_task(p), IMG, CAP):
            got.append(s)
    except ShardDamaged as e:
        return got, str(e)
    return got, None


def test_cut_inside_a_sample_keeps_every_complete_sample(tmp_path: Path) -> None:
    """The issue's case: 20 complete samples, then the tar ends inside the 21st sample's image."""
    p, data, members = _issue_tar(tmp_path)
    m = members["0020.jpg"]
    got, damage = _read_cut(p, data, m.offset_data + m.size // 2)
    assert damage is not None and "unexpected end of data" in damage
    assert [s.key for s in got] == [f"{i:04d}" for i in range(21)] and [s.index for s in got] == list(range(21))
    for i, s in enumerate(got[:20]):  # every complete sample: whole, unflagged
        assert s.error is None and s.image == jpeg_bytes(i, (64, 64)) and s.caption == f"c{i}".encode()
    assert got[20].error is not None and "cut" in got[20].error and got[20].image is None


@pytest.mark.parametrize(
    "where, flagged_has_image",
    [
        ("jpg header, name readable", False),
        ("jpg header, 20 bytes of it", False),
        ("txt header", True),
        ("txt data", True),
    ],
)
def test_the_sample_a_cut_falls_in_gets_its_own_flagged_row(
    tmp_path: Path, where: str, flagged_has_image: bool
) -> None:
    """Cut inside a member header (which tarfile's stream mode takes for a clean end) or inside a later member of
    the sample: the 20 samples before are ok, sample 0020 has a row of its own, flagged, and the shard is damaged."""
    p, data, members = _issue_tar(tmp_path)
    jpg, txt = members["0020.jpg"], members["0020.txt"]
    cut = {
        "jpg header, name readable": jpg.offset + 300,
        "jpg header, 20 bytes of it": jpg.offset + 20,
        "txt header": txt.offset + 200,
        "txt data": txt.offset_data + 1,
    }[where]
    got, damage = _read_cut(p, data, cut)
    assert damage is not None
    assert [s.key for s in got] == [f"{i:04d}" for i in range(21)]
    assert all(s.error is None and s.caption == f"c{i}".encode() for i, s in enumerate(got[:20]))
    assert got[20].error is not None and (got[20].image is not None) == flagged_has_image and got[20].caption is None


@pytest.mark.parametrize("into_header", [0, 4])
def test_cut_between_two_samples_keeps_them_all_and_marks_the_shard(tmp_path: Path, into_header: int) -> None:
    """Cut at a member boundary, or so early in the next header that its name is cut too: every sample read is
    whole and kept; the shard is recorded as damaged (no end-of-archive block); a member whose name is gone can have
    no row."""
    p, data, members = _issue_tar(tmp_path)
    got, damage = _read_cut(p, data, members["0020.jpg"].offset + into_header)
    assert damage is not None and "archive cut at byte" in damage and "(unreadable)" in damage
    assert [s.key for s in got] == [f"{i:04d}" for i in range(20)] and all(s.error is None for s in got)


def test_whole_tar_and_a_cut_in_its_end_blocks(tmp_path: Path) -> None:
    p, data, members = _issue_tar(tmp_path)
    got, damage = _read_cut(p, data, len(data))
    assert damage is None and len(got) == 21 and all(s.error is None for s in got)
    end = members["0020.txt"].offset_data + 512  # the end-of-archive blocks start after the last member's data
    got, damage = _read_cut(p, data, end + 512)  # first zero block whole: the archive's end was read
    assert damage is None and len(got) == 21 and all(s.error is None for s in got)


def test_runner_keeps_every_complete_sample_of_a_cut_tar(tmp_path: Path, tiny_model: dict[str, str]) -> None:
    """End to end through the per-shard loop: 20 ok rows with embeddings, one read_error row for the cut sample."""
    from pipeline.core.config import load_config
    from pipeline.embed.runner import get_model, run_shard
    from tests.support.helpers import load_shard, overrides

    cfg = load_config(overrides(tiny_model) + ["embed.batch_size=8", "embed.output_dtype=float32"])
    p, data, members = _issue_tar(tmp_path)
    m = members["0020.jpg"]
    p.write_bytes(data[: m.offset_data + m.size // 2])
    stats = run_shard(ShardTask("00000", str(p), str(tmp_path / "out"), "webdataset"), get_model(cfg), cfg.embed)
    assert stats["read_error"] and stats["samples"] == 21 and stats["ok"] == 20
    img, _, meta = load_shard(str(tmp_path / "out"), "00000")
    assert meta["key"].tolist() == [f"{i:04d}" for i in range(21)]
    assert meta["status"].tolist() == ["ok"] * 20 + ["read_error"]
    assert (abs(img[:20]).sum(axis=1) > 0).all() and not img[20].any()


def test_garbage_tar_is_damaged(tmp_path: Path) -> None:
    p = tmp_path / "00000.tar"
    p.write_bytes(b"this is not a tar file at all" * 100)
    with pytest.raises(ShardDamaged):
        list(iter_samples(_task(p), IMG, CAP))


def test_img2dataset_parquet(tmp_path: Path) -> None:
    table = pa.table(
        {"key": ["000", "001"], "jpg": [b"J0", None], "txt": ["c0", "c1"], "url": ["u0", "u1"], "sha256": ["s0", None]}
    )
    p = tmp_path / "00000.parquet"
    pq.write_table(table, p)
    got = list(iter_samples(_task(p, "parquet"), IMG, CAP))
    assert [s.key for s in got] == ["000", "001"]
    assert got[0].image == b"J0" and got[0].caption == "c0" and got[0].meta["url"] == "u0"
    assert got[1].image is None


def test_folder_with_captions(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"A")
    (tmp_path / "a.txt").write_text("cap a")
    (tmp_path / "b.jpg").write_bytes(b"B")
    members = (str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"))
    got = list(iter_samples(_task(tmp_path, "folder", members), IMG, CAP))
    assert [(s.key, s.image, s.caption) for s in got] == [("a", b"A", b"cap a"), ("b", b"B", None)]


def test_threaded_reader_times_out_on_stall() -> None:
    def stalls() -> Iterator[RawSample]:
        yield RawSample("a", 0)
        time.sleep(5)
        yield RawSample("b", 1)

    it = threaded(stalls(), maxsize=4, timeout_s=0.5)
    assert next(it).key == "a"
    t0 = time.monotonic()
    with pytest.raises(ReadTimeout):
        next(it)
    assert time.monotonic() - t0 < 2


def test_threaded_reader_reraises_errors() -> None:
    def boom() -> Iterator[RawSample]:
        yield RawSample("a", 0)
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(threaded(boom(), maxsize=2, timeout_s=5))
