"""open_clip backend: named architecture + pretrained tag, hf-hub id, or local checkpoint, with padding-free text."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from pipeline.models import EmbeddingModel, ModelLoadError, register_loader, resolve_device
from pipeline.models.pooled import (
    can_pool_image,
    can_pool_text,
    check_pooled,
    encode_image_pooled,
    run_blocks_pooled,
    text_pool_positions,
)
from pipeline.models.quantize import linearize_self_attention, quantize_int8, quantized_fraction

if TYPE_CHECKING:
    from PIL import Image

    from pipeline.core.config import ModelConfig

log = logging.getLogger(__name__)

HINT = (
    "clipline could not get the weights. Offline, point at a local file with "
    "model.checkpoint=/path/to/open_clip_model.bin (plus model.arch=ARCH), or pre-fill the Hugging Face cache "
    "(HF_HOME / model.cache_dir) on a machine with network and run with HF_HUB_OFFLINE=1."
)


def register_config_file(cfg: "ModelConfig") -> None:
    """Register a custom open_clip model config JSON under model.arch."""
    import open_clip

    if not cfg.model_config_file:
        return
    path = Path(cfg.model_config_file).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"model.model_config_file={path}: no such file")
    model_cfg = json.loads(path.read_text())
    open_clip.factory._MODEL_CONFIGS[cfg.arch] = model_cfg


def _weights_spec(cfg: "ModelConfig") -> str | None:
    return cfg.checkpoint or cfg.pretrained


def _check_arch(cfg: "ModelConfig") -> None:
    import open_clip

    if cfg.arch.startswith("hf-hub:"):
        return
    if open_clip.get_model_config(cfg.arch) is None:
        raise ModelLoadError(
            f"model.arch={cfg.arch!r} is not an open_clip architecture; see `clipline models` "
            "or pass model.model_config_file=CONFIG.json for a custom one"
        )


class OpenClipModel(EmbeddingModel):
    """An open_clip CLIP/SigLIP model on one device."""

    def __init__(self, cfg: "ModelConfig") -> None:
        import open_clip

        register_config_file(cfg)
        _check_arch(cfg)
        self.device = resolve_device(cfg.device)
        if cfg.precision == "int8" and self.device.type != "cpu":
            raise ModelLoadError("model.precision=int8 is a CPU option; use fp16 on GPUs")
        weights = _weights_spec(cfg)
        if cfg.checkpoint and not Path(cfg.checkpoint).expanduser().is_file():
            raise ModelLoadError(f"model.checkpoint={cfg.checkpoint}: no such file")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                cfg.arch,
                pretrained=str(Path(cfg.checkpoint).expanduser()) if cfg.checkpoint else weights,
                device=self.device,
                cache_dir=cfg.cache_dir,
                weights_only=True,
            )
        except ModelLoadError:
            raise
        except Exception as e:  # open_clip raises RuntimeError/OSError/HF errors for unreachable weights
            raise ModelLoadError(f"loading open_clip {cfg.arch} / {weights}: {type(e).__name__}: {e}\n{HINT}") from e
        model.eval()
        self.model = model
        self.cfg = cfg
        self._preprocess = preprocess
        self._tokenizer = open_clip.get_tokenizer(cfg.arch, cache_dir=cfg.cache_dir)
        self.context_length = getattr(model, "context_length", None) or 77
        self.trim_text = _can_trim_text(model)
        swapped = linearize_self_attention(model) if cfg.precision == "int8" else 0
        # Checked before int8 quantization, where the pooled path is exact; int8 then changes its rounding only
        # (activation scales come from the rows computed; cosine to fp32 stays as close as the plain int8 forward).
        self.pooled_image, self.pooled_text = self._check_pooled()
        if cfg.precision == "int8":
            self.model = quantize_int8(model)
            log.info(
                "int8: %d attention blocks linearized, %.0f%% of matmul weights int8",
                swapped,
                100 * quantized_fraction(self.model),
            )
            # open_clip reads the compute dtype off a Linear weight, which quantized layers expose as a method.
            for mod in self.model.modules():
                if hasattr(mod, "get_cast_dtype"):
                    mod.get_cast_dtype = lambda: torch.float32  # type: ignore[assignment]
        self.dim = int(self._infer_dim())
        self._autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.precision)
        if self.device.type == "cuda":
            self.model.visual.to(memory_format=torch.channels_last)

    def _check_pooled(self) -> tuple[bool, bool]:
        """Whether the last-block-at-the-pooled-position paths apply to this model and agree with its forward."""
        image = can_pool_image(self.model)
        text = self.trim_text and can_pool_text(self.model)
        if not (image or text):
            return False, False
        size = tuple(self.model.visual.image_size) if image else None
        tokens = self._tokenizer(["a photo of a dog", "two cats on a red sofa in the sun"]).to(self.device)
        image_ok, text_ok = check_pooled(
            self.model,
            size,  # type: ignore[arg-type]
            tokens if text else None,
            lambda m, t: encode_text_trimmed(m, t, pooled=True),
        )
        for tower, applies, ok in (("image", image, image_ok), ("text", text, text_ok)):
            if applies and not ok:
                log.warning(
                    "%s tower: the pooled last block disagrees with the plain forward; using the plain one", tower
                )
        return image and image_ok, text and text_ok

    def _infer_dim(self) -> int:
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, torch.nn.Parameter):
            return proj.shape[1]
        with torch.inference_mode():
            return self.model.encode_text(self._tokenizer(["a"]).to(self.device)).shape[-1]

    def preprocess(self, image: "Image.Image") -> torch.Tensor:
        return self._preprocess(image)

    def preprocess_info(self) -> dict[str, Any]:
        pp = getattr(self.model.visual, "preprocess_cfg", None) or {}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(pp).items()}

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self._tokenizer(texts)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":  # embed.decode=device: already preprocessed on the model's device
            return x.to(self.device)
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self._to_device(pixels)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._autocast():
            feats = encode_image_pooled(self.model, x) if self.pooled_image else self.model.encode_image(x)
        return F.normalize(feats.float(), dim=-1).cpu()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self._to_device(tokens)
        with torch.inference_mode(), self._autocast():
            if self.trim_text:
                feats = encode_text_by_length(self.model, x, self.pooled_text)
            else:
                feats = self.model.encode_text(x)
        return F.normalize(feats.float(), dim=-1).cpu()


def _can_trim_text(model: torch.nn.Module) -> bool:
    """Padding after the longest caption is dead compute only for causal towers that pool at a token position."""
    import open_clip

    return (
        type(model) is open_clip.CLIP
        and getattr(model, "attn_mask", None) is not None
        and getattr(model, "text_pool_type", None) in ("argmax", "eos")
        and isinstance(getattr(model, "positional_embedding", None), torch.nn.Parameter)
    )


# Fixed cost of one extra text forward, in token-rows (rows x positions): with 64 captions of 10-26 tokens on
# 2 CPU cores, 64-128 gave the fastest splits (45 -> 62 captions/s against one group cut to the longest).
GROUP_OVERHEAD_TOKENS = 96


def length_groups(lengths: list[int], overhead: int = GROUP_OVERHEAD_TOKENS) -> list[list[int]]:
    """Split rows into groups of similar length so each group is cut at its own longest row.

    Minimizes sum(rows x longest + overhead) over the groups, exactly, by dynamic programming over the distinct
    lengths (at most the context length, so the cost does not grow with the batch). Returns row indices.
    """
    values = sorted(set(lengths))
    count = [0] * (len(values) + 1)  # count[j]: rows with length <= values[j-1]
    for j, v in enumerate(values):
        count[j + 1] = count[j] + lengths.count(v)
    best = [0.0] + [float("inf")] * len(values)
    cut = [0] * (len(values) + 1)
    for j in range(1, len(values) + 1):
        for i in range(j):
            cost = best[i] + (count[j] - count[i]) * values[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds = []
    j = len(values)
    while j > 0:
        bounds.append((values[cut[j] - 1] if cut[j] else 0, values[j - 1]))
        j = cut[j]
    return [[r for r, n in enumerate(lengths) if lo < n <= hi] for lo, hi in reversed(bounds)]


def token_lengths(text: torch.Tensor) -> torch.Tensor:
    """Per row, the position after the last non-padding token (padding is token id 0)."""
    positions = torch.arange(1, text.shape[1] + 1, device=text.device)
    return ((text != 0).int() * positions).amax(dim=1).clamp(min=1)


def encode_text_by_length(model: Any, text: torch.Tensor, pooled: bool = False) -> torch.Tensor:
    """encode_text_trimmed on groups of similar caption length, put back in row order (same result, less compute)."""
    groups = length_groups(token_lengths(text).tolist())
    if len(groups) == 1:
        return encode_text_trimmed(model, text, pooled)
    out: torch.Tensor | None = None
    for rows in groups:
        index = torch.tensor(rows, device=text.device)
        feats = encode_text_trimmed(model, text[index], pooled)
        if out is None:
            out = feats.new_empty((text.shape[0], feats.shape[1]))
        out[index] = feats
    assert out is not None
    return out


def encode_text_trimmed(model: Any, text: torch.Tensor, pooled: bool = False) -> torch.Tensor:
    """open_clip's CLIP.encode_text on tokens cut to the batch's longest caption (same result, less compute).

    With a causal mask no position attends to later ones, and pooling reads the end-of-text position,
    so the padding columns never influence the pooled feature. With `pooled`, the last block runs at the
    end-of-text position only (pooled.py).
    """
    from open_clip.transformer import text_global_pool

    length = int(token_lengths(text).max().item())
    t = text[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(t).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    mask = model.attn_mask[:length, :length]
    if pooled:
        x = model.ln_final(run_blocks_pooled(model.transformer, x, text_pool_positions(model, t), mask, causal=True))
    else:
        x = model.transformer(x, attn_mask=mask)
        x = model.ln_final(x)
        x = text_global_pool(x, t, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = (
            model.text_projection(x)
            if isinstance(model.text_projection, torch.nn.Linear)
            else x @ model.text_projection
        )
    return x


register_loader("open_clip", OpenClipModel)
