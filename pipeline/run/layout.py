"""Where each stage of a chain run (`clipline run`, `clipline demo`) reads and writes under one output root: the one
place those folder names are built."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass


@dataclass(frozen=True)
class ChainLayout:
    """Where each stage of a chain run reads and writes, under one output root."""

    shards: str
    embeddings: str
    index: str
    dedup: str
    url_lists: str = ""
    inputs: str = ""
    summary: str = ""
    root: str = ""


def layout(output: str) -> ChainLayout:
    root = output.rstrip("/")
    emb = posixpath.join(root, "embeddings")
    return ChainLayout(
        shards=posixpath.join(root, "shards"),
        embeddings=emb,
        index=posixpath.join(emb, "index"),
        dedup=posixpath.join(emb, "dedup"),
        url_lists=posixpath.join(root, "url_lists"),
        inputs=posixpath.join(root, "inputs.json"),
        summary=posixpath.join(root, "summary.json"),
        root=root,
    )


def embed_folder_layout(folder: str) -> ChainLayout:
    """An embed output folder read on its own (no chain around it): index and dedup at their stages' defaults."""
    root = folder.rstrip("/")
    return ChainLayout("", root, posixpath.join(root, "index"), posixpath.join(root, "dedup"), root=root)
