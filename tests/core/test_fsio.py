"""core/fsio.py: every write is whole or absent."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pandas as pd
import pytest

from pipeline.core.fsio import TMP_MARK, put_bytes, put_json, put_parquet, read_json, tmp_name


def test_put_bytes_removes_its_temporary_file_when_the_rename_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    fs = fsspec.filesystem("memory")

    def failing_mv(*args: object, **kwargs: object) -> None:
        raise OSError("injected: rename failed")

    monkeypatch.setattr(fs, "mv", failing_mv)
    with pytest.raises(OSError, match="injected"):
        put_bytes(fs, "/putbytes/out/summary.json", b"{}")
    assert fs.ls("/putbytes/out", detail=False) == []  # neither the final file nor a temporary one


def test_put_parquet_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "t" / "keep.parquet"
    put_parquet(str(path), pd.DataFrame({"key": ["a"]}))
    put_parquet(str(path), pd.DataFrame({"key": ["b", "c"]}))
    assert pd.read_parquet(path)["key"].tolist() == ["b", "c"]
    assert [p.name for p in path.parent.iterdir()] == ["keep.parquet"]


def test_json_round_trip_and_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "a" / "b.json")
    assert read_json(path) is None
    put_json(path, {"z": 1, "a": [1, 2]})
    assert read_json(path) == {"z": 1, "a": [1, 2]}
    assert list((tmp_path / "a").iterdir()) == [tmp_path / "a" / "b.json"]


def test_temporary_names_are_unique_and_marked() -> None:
    a, b = tmp_name("/x/y.npy"), tmp_name("/x/y.npy")
    assert a != b and TMP_MARK in a and a.startswith("/x/y.npy")
