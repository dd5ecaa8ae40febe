"""What identifies a model's weights (for the manifest), computed without importing torch or loading anything.

The embed driver only needs this, so it starts in well under a second; the loaders live in the backend modules.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.models import ModelLoadError, file_sha256, register_fingerprint, sha256_file

if TYPE_CHECKING:
    from pipeline.core.config import ModelConfig

HF_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
HF_HINT = (
    "model.path must be a local directory written by save_pretrained() (config.json, weights, "
    "preprocessor_config.json and tokenizer files), e.g. a snapshot folder of a pre-filled Hugging Face cache"
)


def open_clip_fingerprint(cfg: "ModelConfig") -> dict[str, Any]:
    """Weights identity: checkpoint sha256, or the named tag; plus the custom config's hash."""
    fp: dict[str, Any] = {"family": "open_clip", "arch": cfg.arch}
    if cfg.checkpoint:
        path = Path(cfg.checkpoint).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"model.checkpoint={cfg.checkpoint}: no such file")
        fp["checkpoint_sha256"] = sha256_file(path)
    elif cfg.pretrained and os.path.isfile(os.path.expanduser(cfg.pretrained)):
        fp["checkpoint_sha256"] = sha256_file(os.path.expanduser(cfg.pretrained))
    else:
        fp["pretrained"] = cfg.pretrained
    if cfg.model_config_file:
        fp["model_config_sha256"] = sha256_file(Path(cfg.model_config_file).expanduser())
    return fp


def hf_model_dir(cfg: "ModelConfig") -> Path:
    if not cfg.path:
        raise ModelLoadError("model.family=hf needs model.path=DIR (or model=hf:DIR)")
    path = Path(cfg.path).expanduser()
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model.path={cfg.path}: no config.json there. {HF_HINT}")
    return path


def _files(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def hf_fingerprint(cfg: "ModelConfig") -> dict[str, Any]:
    """Hashes of the weight files and of everything else in the folder (config, processor, tokenizer), not its path."""
    root = hf_model_dir(cfg)
    weights: dict[str, str] = {}
    rest = hashlib.sha256()
    for p in _files(root):
        rel = p.relative_to(root).as_posix()
        if p.name.endswith(HF_WEIGHT_SUFFIXES):
            weights[rel] = file_sha256(p)
        else:
            rest.update(rel.encode() + b"\0" + file_sha256(p).encode() + b"\0")
    if not weights:
        raise ModelLoadError(f"model.path={cfg.path}: no weight files ({', '.join(HF_WEIGHT_SUFFIXES)}). {HF_HINT}")
    model_type = json.loads((root / "config.json").read_text()).get("model_type")
    return {"family": "hf", "model_type": model_type, "weights_sha256": weights, "other_files_sha256": rest.hexdigest()}


register_fingerprint("open_clip", open_clip_fingerprint)
register_fingerprint("hf", hf_fingerprint)
