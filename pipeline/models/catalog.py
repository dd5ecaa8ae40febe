"""What `clipline models` prints: which model families and weights this machine can use, and how to select each."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.core.config import Config

log = logging.getLogger(__name__)

CACHED = "*"


@dataclass(frozen=True)
class HubSnapshot:
    """One model repository found in the local Hugging Face cache."""

    repo_id: str
    path: Path
    kind: str  # "open_clip" (has open_clip_config.json) or a transformers model_type such as "clip"


def pretrained_cache_path(arch: str, tag: str, cache_dir: str | None = None) -> str | None:
    """Where open_clip would find this tag's weights without the network, or None when it would download."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        return None
    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    hub = cfg.get("hf_hub")
    if hub:
        from huggingface_hub import try_to_load_from_cache
        from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

        repo_id, filename = os.path.split(hub)  # "org/name/" means open_clip's default file name
        names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")  # open_clip prefers a safetensors twin
        for name in names:
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(found, str):
                return found
    url = cfg.get("url")
    if url:
        path = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        return path if os.path.isfile(path) else None
    return None


def hub_snapshots(cache_dir: str | None = None) -> list[HubSnapshot]:
    """open_clip and CLIP/SigLIP transformers repositories present in the local Hugging Face cache."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return []
    out = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            path = Path(rev.snapshot_path)
            if (path / "open_clip_config.json").is_file():
                out.append(HubSnapshot(repo.repo_id, path, "open_clip"))
                break
            if (path / "config.json").is_file():
                try:
                    model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
                except (OSError, ValueError):
                    continue
                if "clip" in model_type or "siglip" in model_type:
                    out.append(HubSnapshot(repo.repo_id, path, model_type))
                    break
    return out


def _offline_section() -> list[str]:
    from pipeline.models import ModelLoadError
    from pipeline.models.offline import INSTALL_HINT, TEXT_ENCODER, package_versions, weights_files

    lines = ["offline  (model=offline) ConSE: EfficientNet-Lite0 ImageNet classes x " + TEXT_ENCODER + " text, 384-d"]
    try:
        files = weights_files()
    except ModelLoadError as e:
        lines.append(f"  not available: {e}")
        lines.append(f"  needs: {INSTALL_HINT}")
        return lines
    versions = package_versions()
    lines.append("  installed: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    lines += [f"  weights: {name}: {path}" for name, path in files.items()]
    return lines


def _open_clip_section(cache_dir: str | None) -> tuple[list[str], int]:
    import open_clip

    lines = [
        "open_clip  (model=ARCH/TAG, or model.arch=ARCH model.pretrained=TAG; "
        f"{CACHED} = weights already in the local cache, others need the network once)"
    ]
    n_cached = 0
    n_tags = 0
    for arch in open_clip.list_models():
        tags = open_clip.list_pretrained_tags_by_model(arch)
        marked = []
        for tag in tags:
            cached = pretrained_cache_path(arch, tag, cache_dir) is not None
            n_cached += cached
            marked.append(f"{CACHED}{tag}" if cached else tag)
        n_tags += len(tags)
        lines.append(
            f"  {arch}: " + (", ".join(marked) if marked else "(no pretrained tag; use model.checkpoint=FILE)")
        )
    lines.append(
        f"  {len(open_clip.list_models())} architectures, {n_tags} pretrained tags, {n_cached} cached. "
        "Any architecture also loads a local state dict: model.arch=ARCH model.checkpoint=FILE "
        "(custom architectures: model.model_config_file=CONFIG.json)."
    )
    return lines, n_cached


def _hub_section(cache_dir: str | None) -> list[str]:
    snaps = hub_snapshots(cache_dir)
    lines = [
        "hf  (model=hf:DIR, or model.family=hf model.path=DIR) transformers CLIP/SigLIP saved with save_pretrained()"
    ]
    hf_dirs = [s for s in snaps if s.kind != "open_clip"]
    oc_repos = [s for s in snaps if s.kind == "open_clip"]
    lines += [f"  cached {s.kind}: model=hf:{s.path}" for s in hf_dirs]
    if not hf_dirs:
        lines.append(
            "  no CLIP/SigLIP transformers model in the local Hugging Face cache; any save_pretrained() folder works"
        )
    if oc_repos:
        lines.append("open_clip Hugging Face repositories in the local cache:")
        lines += [f"  model=hf-hub:{s.repo_id}" for s in oc_repos]
    return lines


def list_models_cli(cfg: "Config", family: str | None = None) -> str:
    """The text of `clipline models`: every family, what is installed or cached, and the override that selects it."""
    cache_dir = cfg.model.cache_dir
    families = [family] if family else ["offline", "open_clip", "hf"]
    blocks: list[list[str]] = []
    for fam in families:
        if fam == "offline":
            blocks.append(_offline_section())
        elif fam == "open_clip":
            blocks.append(_open_clip_section(cache_dir)[0])
        elif fam == "hf":
            blocks.append(_hub_section(cache_dir))
        else:
            from pipeline.core.errors import ConfigError

            raise ConfigError(f"--family {fam!r}: expected offline, open_clip or hf")
    hub_cache = cache_dir or _default_hub_cache()
    footer = f"(Hugging Face cache: {hub_cache}; set model.cache_dir or HF_HOME to look elsewhere.)"
    return "\n\n".join("\n".join(b) for b in blocks) + "\n\n" + footer


def _default_hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)
