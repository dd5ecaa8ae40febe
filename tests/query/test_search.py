"""Querying an index folder by text, image and key with the model recorded in the embed manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.core.config import load_config
from pipeline.core.errors import ConfigError
from pipeline.models import ModelLoadError
from pipeline.query.search import COLUMNS, Searcher, query_cli
from tests.query.conftest import CAPTION, IMAGE_KEY, TEXT_KEY

pytestmark = pytest.mark.slow  # every test queries one built index (tiny model + autofaiss build, ~15 s)


def query(index_dir: Path, *extra: str, **kwargs: Any) -> str:
    return query_cli(load_config([f"input={index_dir}", *extra]), **kwargs)


def test_text_query_end_to_end(index_dir: Path) -> None:
    table = query(index_dir, "query.k=3", text=[CAPTION])
    lines = table.splitlines()
    assert lines[0].split() == COLUMNS and len(lines) == 4
    assert TEXT_KEY in lines[1] and CAPTION in lines[1]
    rows = [
        json.loads(line) for line in query(index_dir, "query.k=3", "query.format=jsonl", text=[CAPTION]).splitlines()
    ]
    assert [r["rank"] for r in rows] == [1, 2, 3] and list(rows[0]) == COLUMNS
    assert rows[0]["key"] == TEXT_KEY and rows[0]["caption"] == CAPTION and rows[0]["score"] > 0.99
    assert rows[0]["url"] == "http://127.0.0.1/00001/7.jpg"


def test_image_query_by_path_and_pil(index_dir: Path) -> None:
    searcher = Searcher(str(index_dir))
    path = str(index_dir.parent.parent / "query.jpg")
    df = searcher.search_image([path, Image.open(path)], k=2)
    top = df[df["rank"] == 1]
    assert list(top["key"]) == [IMAGE_KEY, IMAGE_KEY] and list(top["query"]) == [path, "image 1"]
    assert (top["score"] > 0.99).all()


def test_key_query_returns_the_sample_first(index_dir: Path) -> None:
    searcher = Searcher(str(index_dir), modality="text")
    df = searcher.search_key(["000000003", TEXT_KEY], k=4)
    assert list(df[df["rank"] == 1]["key"]) == ["000000003", TEXT_KEY]
    assert len(df) == 8 and set(df["query"]) == {"000000003", TEXT_KEY}
    with pytest.raises(KeyError, match="nope"):
        searcher.search_key(["nope"], k=1)
    with pytest.raises(ConfigError, match="nope"):
        query(index_dir, key=["nope"])


def test_cli_query_prints_jsonl(index_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli.main import main

    assert (
        main(["query", f"input={index_dir}", "log_level=ERROR", "--text", CAPTION, "-k", "2", "--format", "jsonl"]) == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 2 and rows[0]["key"] == TEXT_KEY


def test_changed_model_weights_are_refused(index_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "index"
    shutil.copytree(index_dir, copy)
    info = json.loads((copy / "image.json").read_text())
    info["embed"]["model"]["checkpoint_sha256"] = "0" * 64
    (copy / "image.json").write_text(json.dumps(info))
    with pytest.raises(ModelLoadError, match="now has other weights"):
        Searcher(str(copy)).search_text([CAPTION], k=1)


def test_search_vectors_checks_dim_and_missing_index(index_dir: Path, tmp_path: Path) -> None:
    searcher = Searcher(str(index_dir))
    with pytest.raises(ValueError, match="dim"):
        searcher.search_vectors(np.zeros((1, 8), np.float32))
    with pytest.raises(FileNotFoundError):
        Searcher(str(tmp_path))
    with pytest.raises(ConfigError, match="exactly one"):
        query(index_dir, text=["a"], key=["b"])
