"""The index folder test_search.py and test_serve.py query: built once per session (tiny model + autofaiss)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.core.config import ModelConfig, load_config
from pipeline.index.stage import build
from tests.support.foreign import near_copy
from tests.support.helpers import jpeg_bytes, random_unit, write_fake_embed_output

CAPTION = "a red bicycle leaning on a wall"
TEXT_KEY, IMAGE_KEY = "000010007", "000000012"
NO_IMAGE_KEY = "000000020"  # its image failed to decode: in the text index only
DUPLICATE_KEYS = ("000000025", "000010025")  # image vectors at cosine 0.97
QUERY_JPEG = jpeg_bytes(42, size=(64, 64))  # the image whose embedding IMAGE_KEY holds


@pytest.fixture(scope="session")
def index_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: dict[str, str]) -> Path:
    """Two shards of random 32-d vectors (text vectors equal to image vectors) with planted samples: one whose
    image embedding is the tiny model's embedding of CAPTION, one whose image embedding is that of QUERY_JPEG (also
    written to query.jpg beside the index's embed folder), a pair of near-duplicates, and one sample whose image
    failed (status decode_error), so the text index has one sample more than the image index."""
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
    (tmp / "query.jpg").write_bytes(QUERY_JPEG)
    with torch.no_grad():
        txt = model.encode_text(model.tokenize([CAPTION])).numpy()[0]
        img = model.encode_image(model.preprocess(decode_image(QUERY_JPEG, 10**8))[None]).numpy()[0]
    shards = {"00000": random_unit(30, 32, 1), "00001": random_unit(30, 32, 2)}
    shards["00001"][7] = txt
    shards["00000"][12] = img
    shards["00001"][25] = near_copy(shards["00000"][25], 0.97, 7)
    meta = {s: {"caption": [f"caption {s} {i}" for i in range(30)]} for s in shards}
    meta["00001"]["caption"][7] = CAPTION
    meta["00000"]["status"] = ["ok"] * 20 + ["decode_error"] + ["ok"] * 9
    root = write_fake_embed_output(tmp / "emb", shards, model=model_fingerprint(mc), extra_meta=meta)
    manifest = json.loads((Path(root) / "manifest.json").read_text())
    manifest["model_config"] = mc.model_dump(mode="json")
    (Path(root) / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config([f"input={root}", "index.recall_queries=20"])
    summary = build(cfg)  # autofaiss picks the index type (Flat at this size)
    assert summary["image"]["vectors"] == 59 and summary["text"]["vectors"] == 60
    return Path(root) / "index"
