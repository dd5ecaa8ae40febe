"""The model interface every CLIP-family backend implements, and the registry that picks one from config."""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from pipeline.core.config import ModelConfig


class ModelLoadError(RuntimeError):
    """The model's weights or code cannot be loaded; raised at start-up, never mid-job."""


class EmbeddingModel(ABC):
    """A loaded model: CPU preprocessing (thread-safe) plus normalized image and text embeddings."""

    dim: int
    device: "torch.device"

    @abstractmethod
    def preprocess(self, image: "Image.Image") -> "torch.Tensor":
        """RGB PIL image -> CHW float tensor, exactly the model's own transform."""

    @abstractmethod
    def tokenize(self, texts: list[str]) -> Any:
        """Captions -> whatever encode_text takes (truncated at the model's context length)."""

    @abstractmethod
    def encode_image(self, pixels: "torch.Tensor") -> "torch.Tensor":
        """Batch of preprocessed images (on the CPU, or already on `device`) -> L2-normalized float32 CPU embeddings."""

    @abstractmethod
    def encode_text(self, tokens: Any) -> "torch.Tensor":
        """Tokenized captions -> L2-normalized float32 embeddings on the CPU."""

    def preprocess_info(self) -> dict[str, Any]:
        """What the manifest records about preprocessing (size, mean, std, interpolation...)."""
        return {}


@functools.lru_cache(maxsize=64)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def file_sha256(path: "str | os.PathLike[str]") -> str:
    """sha256 of a file, remembered per (path, size, mtime) within the process (weights are fingerprinted often)."""
    resolved = os.path.realpath(path)
    st = os.stat(resolved)
    return _cached_sha256(resolved, st.st_size, st.st_mtime_ns)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_LOADERS: dict[str, Callable[["ModelConfig"], EmbeddingModel]] = {}
_FINGERPRINTS: dict[str, Callable[["ModelConfig"], dict[str, Any]]] = {}
# Where each family registers its loader (imports torch) and its fingerprint (open_clip and hf: torch-free,
# so the embed driver, which only writes the manifest, does not pay for importing torch).
_LOADER_MODULES = {
    "open_clip": "pipeline.models.openclip",
    "hf": "pipeline.models.hf",
    "offline": "pipeline.models.offline",
}
_FINGERPRINT_MODULES = {
    "open_clip": "pipeline.models.identity",
    "hf": "pipeline.models.identity",
    "offline": "pipeline.models.offline",
}


def register_loader(family: str, loader: Callable[["ModelConfig"], EmbeddingModel]) -> None:
    _LOADERS[family] = loader


def register_fingerprint(family: str, fingerprint: Callable[["ModelConfig"], dict[str, Any]]) -> None:
    _FINGERPRINTS[family] = fingerprint


def _lookup(table: dict[str, Callable[..., Any]], modules: dict[str, str], family: str) -> Callable[..., Any]:
    if family not in table and family in modules:
        importlib.import_module(modules[family])
    if family not in table:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(modules)}")
    return table[family]


def load_model(cfg: "ModelConfig") -> EmbeddingModel:
    """Load the configured model once; raises ModelLoadError with a hint when weights are unavailable."""
    return _lookup(_LOADERS, _LOADER_MODULES, cfg.family)(cfg)  # type: ignore[no-any-return]


def model_fingerprint(cfg: "ModelConfig") -> dict[str, Any]:
    """Identify the weights and preprocessing without loading the model (for the manifest)."""
    return _lookup(_FINGERPRINTS, _FINGERPRINT_MODULES, cfg.family)(cfg)  # type: ignore[no-any-return]


def load_recorded(model_config: dict[str, Any] | None, recorded: dict[str, Any] | None, where: str) -> EmbeddingModel:
    """The model that made some stored embeddings, from the model config and fingerprint recorded beside them (an
    embed manifest, an index's json); refused when those weights have changed since, because new text or image
    embeddings would then not match the stored ones."""
    from pipeline.core.config import ModelConfig
    from pipeline.core.errors import ConfigError

    if not model_config:
        raise ConfigError(f"{where} records no model_config: the model that made these embeddings is unknown")
    cfg = ModelConfig.model_validate(model_config)
    found = model_fingerprint(cfg)
    if found != recorded:
        raise ModelLoadError(
            f"the model recorded in {where} ({model_config}) now has other weights ({found}) than the ones that "
            f"made these embeddings ({recorded}); embeddings made now would not match the stored ones"
        )
    return load_model(cfg)


def resolve_device(device: str) -> "torch.device":
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device={device} but no CUDA device is available")
    return d
