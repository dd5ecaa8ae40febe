"""Shard planning: input expansion (paths, folders, braces, globs, lists, fsspec) and stable shard ids."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest

from pipeline.core.errors import ConfigError
from pipeline.core.inputs import expand_input, shard_id_from_name
from pipeline.core.tasks import ShardTask
from pipeline.embed.plan import plan_shards


def _touch(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


def test_shard_ids_are_stable_and_padded() -> None:
    assert shard_id_from_name("/d/12.tar") == "00012"
    assert shard_id_from_name("s3://b/x/000123.tar") == "000123"
    assert shard_id_from_name("/d/part a.parquet") == "part_a"


def test_expand_folder_brace_glob_list(tmp_path: Path) -> None:
    for i in range(3):
        _touch(tmp_path / f"{i:05d}.tar")
    _touch(tmp_path / "00000.parquet")
    _touch(tmp_path / "notes.md")
    assert len(expand_input(str(tmp_path))) == 4  # tars + parquet, not notes.md
    assert expand_input(str(tmp_path / "{00000..00002}.tar")) == [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    assert expand_input(str(tmp_path / "*.tar")) == [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    assert len(expand_input([str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")])) == 2
    with pytest.raises(ConfigError, match="does not exist"):
        expand_input(str(tmp_path / "{00000..00003}.tar"))


def test_brace_names_are_looked_up_in_one_listing_per_folder(tmp_path: Path) -> None:
    from tests.support.countfs import CountingFileSystem

    for i in range(30):
        _touch(tmp_path / "a" / f"{i:05d}.tar")
    _touch(tmp_path / "b" / "00000.tar")
    _touch(tmp_path / "b" / "sub" / "00001.tar")
    CountingFileSystem.calls.clear()
    urls = expand_input(f"countfile://{tmp_path}/{{a/{{00000..00029}}.tar,b/00000.tar,b/sub}}")
    assert [u.rsplit("/", 2)[-2:] for u in urls] == [["a", f"{i:05d}.tar"] for i in range(30)] + [
        ["b", "00000.tar"],
        ["sub", "00001.tar"],
    ]
    assert CountingFileSystem.calls["LIST"] == 3 and CountingFileSystem.calls["HEAD"] == 0  # a/, b/, and b/sub found
    with pytest.raises(ConfigError, match="b/00009.tar does not exist"):
        expand_input(f"countfile://{tmp_path}/b/{{00000,00009}}.tar")


def test_memory_fsspec_urls() -> None:
    fs = fsspec.filesystem("memory")
    for i in range(2):
        fs.pipe(f"/plan/{i:05d}.tar", b"x")
    want = ["memory:///plan/00000.tar", "memory:///plan/00001.tar"]  # fsspec's own spelling of the paths
    assert expand_input("memory://plan/{00000..00001}.tar") == want
    assert expand_input("memory://plan/*.tar") == want
    assert expand_input("memory://plan") == want
    tasks = plan_shards(want, "memory://out")
    assert tasks == [ShardTask(f"0000{i}", want[i], "memory://out", "webdataset") for i in range(2)]


def test_plan_sorted_and_conflicts(tmp_path: Path) -> None:
    urls = [str(tmp_path / "00002.tar"), str(tmp_path / "00000.tar")]
    tasks = plan_shards(urls, "/out")
    assert [t.shard_id for t in tasks] == ["00000", "00002"]
    assert tasks[0] == ShardTask("00000", str(tmp_path / "00000.tar"), "/out", "webdataset")
    with pytest.raises(ConfigError, match="same shard name"):
        plan_shards(["/a/00000.tar", "/b/00000.tar"], "/out")


def test_folder_inputs_chunked(tmp_path: Path) -> None:
    for i in range(5):
        _touch(tmp_path / "imgs" / f"im{i}.jpg")
    _touch(tmp_path / "imgs" / "im0.txt")
    urls = expand_input(str(tmp_path / "imgs"))
    assert len(urls) == 5  # .txt captions are not inputs
    tasks = plan_shards(urls, "/out", folder_shard_size=2)
    assert [t.shard_id for t in tasks] == ["00000", "00001", "00002"]
    assert [len(t.members) for t in tasks] == [2, 2, 1] and all(t.kind == "folder" for t in tasks)


def test_no_usable_files(tmp_path: Path) -> None:
    _touch(tmp_path / "a.md")
    with pytest.raises(ConfigError, match=r"^input: no \.tar, \.parquet or image files among \[.*a\.md'\]$"):
        plan_shards(expand_input(str(tmp_path / "a.md")), "/out")


def test_img2dataset_folder_tar_wins_and_unfinished_skipped(tmp_path: Path) -> None:
    from pipeline.embed.plan import drop_unfinished_downloads

    for i in range(3):
        _touch(tmp_path / f"{i:05d}.tar")
        _touch(tmp_path / f"{i:05d}.parquet")
    for i in range(2):  # shard 00002 is still downloading
        _touch(tmp_path / f"{i:05d}_stats.json")
    urls, unfinished = drop_unfinished_downloads(expand_input(str(tmp_path)))
    assert unfinished == [str(tmp_path / "00002.tar")]
    tasks = plan_shards(urls, "/out")
    assert [(t.shard_id, t.kind) for t in tasks] == [("00000", "webdataset"), ("00001", "webdataset")]
    plain = tmp_path / "plain"
    _touch(plain / "00000.tar")
    assert drop_unfinished_downloads(expand_input(str(plain)))[1] == []  # not an img2dataset folder
