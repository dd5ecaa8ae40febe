"""The `hf` family: a Hugging Face transformers CLIP or SigLIP dual encoder saved in a local directory (model.path)."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from pipeline.models import EmbeddingModel, ModelLoadError, register_loader, resolve_device
from pipeline.models.identity import HF_HINT, hf_model_dir
from pipeline.models.quantize import quantize_int8

if TYPE_CHECKING:
    from PIL import Image

    from pipeline.core.config import ModelConfig

log = logging.getLogger(__name__)

# SigLIP was trained on captions padded to the full length without an attention mask and pools the last
# position, so its text must be padded the same way; CLIP pools at end-of-text under a causal mask,
# so padding to the batch's longest caption gives the same vectors for less compute.
PAD_TO_MAX_LENGTH = ("siglip",)
# SigLIP 2's NaFlex processor returns patch sequences plus masks, not one CHW tensor per image.
UNSUPPORTED = {"siglip2": "SigLIP 2 (NaFlex) is not supported by family=hf; use open_clip's ViT-*-SigLIP2 models"}


def _output_tensor(out: Any) -> torch.Tensor:
    """transformers 5 returns a ModelOutput whose pooler_output is the projected feature; 4.x returned the tensor."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"unexpected feature output {type(out).__name__}")
    return pooled  # type: ignore[no-any-return]


def _final_side(processor: Any) -> int | None:
    """The side of the square the processor feeds the model (what the decoder's draft mode needs)."""
    for attr in ("crop_size", "size"):
        val = getattr(processor, attr, None)
        if isinstance(val, dict):
            val = val.get("height") or val.get("shortest_edge")
        elif val is not None and not isinstance(val, int):
            val = getattr(val, "height", None) or getattr(val, "shortest_edge", None)
        if attr == "crop_size" and not getattr(processor, "do_center_crop", False):
            continue
        if val:
            return int(val)
    return None


class HFDualEncoder(EmbeddingModel):
    """A transformers model with get_image_features/get_text_features plus its own image processor and tokenizer."""

    def __init__(self, cfg: "ModelConfig") -> None:
        root = hf_model_dir(cfg)
        self.device = resolve_device(cfg.device)
        if cfg.precision == "int8" and self.device.type != "cpu":
            raise ModelLoadError("model.precision=int8 is a CPU option; use fp16 on GPUs")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is in the folder; never ask the hub
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

        try:
            config = AutoConfig.from_pretrained(root, local_files_only=True)
        except Exception as e:
            raise ModelLoadError(f"model.path={root}: cannot read config.json: {e}. {HF_HINT}") from e
        self.model_type = str(getattr(config, "model_type", ""))
        if self.model_type in UNSUPPORTED:
            raise ModelLoadError(UNSUPPORTED[self.model_type])
        try:
            model = AutoModel.from_pretrained(root, local_files_only=True)
            self.processor = AutoImageProcessor.from_pretrained(root, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
        except Exception as e:
            raise ModelLoadError(f"model.path={root}: {type(e).__name__}: {e}. {HF_HINT}") from e
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise ModelLoadError(f"model.path={root}: {type(model).__name__} is not an image-text dual encoder")
        model.eval().to(self.device)
        if cfg.precision == "int8":
            model = quantize_int8(model)
        self.model = model
        self._autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.precision)
        text_cfg = getattr(config, "text_config", config)
        self.context_length = int(getattr(text_cfg, "max_position_embeddings", 0) or 77)
        self.pad_to_max = self.model_type in PAD_TO_MAX_LENGTH
        self.dim = int(self.encode_text(self.tokenize(["a"])).shape[-1])

    def preprocess(self, image: "Image.Image") -> torch.Tensor:
        # Image processors keep no per-call state, so one instance serves every decode thread.
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]  # type: ignore[no-any-return]

    def preprocess_info(self) -> dict[str, Any]:
        p = self.processor
        info: dict[str, Any] = {"processor": type(p).__name__, "size": _final_side(p)}
        for attr in ("image_mean", "image_std", "resample", "do_center_crop", "do_resize", "rescale_factor"):
            val = getattr(p, attr, None)
            if val is not None:
                info[attr] = list(val) if isinstance(val, tuple) else (int(val) if hasattr(val, "value") else val)
        return info

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            texts,
            padding="max_length" if self.pad_to_max else True,
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )
        keep = ("input_ids",) if self.pad_to_max else ("input_ids", "attention_mask")
        return {k: enc[k] for k in keep if k in enc}

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self._autocast():
            out = self.model.get_image_features(pixel_values=pixels.to(self.device))
        return F.normalize(_output_tensor(out).float(), dim=-1).cpu()

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode(), self._autocast():
            out = self.model.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()})
        return F.normalize(_output_tensor(out).float(), dim=-1).cpu()


register_loader("hf", HFDualEncoder)
