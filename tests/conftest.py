"""Shared fixtures; everything is generated in tmp paths and nothing touches the network."""

from __future__ import annotations

import os
from collections.abc import Iterator
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


@pytest.fixture
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """For tests that call setup_logging (or main() in-process) under capsys: afterwards, drop the handler it bound to
    the test's captured stderr (closed then) but keep pytest's own, and restore the root level and TQDM_DISABLE."""
    import logging

    root = logging.getLogger()
    level, before = root.level, list(root.handlers)
    monkeypatch.setitem(os.environ, "TQDM_DISABLE", "restored after the test")
    del os.environ["TQDM_DISABLE"]
    yield
    for handler in root.handlers:
        if handler not in before and type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    root.setLevel(level)
