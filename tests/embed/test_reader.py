"""Reading shards: tar grouping and keys, damaged tars, img2dataset parquet, folders, stalls."""

from __future__ import annotations

import json
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


def test_truncated_tar_keeps_samples_before_damage(tmp_path: Path) -> None:
    samples = [(f"{i:04d}", {"jpg": jpeg_bytes(i, (64, 64)), "txt": f"c{i}".encode()}) for i in range(10)]
    p = write_tar(tmp_path / "00000.tar", samples)
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * 0.55)])
    got: list[RawSample] = []
    with pytest.raises(ShardDamaged):
        for s in iter_samples(_task(p), IMG, CAP):
            got.append(s)
    assert 3 <= len(got) <= 6
    assert [s.index for s in got] == list(range(len(got)))
    assert got[-1].error is not None and all(s.error is None for s in got[:-1])


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
