"""The typed records that flow reader -> decode -> embedder -> writer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

OK = "ok"


@dataclass
class RawSample:
    """One sample as read from a shard, before decoding."""

    key: str
    index: int
    image: bytes | None = None
    caption: bytes | str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # a read-level failure (e.g. the tar broke inside this sample)


@dataclass
class SampleRow:
    """Per-sample metadata written to metadata_{shard}.parquet."""

    key: str
    index: int
    caption: str | None
    url: str | None
    sha256: str | None
    width: int | None
    height: int | None
    status: str
    error: str | None
    caption_status: str


@dataclass
class DecodedBatch:
    """Up to batch_size samples of one shard: preprocessed pixels for the ok ones, rows for all."""

    shard_id: str
    rows: list[SampleRow]
    pixels: Any  # torch.Tensor [n_image_ok, C, H, W] (on the model's device with embed.decode=device) or None
    image_rows: list[int]  # positions in rows that have pixels
    tokens: Any  # tokenizer output for captions, or None
    text_rows: list[int]  # positions in rows that have a caption
    decode_seconds: float = 0.0
    device_decoded: int = 0  # images decoded and preprocessed on the model's device (embed.decode=device)


@dataclass
class EmbeddedBatch:
    """A batch after the model: row-aligned embeddings (zero rows where a modality failed) and metadata."""

    shard_id: str
    rows: list[SampleRow]
    image_emb: np.ndarray
    text_emb: np.ndarray

    def clip_scores(self) -> np.ndarray:
        img = self.image_emb.astype(np.float32)
        txt = self.text_emb.astype(np.float32)
        score = (img * txt).sum(axis=1)
        has_both = (np.abs(img).sum(axis=1) > 0) & (np.abs(txt).sum(axis=1) > 0)
        return np.where(has_both, score, np.nan).astype(np.float32)

    def metadata_table(self) -> pa.Table:
        from pipeline.embeddings.layout import METADATA_SCHEMA

        r = self.rows
        cols = {
            "key": [x.key for x in r],
            "shard": [self.shard_id] * len(r),
            "index": [x.index for x in r],
            "caption": [x.caption for x in r],
            "url": [x.url for x in r],
            "sha256": [x.sha256 for x in r],
            "width": [x.width for x in r],
            "height": [x.height for x in r],
            "clip_score": self.clip_scores(),
            "status": [x.status for x in r],
            "error": [x.error for x in r],
            "caption_status": [x.caption_status for x in r],
        }
        return pa.table(cols, schema=METADATA_SCHEMA)
