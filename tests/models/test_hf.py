"""The hf family on tiny random CLIP and SigLIP models saved with save_pretrained, tokenizer built offline."""

from __future__ import annotations

import gzip
import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.core.config import load_config, parse_model_string
from pipeline.models import ModelLoadError, load_model, model_fingerprint
from pipeline.models.hf import HFDualEncoder
from tests.support.helpers import jpeg_bytes, make_shards

TEXT = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
VISION = dict(
    image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
)


def clip_tokenizer() -> Any:
    """The real CLIP BPE tokenizer, built from the vocabulary file open_clip ships (no hub download).

    Same construction as OpenAI's SimpleTokenizer: 256 byte symbols, the same with </w>, then one token per
    merge, then the two specials.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(bytes_to_unicode().values())
    vocab = (
        symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    )
    return CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges)


def save_tiny(root: Path, kind: str, seed: int, tokenizer: Any) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(seed)
    if kind == "clip":
        model: Any = CLIPModel(
            CLIPConfig(text_config=dict(TEXT, max_position_embeddings=77), vision_config=VISION, projection_dim=16)
        )
        processor: Any = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        model = SiglipModel(SiglipConfig(text_config=dict(TEXT, max_position_embeddings=16), vision_config=VISION))
        processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(root)
    processor.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return clip_tokenizer()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    return save_tiny(tmp_path_factory.mktemp("hf") / "tiny-clip", "clip", 0, tokenizer)


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    return save_tiny(tmp_path_factory.mktemp("hf") / "tiny-siglip", "siglip", 0, tokenizer)


@pytest.fixture(scope="module")
def clip(clip_dir: Path) -> HFDualEncoder:
    m = load_model(load_config([f"model=hf:{clip_dir}", "model.device=cpu"]).model)
    assert isinstance(m, HFDualEncoder)
    return m


def rgb(seed: int, size: tuple[int, int] = (50, 70)) -> Image.Image:
    arr = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype("uint8")
    return Image.fromarray(arr)


def test_offline_tokenizer_matches_open_clip(tokenizer: Any) -> None:
    import open_clip

    texts = ["a photo of a cat", "Hello, World! It's 2024... naïve café", "  spaces\tand UPPER", "x " * 100]
    enc = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(enc["input_ids"] * enc["attention_mask"], open_clip.tokenize(texts))


def test_model_string_and_config_select_hf(clip_dir: Path) -> None:
    assert parse_model_string(f"hf:{clip_dir}") == {"family": "hf", "path": str(clip_dir)}
    cfg = load_config(["model.family=hf", f"model.path={clip_dir}"]).model
    assert cfg.family == "hf" and cfg.path == str(clip_dir)


def test_clip_embeddings_dims_norms_and_equal_transformers(clip: HFDualEncoder, clip_dir: Path) -> None:
    from transformers import CLIPImageProcessor, CLIPModel

    assert clip.dim == 16 and clip.model_type == "clip" and clip.context_length == 77
    images = [rgb(0), rgb(1, (90, 40))]
    pixels = torch.stack([clip.preprocess(im) for im in images])
    assert pixels.shape == (2, 3, 32, 32) and clip.preprocess_info()["size"] == 32
    texts = ["a cat", "a much longer caption about two dogs playing in the snow"]
    img, txt = clip.encode_image(pixels), clip.encode_text(clip.tokenize(texts))
    assert img.shape == txt.shape == (2, 16)
    assert torch.allclose(img.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(txt.norm(dim=1), torch.ones(2), atol=1e-5)
    # The reference: transformers' own pipeline, captions padded to the full 77 tokens.
    ref = CLIPModel.from_pretrained(clip_dir).eval()
    proc = CLIPImageProcessor.from_pretrained(clip_dir)
    tok = clip.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        ref_img = ref.get_image_features(pixel_values=proc(images=images, return_tensors="pt")["pixel_values"])
        ref_txt = ref.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    ref_img = getattr(ref_img, "pooler_output", ref_img)
    ref_txt = getattr(ref_txt, "pooler_output", ref_txt)
    assert F.cosine_similarity(img, ref_img).min().item() >= 0.9999
    assert F.cosine_similarity(txt, ref_txt).min().item() >= 0.9999


def test_clip_text_pads_to_longest_only(clip: HFDualEncoder) -> None:
    tokens = clip.tokenize(["a cat", "a dog on a sofa"])
    assert set(tokens) == {"input_ids", "attention_mask"} and tokens["input_ids"].shape[1] < 77
    alone = clip.encode_text(clip.tokenize(["a cat"]))
    assert (alone - clip.encode_text(tokens)[:1]).abs().max().item() < 1e-5


def test_siglip_loads_and_pads_to_max_length(siglip_dir: Path) -> None:
    m = load_model(load_config([f"model=hf:{siglip_dir}", "model.device=cpu"]).model)
    assert isinstance(m, HFDualEncoder) and m.model_type == "siglip" and m.dim == 32
    tokens = m.tokenize(["a cat", "a dog"])
    # SigLIP pools the last position and was trained without a mask: full-length padding, input_ids only.
    assert set(tokens) == {"input_ids"} and tokens["input_ids"].shape == (2, 16)
    pixels = torch.stack([m.preprocess(rgb(2)), m.preprocess(rgb(3, (20, 90)))])
    assert pixels.shape == (2, 3, 32, 32)
    img, txt = m.encode_image(pixels), m.encode_text(tokens)
    assert img.shape == txt.shape == (2, 32)
    assert torch.allclose(img.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(txt.norm(dim=1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(txt[0], txt[1])


def test_fingerprint_follows_weights_not_path(clip_dir: Path, tokenizer: Any, tmp_path: Path) -> None:
    fp = model_fingerprint(load_config([f"model=hf:{clip_dir}"]).model)
    assert fp["family"] == "hf" and fp["model_type"] == "clip" and list(fp["weights_sha256"]) == ["model.safetensors"]
    moved = tmp_path / "moved"
    shutil.copytree(clip_dir, moved)
    assert model_fingerprint(load_config([f"model=hf:{moved}"]).model) == fp
    retrained = save_tiny(tmp_path / "retrained", "clip", 1, tokenizer)
    fp2 = model_fingerprint(load_config([f"model=hf:{retrained}"]).model)
    assert fp2["weights_sha256"] != fp["weights_sha256"]
    assert fp2["other_files_sha256"] == fp["other_files_sha256"]


def test_bad_paths_are_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model.path=DIR"):
        load_model(load_config(["model.family=hf"]).model)
    with pytest.raises(ModelLoadError, match="no config.json"):
        model_fingerprint(load_config([f"model=hf:{tmp_path / 'nowhere'}"]).model)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(ModelLoadError, match="no weight files"):
        model_fingerprint(load_config([f"model=hf:{tmp_path / 'empty'}"]).model)
    with pytest.raises(ModelLoadError, match="save_pretrained"):
        load_model(load_config([f"model=hf:{tmp_path / 'empty'}"]).model)


def test_int8_close_to_fp32(clip: HFDualEncoder, clip_dir: Path) -> None:
    q = load_model(load_config([f"model=hf:{clip_dir}", "model.device=cpu", "model.precision=int8"]).model)
    pixels = torch.stack([clip.preprocess(rgb(i)) for i in range(4)])
    tokens = clip.tokenize(["a cat", "two dogs", "a red car on a road", "x"])
    assert F.cosine_similarity(q.encode_image(pixels), clip.encode_image(pixels)).min().item() >= 0.99
    assert F.cosine_similarity(q.encode_text(tokens), clip.encode_text(tokens)).min().item() >= 0.99


def test_run_shard_with_hf_model(clip: HFDualEncoder, tmp_path: Path) -> None:
    from pipeline.core.tasks import ShardTask
    from pipeline.embed.runner import run_shard

    (tar,) = make_shards(tmp_path / "in", n_shards=1, per_shard=5)
    cfg = load_config(["embed.batch_size=2"])
    stats = run_shard(ShardTask("00000", str(tar), str(tmp_path / "out"), "webdataset"), clip, cfg.embed)
    assert stats["ok"] == 5 and stats["dim"] == 16
    img = np.load(tmp_path / "out" / "img_emb" / "img_emb_00000.npy").astype(np.float32)
    direct = clip.encode_image(clip.preprocess(Image.open(io.BytesIO(jpeg_bytes(0))).convert("RGB"))[None])
    assert np.allclose(img[0], direct[0].numpy(), atol=2e-3)  # float16 storage


@pytest.mark.slow
def test_clipline_embed_with_an_hf_directory(clip_dir: Path, tmp_path: Path) -> None:
    """`clipline embed model=hf:DIR` end to end: the same stage, writer and manifest as open_clip."""
    import json

    from pipeline.cli.main import main

    make_shards(tmp_path / "in", n_shards=1, per_shard=6)
    out = tmp_path / "out"
    assert main(["embed", f"input={tmp_path}/in", f"output={out}", f"model=hf:{clip_dir}", "local.processes=1"]) == 0
    img = np.load(out / "img_emb" / "img_emb_00000.npy").astype(np.float32)
    assert img.shape[0] == 6 and np.allclose(np.linalg.norm(img, axis=1), 1, atol=1e-2)
    assert json.loads((out / "manifest.json").read_text())["model"]["family"] == "hf"
