"""Which model goes with some stored embeddings: the one recorded beside them (clipline's manifest, an index's json),
else the one given as `model.*` (embeddings clipline did not write record none); its embedding width checked against
the vectors' before any work, so a wrong model fails with exit 2 instead of giving meaningless results."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.config import ModelConfig
from pipeline.core.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.models import EmbeddingModel

log = logging.getLogger(__name__)


def describe(cfg: ModelConfig) -> str:
    """A model config as a person names it (model=... style)."""
    if cfg.family == "hf":
        return f"hf:{cfg.path}"
    if cfg.family == "offline":
        return "offline"
    return f"{cfg.arch}/{cfg.checkpoint or cfg.pretrained or '(random weights)'}"


def config_width(cfg: ModelConfig) -> int | None:
    """The embedding width a model's config declares, read without loading weights; None when only loading tells."""
    try:
        if cfg.family == "open_clip":
            if cfg.model_config_file:
                return int(json.loads(Path(cfg.model_config_file).expanduser().read_text())["embed_dim"])
            import open_clip

            found = open_clip.get_model_config(cfg.arch)
            return int(found["embed_dim"]) if found else None
        if cfg.family == "hf" and cfg.path:
            hf = json.loads((Path(cfg.path).expanduser() / "config.json").read_text())
            width = hf.get("projection_dim") or hf.get("text_config", {}).get("hidden_size")
            return int(width) if width else None
    except (OSError, ValueError, KeyError, TypeError) as e:  # an unreadable config: the loader will say why
        log.debug("no width from the config of %s: %s", describe(cfg), e)
    return None


def check_width(model_width: int, model_name: str, vectors_width: int, vectors_name: str) -> None:
    if model_width != vectors_width:
        raise ConfigError(
            f"the model {model_name} makes {model_width}-d embeddings but {vectors_name} holds {vectors_width}-d "
            "vectors: give the model that made them (model.arch=..., model.pretrained=... or model.checkpoint=...)"
        )


def load_for(
    recorded_config: dict[str, Any] | None,
    recorded: dict[str, Any] | None,
    where: str,
    given: ModelConfig | None,
    width: int,
) -> EmbeddingModel:
    """The model that embeds new queries for vectors of `width` described at `where`: the recorded one (refused if
    its weights changed), else `given`; raises ConfigError when there is none or its width differs."""
    from pipeline.models import load_model, load_recorded

    if recorded_config:
        model = load_recorded(recorded_config, recorded, where)
        name = describe(ModelConfig.model_validate(recorded_config))
    elif given is not None:
        check_width(config_width(given) or width, describe(given), width, where)  # before loading any weights
        model, name = load_model(given), describe(given)
    else:
        raise ConfigError(
            f"{where} records no model (the embeddings were not written by `clipline embed`): give the model that "
            "made them as model.* (model.arch=..., model.pretrained=... or model.checkpoint=...)"
        )
    check_width(model.dim, name, width, where)
    return model


def to_record(given: ModelConfig, width: int, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(fingerprint, config) of `given` to record as the model of vectors that recorded none, its width checked
    where its config tells it (no weights are loaded)."""
    from pipeline.models import model_fingerprint

    declared = config_width(given)
    if declared is not None:
        check_width(declared, describe(given), width, where)
    else:
        log.warning("the width of %s is not known without loading it: recorded unchecked", describe(given))
    return model_fingerprint(given), given.model_dump(mode="json")
