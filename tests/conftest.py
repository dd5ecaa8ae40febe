"""Shared fixtures; everything is generated in tmp paths and nothing touches the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.support.helpers import make_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Overrides that load a random-weight tiny open_clip model through the checkpoint path."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
