"""The input formats by name (`embeddings.input_format`): the one place a name becomes a Source, refusing unknown
names at once with the names that exist."""

from __future__ import annotations

from typing import Any

from pipeline.core.config import EmbeddingsConfig
from pipeline.embeddings.foreign import ClipRetrievalSource, NpySource
from pipeline.embeddings.formats import CliplineSource, Source
from pipeline.embeddings.parquetfiles import ParquetSource
from pipeline.embeddings.rows import Bounded

SOURCES: dict[str, type[Source]] = {c.name: c for c in (CliplineSource, ClipRetrievalSource, NpySource, ParquetSource)}


def source_for(folder: str, options: EmbeddingsConfig, bounded: Bounded[Any]) -> Source:
    """The Source of `options.input_format` opened on `folder`; an unknown name raises ValueError."""
    cls = SOURCES.get(options.input_format)
    if cls is None:
        raise ValueError(f"unknown embeddings.input_format {options.input_format!r}; known: {', '.join(SOURCES)}")
    return cls(folder, options, bounded)
