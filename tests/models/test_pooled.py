"""The last block at the pooled position only (pipeline/models/pooled.py): same features as open_clip's forward."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.core.config import load_config
from pipeline.models import load_model
from pipeline.models import openclip as openclip_mod
from pipeline.models import pooled as pooled_mod
from pipeline.models.openclip import OpenClipModel, encode_text_by_length, length_groups, token_lengths
from pipeline.models.pooled import block_at, can_pool_image, can_pool_text, encode_image_pooled
from tests.support.helpers import TINY_CONFIG, custom_checkpoint, overrides

# Long and short captions interleaved, so rows are cut at different lengths and padded inside their group.
CAPTIONS = ["a cat", "word " * 60, "", "a photo of two dogs playing in the snow", "naïve café", "x " * 20] * 2


def _pixels(n: int, size: int) -> torch.Tensor:
    return torch.randn((n, 3, size, size), generator=torch.Generator().manual_seed(0))


def _load(ov: dict[str, str], *extra: str) -> OpenClipModel:
    m = load_model(load_config([*overrides(ov), "model.device=cpu", *extra]).model)
    assert isinstance(m, OpenClipModel)
    return m


def _variant(tmp_path: Path, name: str, vision: dict, text: dict) -> dict[str, str]:
    config = json.loads(json.dumps(TINY_CONFIG))
    config["vision_cfg"].update(vision)
    config["text_cfg"].update(text)
    return custom_checkpoint(tmp_path, name, config)


@pytest.mark.parametrize(
    "vision, text",
    [
        ({}, {}),
        # LayerScale in both towers, the vision norm after pooling, end-of-text pooling by token id
        (
            {"ls_init_value": 0.5, "final_ln_after_pool": True},
            {"ls_init_value": 0.5, "pool_type": "eos", "eos_id": 49407},
        ),
    ],
)
def test_pooled_last_block_equals_plain_forward(tmp_path: Path, vision: dict, text: dict) -> None:
    m = _load(_variant(tmp_path, f"tiny-pooled-{len(vision)}", vision, text))
    assert m.pooled_image and m.pooled_text
    pixels, tokens = _pixels(5, 32), m.tokenize(CAPTIONS)
    assert len(length_groups(token_lengths(tokens).tolist())) >= 2
    with torch.inference_mode():
        plain_img, plain_txt = m.model.encode_image(pixels), m.model.encode_text(tokens)
        assert (encode_image_pooled(m.model, pixels) - plain_img).abs().max().item() < 1e-5
        assert (encode_text_by_length(m.model, tokens, pooled=True) - plain_txt).abs().max().item() < 1e-5
    # and what the model hands the writer: the pooled paths, normalized
    assert (m.encode_image(pixels) - F.normalize(plain_img, dim=-1)).abs().max().item() < 1e-5
    assert (m.encode_text(tokens) - F.normalize(plain_txt, dim=-1)).abs().max().item() < 1e-5


def test_block_at_equals_the_block_at_every_position(tmp_path: Path) -> None:
    """One block, every query position, with and without the causal row mask."""
    m = _load(_variant(tmp_path, "tiny-pooled-block", {}, {}))
    block = m.model.transformer.resblocks[-1]
    x = torch.randn((3, 9, 64), generator=torch.Generator().manual_seed(1))
    causal = torch.full((9, 9), float("-inf")).triu(1)
    with torch.inference_mode():
        full, full_causal = block(x), block(x, attn_mask=causal)
        for p in range(9):
            pos = torch.tensor([p, (p + 3) % 9, 8 - p])
            rows = torch.arange(3)
            assert (block_at(block, x, pos, causal=False) - full[rows, pos]).abs().max().item() < 1e-5
            assert (block_at(block, x, pos, causal=True) - full_causal[rows, pos]).abs().max().item() < 1e-5


def test_towers_outside_the_plain_structure_keep_the_plain_forward(tmp_path: Path) -> None:
    import open_clip

    ov = _variant(
        tmp_path, "tiny-attnpool", {"attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 2}, {}
    )
    m = _load(ov)
    assert not can_pool_image(m.model) and not m.pooled_image
    assert m.pooled_text  # the text tower is still the plain one
    ref = open_clip.create_model(ov["model.arch"], pretrained=ov["model.checkpoint"]).eval()
    pixels = _pixels(3, 32)
    with torch.inference_mode():
        expected = F.normalize(ref.encode_image(pixels), dim=-1)
    assert (m.encode_image(pixels) - expected).abs().max().item() < 1e-5
    noncausal = _load(_variant(tmp_path, "tiny-nocausal", {}, {"no_causal_mask": True, "pool_type": "last"}))
    assert not noncausal.trim_text and not noncausal.pooled_text
    assert can_pool_text(noncausal.model)  # structurally plain: only the trim check keeps it off


def test_load_time_check_falls_back_when_the_pooled_path_disagrees(
    tiny_model: dict[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = pooled_mod.run_blocks_pooled
    for module in (pooled_mod, openclip_mod):  # the image path's reference and the text path's
        monkeypatch.setattr(module, "run_blocks_pooled", lambda *a, **k: real(*a, **k) * -1)
    with caplog.at_level(logging.WARNING):
        m = _load(tiny_model)
    assert not m.pooled_image and not m.pooled_text
    assert "image tower: the pooled last block disagrees" in caplog.text
    assert "text tower: the pooled last block disagrees" in caplog.text
    pixels = _pixels(2, 32)
    with torch.inference_mode():
        expected = F.normalize(m.model.encode_image(pixels), dim=-1)
    assert (m.encode_image(pixels) - expected).abs().max().item() < 1e-6


def test_int8_keeps_the_pooled_paths_and_stays_close_to_fp32(tiny_model: dict[str, str]) -> None:
    fp32, int8 = _load(tiny_model), _load(tiny_model, "model.precision=int8")
    assert int8.pooled_image and int8.pooled_text
    rng = np.random.default_rng(0)
    ims = [Image.fromarray((rng.random((40, 50, 3)) * 255).astype("uint8")) for _ in range(4)]
    pixels = torch.stack([fp32.preprocess(im) for im in ims])
    tokens = fp32.tokenize(CAPTIONS)
    assert F.cosine_similarity(int8.encode_image(pixels), fp32.encode_image(pixels)).min().item() >= 0.99
    assert F.cosine_similarity(int8.encode_text(tokens), fp32.encode_text(tokens)).min().item() >= 0.99
