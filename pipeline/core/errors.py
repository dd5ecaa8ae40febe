"""The two failures every stage may raise, mapped to exit codes by the CLI: bad configuration (2) and a failed job (1)."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """Bad configuration: reported with the key path, exit code 2, nothing written."""


class JobFailed(RuntimeError):
    """Some work failed for good; the job exits 1 after writing what it could."""

    def __init__(self, message: str, summary: dict[str, Any] | None = None):
        super().__init__(message)
        self.summary = summary or {}
