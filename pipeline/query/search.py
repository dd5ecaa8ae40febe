"""Search an index folder made by `clipline index`: the Searcher API and the `clipline query` command.

The model that embeds text and image queries is the one recorded with the index (from clipline's manifest, or
model.* recorded by `clipline index` for embeddings clipline did not write), else model.*; key and vector queries
need none. The stored vector of a key query is read back from the embeddings the index was built from, with the
format options the index recorded.

clip-retrieval's `ClipClient` and front end query the same folder through `clipline serve` (pipeline/query/serve.py),
which speaks clip back's HTTP API over Searchers.
"""

from __future__ import annotations

import functools
import json
import logging
import posixpath
from typing import TYPE_CHECKING, Any, Sequence

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.config import Config, EmbeddingsConfig, ModelConfig, require
from pipeline.core.errors import ConfigError
from pipeline.embeddings.layout import read_manifest
from pipeline.embeddings.read import EmbeddingSet
from pipeline.index.store import index_files, read_index, read_info

if TYPE_CHECKING:
    import faiss
    from PIL import Image

    from pipeline.models import EmbeddingModel

log = logging.getLogger(__name__)

COLUMNS = ["query", "rank", "score", "key", "caption", "url"]
MAX_QUERY_IMAGE_PIXELS = 89_478_485


class Searcher:
    """One modality's index of an index folder, with its id map and (loaded on first use) the embedding model.

    `model` is the model to embed text and image queries with when the index records none (it was built from
    embeddings clipline did not write, without embeddings.record_model); a recorded model always wins. Either way
    its width is checked against the index's before the first query.
    """

    def __init__(self, index_dir: str, modality: str = "image", mmap: bool = True, model: ModelConfig | None = None):
        self.index_dir = index_dir.rstrip("/")
        self.modality = modality
        info = read_info(self.index_dir, modality)
        if info is None:
            raise FileNotFoundError(
                f"{self.index_dir}: no {modality} index (expected {modality}.json from `clipline index`)"
            )
        self.info: dict[str, Any] = info
        files = index_files(self.index_dir, modality)
        self.index: faiss.Index = read_index(files.index, mmap=mmap)
        if info.get("index_param"):
            import faiss

            faiss.ParameterSpace().set_index_parameters(self.index, info["index_param"])
        with fsspec.open(files.ids, "rb") as f:
            self.ids: pa.Table = pq.read_table(f)
        if not self.index.ntotal == len(self.ids) == info["ntotal"]:
            raise RuntimeError(
                f"{self.index_dir}: {modality} index ({self.index.ntotal}), id map ({len(self.ids)}) and "
                f"json ({info['ntotal']}) disagree; rebuild it with index.rebuild=true"
            )
        self.model_config = model
        self._model: EmbeddingModel | None = None

    @functools.cached_property
    def embed_dir(self) -> str:
        """The embeddings the index was built from: as recorded, else (clipline's own, moved with the index) the
        index folder's parent (default layout)."""
        recorded = self.info["embed"]["path"]
        if self.input_options.input_format == "clipline" and read_manifest(recorded) is None:
            parent = posixpath.dirname(self.index_dir)
            if read_manifest(parent) is not None:
                return parent
        return str(recorded)

    @functools.cached_property
    def input_options(self) -> EmbeddingsConfig:
        """The embeddings.* options the index was built with (clipline's own format for indices that record none)."""
        names = EmbeddingsConfig.model_fields
        return EmbeddingsConfig.model_validate({k: v for k, v in self.info["embed"].items() if k in names and v})

    @property
    def model(self) -> EmbeddingModel:
        """The model recorded with the index (checked to still be the same weights), else the one given; its width
        checked against the index's."""
        if self._model is None:
            from pipeline.embeddings.modelcheck import load_for

            embed = self.info["embed"]
            where = index_files(self.index_dir, self.modality).info
            self._model = load_for(
                embed.get("model_config"), embed.get("model"), where, self.model_config, int(self.index.d)
            )
        return self._model

    def search_vectors(self, vectors: np.ndarray, k: int = 10, queries: Sequence[str] | None = None) -> pd.DataFrame:
        """Nearest neighbours of L2-normalized vectors: one row per hit (query, rank, score, key, caption, url, id, shard)."""
        x = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if x.shape[1] != self.index.d:
            raise ValueError(f"query vectors have dim {x.shape[1]}, the {self.modality} index has dim {self.index.d}")
        labels = list(queries) if queries is not None else [f"vector {i}" for i in range(len(x))]
        scores, ids = self.index.search(x, k)
        q, rank = np.nonzero(ids >= 0)  # an IVF search probing too few lists pads with -1
        hits = ids[q, rank]
        meta = (
            self.ids.take(pa.array(hits)).to_pandas()
            if len(hits)
            else pd.DataFrame(columns=["key", "caption", "url", "shard"])
        )
        return pd.DataFrame(
            {
                "query": [labels[i] for i in q],
                "rank": rank + 1,
                "score": scores[q, rank].astype(np.float32),
                "key": meta["key"].to_numpy(),
                "caption": meta["caption"].to_numpy(),
                "url": meta["url"].to_numpy(),
                "id": hits,
                "shard": meta["shard"].to_numpy(),
            }
        )

    def share_model(self, other: Searcher) -> bool:
        """Use `other`'s loaded model when both indices name the same one (a folder's image and text indices): one
        copy of the weights. False, and nothing shared, when they differ or `other` has loaded none."""
        mine, theirs = self.info["embed"], other.info["embed"]
        same = (mine.get("model"), mine.get("model_config"), self.model_config) == (
            theirs.get("model"),
            theirs.get("model_config"),
            other.model_config,
        )
        if other._model is None or not same or other._model.dim != self.index.d:
            return False
        self._model = other._model
        return True

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """(n, d) float32 L2-normalized embeddings of texts, by the index's model."""
        import torch

        with torch.no_grad():
            return np.asarray(self.model.encode_text(self.model.tokenize(list(texts))).numpy(), np.float32)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(n, d) float32 L2-normalized embeddings of RGB images, by the index's model."""
        import torch

        with torch.no_grad():
            pixels = torch.stack([self.model.preprocess(im) for im in images])
            return np.asarray(self.model.encode_image(pixels).numpy(), np.float32)

    def search_text(self, texts: list[str], k: int = 10) -> pd.DataFrame:
        """Embed texts with the index's text tower, then search."""
        return self.search_vectors(self.embed_text(texts), k, texts)

    def search_image(self, images: Sequence[str | Image.Image], k: int = 10) -> pd.DataFrame:
        """Embed images (paths, URLs or PIL images) with the index's image tower, then search."""
        labels = [im if isinstance(im, str) else f"image {i}" for i, im in enumerate(images)]
        return self.search_vectors(self.embed_images([_load_image(im) for im in images]), k, labels)

    def search_key(self, keys: list[str], k: int = 10) -> pd.DataFrame:
        """Neighbours of indexed samples, queried with their stored embedding (read back from the embed npy)."""
        found = self.ids.filter(pc.is_in(self.ids["key"], value_set=pa.array(keys, pa.string())))
        where: dict[str, list[tuple[str, int]]] = {}
        for r in found.select(["key", "shard", "row"]).to_pylist():
            where.setdefault(r["key"], []).append((r["shard"], r["row"]))
        missing = [key for key in keys if key not in where]
        if missing:
            raise KeyError(f"not in the {self.modality} index: {', '.join(missing[:10])}")
        # Row numbers, the keys of embeddings without a key column, repeat in every file: refuse to guess.
        repeated = [f"{key} (shards {', '.join(s for s, _ in where[key][:3])})" for key in keys if len(where[key]) > 1]
        if repeated:
            raise KeyError(f"keys in several shards of the {self.modality} index: {'; '.join(repeated[:5])}")
        return self.search_vectors(np.stack([self._stored_vector(*where[key][0]) for key in keys]), k, keys)

    def _stored_vector(self, shard: str, row: int) -> np.ndarray:
        # Only this shard is opened: a foreign folder is not listed and checked again for one vector.
        emb = EmbeddingSet(self.embed_dir, options=self.input_options, shards=[shard])
        return emb.vector(shard, row, self.modality)


def decode_query_image(data: bytes, max_pixels: int = MAX_QUERY_IMAGE_PIXELS) -> Image.Image:
    """A query image's bytes to RGB under the embed stage's policy (core/images.py: formats that decode nothing
    before the size check, the pixel limit read from the header, EXIF, every mode); SampleError says why not."""
    from pipeline.core.images import decode_image

    return decode_image(data, max_pixels)


def _load_image(image: str | Image.Image) -> Image.Image:
    from pipeline.core.images import to_rgb
    from pipeline.web.fetch import FetchPolicy, fetch

    if not isinstance(image, str):
        return to_rgb(image)
    if image.startswith(("http://", "https://")):  # the download stage's rules: public addresses, capped, bounded
        data = fetch(image, FetchPolicy(timeout_s=30.0)).body
    else:
        with fsspec.open(image, "rb") as f:
            data = f.read()
    return decode_query_image(data)


def format_results(df: pd.DataFrame, fmt: str) -> str:
    """The CLI's output: an aligned table, or one JSON object per hit."""
    df = df[COLUMNS]
    if fmt == "jsonl":
        return "\n".join(json.dumps(r, ensure_ascii=False, default=float) for r in df.to_dict(orient="records"))
    if df.empty:
        return "(no results)"
    shown = df.assign(
        score=df["score"].map(lambda s: f"{s:.4f}"),
        caption=df["caption"].fillna("").map(lambda c: c if len(c) <= 60 else c[:57] + "..."),
    )
    return str(shown.to_string(index=False))


def query_cli(
    cfg: Config, text: list[str] | None = None, image: list[str] | None = None, key: list[str] | None = None
) -> str:
    """`clipline query input=INDEX_DIR (--text T | --image PATH_OR_URL | --key KEY)...`: the text to print."""
    from pipeline.core.images import SampleError
    from pipeline.models import ModelLoadError

    require(cfg, "input")
    if not isinstance(cfg.input, str):
        raise ConfigError("input: expected one index folder")
    if sum(q is not None for q in (text, image, key)) != 1:
        raise ConfigError("query: give exactly one of --text, --image or --key")
    try:
        searcher = Searcher(cfg.input, cfg.query.modality, model=cfg.model)
        if text is not None or image is not None:
            searcher.model  # noqa: B018  (loaded and its width checked before any query runs)
        if text is not None:
            df = searcher.search_text(text, cfg.query.k)
        elif image is not None:
            df = searcher.search_image(image, cfg.query.k)
        else:
            df = searcher.search_key(key or [], cfg.query.k)
    except (FileNotFoundError, KeyError, SampleError, ModelLoadError) as e:  # the query cannot run here: exit 2
        raise ConfigError(str(e.args[0]) if isinstance(e, KeyError) else str(e)) from e
    return format_results(df, cfg.query.format)
