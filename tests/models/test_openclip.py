"""The open_clip backend: checkpoint and hub-cache loading, fast offline failures, equality with open_clip, trimming, int8."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.core.config import load_config, parse_model_string
from pipeline.models import ModelLoadError, load_model, model_fingerprint
from pipeline.models.openclip import (
    OpenClipModel,
    encode_text_by_length,
    encode_text_trimmed,
    length_groups,
    token_lengths,
)
from tests.support.helpers import TINY_ARCH, TINY_CONFIG, custom_checkpoint, make_tiny_checkpoint, overrides

CAPTIONS = ["", "a cat", "a photo of two dogs playing in the snow", "word " * 100, "naïve café, 2024!"]


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((40 + 7 * i, 50, 3)) * 255).astype("uint8")) for i in range(n)]


@pytest.fixture(scope="module")
def tiny(tiny_model: dict[str, str]) -> OpenClipModel:
    m = load_model(load_config([*overrides(tiny_model), "model.device=cpu"]).model)
    assert isinstance(m, OpenClipModel)
    return m


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub reads the variable at import; set both so the test holds whatever imported it first.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_model_strings_parse() -> None:
    assert parse_model_string("open_clip:ViT-B-32/laion2b_s34b_b79k") == {
        "family": "open_clip",
        "arch": "ViT-B-32",
        "pretrained": "laion2b_s34b_b79k",
    }
    assert parse_model_string("ViT-L-14") == {"family": "open_clip", "arch": "ViT-L-14", "pretrained": None}
    assert parse_model_string("hf-hub:timm/ViT-B-16-SigLIP") == {
        "family": "open_clip",
        "arch": "hf-hub:timm/ViT-B-16-SigLIP",
        "pretrained": None,
    }
    cfg = load_config(["model=open_clip:ViT-B-32/laion2b_s34b_b79k"]).model
    assert (cfg.family, cfg.arch, cfg.pretrained) == ("open_clip", "ViT-B-32", "laion2b_s34b_b79k")


def test_loads_from_checkpoint(tiny: OpenClipModel) -> None:
    assert tiny.dim == TINY_CONFIG["embed_dim"] and tiny.device.type == "cpu"
    assert tiny.preprocess(images(1)[0]).shape == (3, 32, 32)
    assert tiny.preprocess_info()["size"] in (32, [32, 32])


def test_embeddings_equal_open_clip_and_are_normalized(tiny: OpenClipModel, tiny_model: dict[str, str]) -> None:
    import open_clip

    ref, _, ref_pre = open_clip.create_model_and_transforms(TINY_ARCH, pretrained=tiny_model["model.checkpoint"])
    ref.eval()
    ims = images(3)
    pixels = torch.stack([tiny.preprocess(im) for im in ims])
    assert torch.equal(pixels, torch.stack([ref_pre(im) for im in ims]))
    img, txt = tiny.encode_image(pixels), tiny.encode_text(tiny.tokenize(CAPTIONS))
    with torch.no_grad():
        ref_img = ref.encode_image(pixels)
        ref_txt = ref.encode_text(open_clip.get_tokenizer(TINY_ARCH)(CAPTIONS))
    assert F.cosine_similarity(img, ref_img).min().item() >= 0.999
    assert F.cosine_similarity(txt, ref_txt).min().item() >= 0.999
    assert torch.allclose(img.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=1), torch.ones(len(CAPTIONS)), atol=1e-5)


def test_trimmed_text_forward_equals_untrimmed(tiny: OpenClipModel) -> None:
    assert tiny.trim_text
    for batch in (CAPTIONS, ["a cat"], ["a cat", "a dog"]):
        tokens = tiny.tokenize(batch)
        with torch.no_grad():
            full = tiny.model.encode_text(tokens)
            trimmed = encode_text_trimmed(tiny.model, tokens)
        assert (full - trimmed).abs().max().item() < 1e-5


def _best_cost_over_sorted_rows(lengths: list[int], overhead: int) -> float:
    """Reference: the cheapest split of the rows, sorted by length, into contiguous groups (O(n^2) over rows)."""
    ls = sorted(lengths)
    best = [0.0] + [float("inf")] * len(ls)
    for j in range(1, len(ls) + 1):
        best[j] = min(best[i] + (j - i) * ls[j - 1] + overhead for i in range(j))
    return best[-1]


def test_length_groups_partition_rows_at_least_cost() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 40))
        lengths = [int(v) for v in rng.integers(1, 78, size=n)]
        overhead = int(rng.choice([0, 16, 96, 1000]))
        groups = length_groups(lengths, overhead)
        assert sorted(r for g in groups for r in g) == list(range(n))  # every row exactly once
        cost = sum(len(g) * max(lengths[r] for r in g) + overhead for g in groups)
        assert cost == _best_cost_over_sorted_rows(lengths, overhead), (lengths, overhead)
    assert length_groups([7] * 10) == [list(range(10))]  # nothing to gain from splitting equal lengths
    assert len(length_groups([3] * 30 + [70] * 30)) == 2
    assert length_groups([3] * 30 + [70] * 30, overhead=10**6) == [list(range(60))]


def test_text_forward_by_length_groups_equals_untrimmed(tiny: OpenClipModel) -> None:
    batch = [CAPTIONS[i % len(CAPTIONS)] for i in (3, 0, 1, 2, 4, 1, 3, 0)]  # long and short rows interleaved
    tokens = tiny.tokenize(batch)
    assert len(length_groups(token_lengths(tokens).tolist())) >= 2  # the batch really is split
    with torch.no_grad():
        full = tiny.model.encode_text(tokens)
        grouped = encode_text_by_length(tiny.model, tokens)
    assert (full - grouped).abs().max().item() < 1e-5  # and each row is back in its place
    assert (tiny.encode_text(tokens) - F.normalize(full, dim=-1)).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "text_cfg, custom",
    [
        ({"no_causal_mask": True, "pool_type": "last"}, False),  # bidirectional: padding reaches every token
        ({"no_causal_mask": True, "pool_type": "last", "proj_bias": True}, True),  # SigLIP-style custom text tower
    ],
)
def test_trimming_not_used_for_non_causal_text_towers(tmp_path: Path, text_cfg: dict, custom: bool) -> None:
    import open_clip

    config = json.loads(json.dumps(TINY_CONFIG))
    config["text_cfg"].update(text_cfg, context_length=16)
    if custom:
        config["custom_text"] = True
    name = f"tiny-noncausal-{int(custom)}"
    ov = custom_checkpoint(tmp_path, name, config)
    m = load_model(load_config([*overrides(ov), "model.device=cpu"]).model)
    assert isinstance(m, OpenClipModel) and not m.trim_text
    ref = open_clip.create_model(name, pretrained=ov["model.checkpoint"]).eval()
    tokens = m.tokenize(CAPTIONS)
    with torch.no_grad():
        expected = F.normalize(ref.encode_text(tokens), dim=-1)
    assert (m.encode_text(tokens) - expected).abs().max().item() < 1e-5


def test_named_tag_unreachable_fails_fast_with_hint(tmp_path: Path, hub_offline: None) -> None:
    cfg = load_config(
        ["model=open_clip:ViT-B-32/laion2b_s34b_b79k", f"model.cache_dir={tmp_path}", "model.device=cpu"]
    ).model
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        load_model(cfg)
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    assert "ViT-B-32" in msg and "laion2b_s34b_b79k" in msg
    assert "model.checkpoint=" in msg and "HF_HUB_OFFLINE" in msg
    assert model_fingerprint(cfg)["pretrained"] == "laion2b_s34b_b79k"  # identity needs no weights


def test_hf_hub_id_unreachable_fails_fast(tmp_path: Path, hub_offline: None) -> None:
    cfg = load_config(["model=hf-hub:clipline-test/not-cached", f"model.cache_dir={tmp_path}"]).model
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match="clipline-test/not-cached"):
        load_model(cfg)
    assert time.perf_counter() - t0 < 10


def _fill_hub_cache(cache: Path, repo_id: str, checkpoint: str) -> None:
    """What a hub download leaves behind: blobs referenced by a snapshot of the commit in refs/main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (snap / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CONFIG, "preprocess_cfg": {}}))
    (snap / "open_clip_pytorch_model.bin").write_bytes(Path(checkpoint).read_bytes())


def test_hf_hub_id_loads_from_prefilled_default_cache(
    tmp_path: Path, tiny: OpenClipModel, tiny_model: dict[str, str], hub_offline: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fill_hub_cache(tmp_path, "clipline-test/tiny", tiny_model["model.checkpoint"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    m = load_model(load_config(["model=hf-hub:clipline-test/tiny", "model.device=cpu"]).model)
    assert m.dim == tiny.dim
    tokens = tiny.tokenize(["a cat"])
    assert torch.allclose(m.encode_text(tokens), tiny.encode_text(tokens), atol=1e-6)


def test_hf_hub_id_loads_from_prefilled_model_cache_dir(
    tmp_path: Path, tiny_model: dict[str, str], hub_offline: None
) -> None:
    _fill_hub_cache(tmp_path, "clipline-test/tiny2", tiny_model["model.checkpoint"])
    m = load_model(
        load_config(["model=hf-hub:clipline-test/tiny2", f"model.cache_dir={tmp_path}", "model.device=cpu"]).model
    )
    assert m.dim == TINY_CONFIG["embed_dim"]


def test_fingerprint_follows_checkpoint_weights(tiny_model: dict[str, str], tmp_path: Path) -> None:
    cfg = load_config(overrides(tiny_model)).model
    fp = model_fingerprint(cfg)
    assert fp["family"] == "open_clip" and fp["arch"] == TINY_ARCH and len(fp["checkpoint_sha256"]) == 64
    assert model_fingerprint(cfg) == fp
    other = make_tiny_checkpoint(tmp_path / "other", seed=1)
    assert model_fingerprint(load_config(overrides(other)).model)["checkpoint_sha256"] != fp["checkpoint_sha256"]
    # Same path, new contents (a checkpoint overwritten in place) must change the identity too.
    same_path = dict(tiny_model, **{"model.checkpoint": str(tmp_path / "ckpt.pt")})
    Path(same_path["model.checkpoint"]).write_bytes(Path(tiny_model["model.checkpoint"]).read_bytes())
    before = model_fingerprint(load_config(overrides(same_path)).model)
    Path(same_path["model.checkpoint"]).write_bytes(Path(other["model.checkpoint"]).read_bytes())
    assert model_fingerprint(load_config(overrides(same_path)).model) != before


def test_embed_driver_plans_without_importing_torch(tiny_model: dict[str, str], tmp_path: Path) -> None:
    """The driver only fingerprints the weights and lists shards; importing torch there cost 3-4 s per run."""
    code = (
        "import sys\n"
        "from pipeline.core.config import load_config\n"
        "from pipeline.distribute.local import LocalDistributor\n"
        "from pipeline.embed.stage import build_manifest, plan\n"
        f"cfg = load_config({[*overrides(tiny_model), 'input=' + str(tmp_path / 'x.tar'), 'output=' + str(tmp_path / 'o')]!r})\n"
        "assert build_manifest(cfg)['model']['checkpoint_sha256']\n"
        "plan(cfg)\n"
        "LocalDistributor(cfg)._layout()\n"
        "assert 'torch' not in sys.modules, 'the driver imported torch'\n"
    )
    (tmp_path / "x.tar").write_bytes(b"")
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2]
    )
    assert r.returncode == 0, r.stderr


def test_missing_checkpoint_is_a_load_error(tmp_path: Path, tiny_model: dict[str, str]) -> None:
    bad = dict(tiny_model, **{"model.checkpoint": str(tmp_path / "missing.pt")})
    with pytest.raises(ModelLoadError, match="no such file"):
        model_fingerprint(load_config(overrides(bad)).model)
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(load_config(overrides(bad)).model)


def test_int8_close_to_fp32(tiny: OpenClipModel, tiny_model: dict[str, str]) -> None:
    q = load_model(load_config([*overrides(tiny_model), "model.device=cpu", "model.precision=int8"]).model)
    pixels = torch.stack([tiny.preprocess(im) for im in images(4)])
    tokens = tiny.tokenize(CAPTIONS)
    assert F.cosine_similarity(q.encode_image(pixels), tiny.encode_image(pixels)).min().item() >= 0.99
    assert F.cosine_similarity(q.encode_text(tokens), tiny.encode_text(tokens)).min().item() >= 0.99


def test_catalog_marks_cached_weights_and_lists_families(tmp_path: Path, tiny_model: dict[str, str]) -> None:
    """`clipline models` (pipeline.models.catalog) reads the same cache open_clip and transformers would load from."""
    from pipeline.models.catalog import hub_snapshots, list_models_cli, pretrained_cache_path

    cache = str(tmp_path)
    assert pretrained_cache_path("ViT-B-32", "laion2b_s34b_b79k", cache) is None
    _fill_hub_cache(tmp_path, "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", tiny_model["model.checkpoint"])
    found = pretrained_cache_path("ViT-B-32", "laion2b_s34b_b79k", cache)
    assert found is not None and found.endswith("open_clip_pytorch_model.bin")
    hf_snap = tmp_path / "models--org--tiny-clip" / "snapshots" / "c0ffee"
    hf_snap.mkdir(parents=True)
    (hf_snap / "config.json").write_text('{"model_type": "clip"}')
    (tmp_path / "models--org--tiny-clip" / "refs").mkdir()
    (tmp_path / "models--org--tiny-clip" / "refs" / "main").write_text("c0ffee")
    kinds = {s.repo_id: s.kind for s in hub_snapshots(cache)}
    assert kinds == {"laion/CLIP-ViT-B-32-laion2B-s34B-b79K": "open_clip", "org/tiny-clip": "clip"}

    text = list_models_cli(load_config([f"model.cache_dir={cache}"]))
    vit_b_32 = next(line for line in text.splitlines() if line.strip().startswith("ViT-B-32:"))
    assert "*laion2b_s34b_b79k" in vit_b_32 and "*openai" not in vit_b_32
    assert ", 1 cached." in text
    assert "model=offline" in text and "installed: efficientnet-lite-pytorch" in text
    assert f"model=hf:{hf_snap}" in text and "model=hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in text
    assert list_models_cli(load_config([]), family="hf").startswith("hf  (model=hf:DIR")


def test_linearized_attention_equals_multihead_attention(tiny: OpenClipModel) -> None:
    """The int8 path swaps nn.MultiheadAttention for Linear projections; in fp32 that must not change any output."""
    import copy

    from pipeline.models.quantize import linearize_self_attention

    swapped_model = copy.deepcopy(tiny.model)
    n_blocks = sum(1 for m in tiny.model.modules() if isinstance(m, torch.nn.MultiheadAttention))
    assert linearize_self_attention(swapped_model) == n_blocks > 0
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in swapped_model.modules())
    pixels = torch.stack([tiny.preprocess(im) for im in images(3)])
    tokens = tiny.tokenize(CAPTIONS)
    with torch.inference_mode():
        for encode in ("encode_image", "encode_text"):  # text exercises the causal float mask
            ref = getattr(tiny.model, encode)(pixels if encode == "encode_image" else tokens)
            got = getattr(swapped_model, encode)(pixels if encode == "encode_image" else tokens)
            assert torch.allclose(got, ref, atol=1e-5), encode


def test_self_attention_boolean_mask_and_refusals() -> None:
    from pipeline.models.quantize import SelfAttention

    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    sa = SelfAttention(mha)
    x = torch.randn(2, 5, 16)
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)  # True = masked, MHA convention
    with torch.inference_mode():
        assert torch.allclose(
            sa(x, x, x, attn_mask=causal)[0], mha(x, x, x, need_weights=False, attn_mask=causal)[0], atol=1e-6
        )
    with pytest.raises(ValueError, match="self-attention"):
        sa(x, x.clone(), x)
    with pytest.raises(ValueError, match="only plain self-attention"):
        SelfAttention(torch.nn.MultiheadAttention(16, 4, kdim=8, vdim=8))


def test_int8_quantizes_attention_projections_too(tiny_model: dict[str, str]) -> None:
    from pipeline.models.quantize import quantize_int8, quantized_fraction

    q = load_model(load_config([*overrides(tiny_model), "model.device=cpu", "model.precision=int8"]).model)
    assert isinstance(q, OpenClipModel)
    assert quantized_fraction(q.model) == 1.0
    plain = load_model(load_config([*overrides(tiny_model), "model.device=cpu"]).model)
    assert isinstance(plain, OpenClipModel)
    # what quantize_dynamic alone reaches: the attention projections stay fp32
    assert quantized_fraction(quantize_int8(plain.model)) < 0.8


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_autocast_precisions_run_the_gpu_code_path_on_cpu(
    precision: str, tiny: OpenClipModel, tiny_model: dict[str, str]
) -> None:
    """fp16 is the GPU option; torch's CPU autocast takes the same code path, so it is checked here for closeness."""
    half = load_model(load_config([*overrides(tiny_model), "model.device=cpu", f"model.precision={precision}"]).model)
    assert isinstance(half, OpenClipModel)
    pixels = torch.stack([tiny.preprocess(im) for im in images(4)])
    tokens = tiny.tokenize(CAPTIONS)
    img, txt = half.encode_image(pixels), half.encode_text(tokens)
    assert img.dtype == txt.dtype == torch.float32  # the writer always gets float32, unit-norm rows
    assert torch.allclose(img.norm(dim=-1), torch.ones(len(img)), atol=1e-4)
    assert F.cosine_similarity(img, tiny.encode_image(pixels)).min().item() >= 0.99
    assert F.cosine_similarity(txt, tiny.encode_text(tokens)).min().item() >= 0.99


def test_int8_is_refused_on_a_gpu_before_loading(tiny_model: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused before any weights move (here a load onto the missing GPU would fail with a driver error instead)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    import pipeline.models.openclip as oc

    monkeypatch.setattr(oc, "resolve_device", lambda device: torch.device("cuda"))
    with pytest.raises(ModelLoadError, match="int8 is a CPU option"):
        load_model(load_config([*overrides(tiny_model), "model.device=cuda", "model.precision=int8"]).model)
