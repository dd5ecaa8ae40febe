"""Querying an index folder by text, image and key with the model recorded in the embed manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.config import ModelConfig, load_config
from pipeline.core.errors import ConfigError
from pipeline.index.stage import build
from pipeline.models import ModelLoadError
from pipeline.query.search import COLUMNS, Searcher, query_cli
from tests.support.helpers import jpeg_bytes, random_unit, write_fake_embed_output

CAPTION = "a red bicycle leaning on a wall"
TEXT_KEY, IMAGE_KEY = "000010007", "000000012"

pytestmark = pytest.mark.slow  # every test queries one built index (tiny model + autofaiss build, ~15 s)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: dict[str, str]) -> Path:
    """Two shards of random 32-d vectors with two planted samples: one whose image embedding is the tiny model's
    embedding of CAPTION, one whose image embedding is that of a JPEG on disk."""
    from pipeline.core.images import decode_image
    from pipeline.models import load_model, model_fingerprint

    tmp = tmp_path_factory.mktemp("search")
    mc = ModelConfig(
        arch=tiny_model["model.arch"],
        checkpoint=tiny_model["model.checkpoint"],
        model_config_file=tiny_model["model.model_config_file"],
        pretrained=None,
        device="cpu",
    )
    model = load_model(mc)
    (tmp / "query.jpg").write_bytes(jpeg_bytes(42, size=(64, 64)))
    with torch.no_grad():
        txt = model.encode_text(model.tokenize([CAPTION])).numpy()[0]
        img = model.encode_image(model.preprocess(decode_image(jpeg_bytes(42, size=(64, 64)), 10**8))[None]).numpy()[0]
    shards = {"00000": random_unit(30, 32, 1), "00001": random_unit(30, 32, 2)}
    shards["00001"][7] = txt
    shards["00000"][12] = img
    captions = {s: {"caption": [f"caption {s} {i}" for i in range(30)]} for s in shards}
    captions["00001"]["caption"][7] = CAPTION
    root = write_fake_embed_output(tmp / "emb", shards, model=model_fingerprint(mc), extra_meta=captions)
    manifest = json.loads((Path(root) / "manifest.json").read_text())
    manifest["model_config"] = mc.model_dump(mode="json")
    (Path(root) / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config([f"input={root}", "index.recall_queries=20"])
    summary = build(cfg)  # autofaiss picks the index type (Flat at this size)
    assert summary["image"]["vectors"] == 60
    return Path(root) / "index"


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
