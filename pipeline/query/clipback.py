"""clip-retrieval's `clip back` API over clipline index folders, without the HTTP: /indices-list, /knn-service and
/metadata requests checked, bounded and answered with clip back's JSON shapes (as clip_retrieval/clip_back.py 2.45
reads and answers them: KnnService.post, query and map_to_metadata, MetadataService.post, IndicesList.get).

Ids. clip back serves one metadata table for both indices of a name, so an id is a sample. clipline's image and
text indices number their own vectors (a sample whose image failed has a text vector only), so each served name
gets one sample id space: image ids as they are, and for a sample with a text vector only, the image index's size
plus its text id. A text-index result then carries the same id as the image-index result of the same sample, and
/metadata needs no modality.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.config import ModelConfig, ServeConfig
from pipeline.core.errors import ConfigError
from pipeline.core.images import SampleError
from pipeline.index.store import MODALITIES, read_info
from pipeline.models import ModelLoadError
from pipeline.query.search import Searcher, decode_query_image
from pipeline.web.addresses import parse_networks
from pipeline.web.fetch import ConnectionFailed, FetchError, FetchPolicy, FetchTimeout, HTTPStatusError, fetch

log = logging.getLogger(__name__)

DEDUP_THRESHOLD = 0.94  # clip back's: a result this close to a better-ranked one is dropped by `deduplicate`
DEDUP_BLOCK = 256  # result rows compared at once: bounds memory when many results are near-identical
QUERY_KINDS = ("text", "image", "image_url", "embedding_input")  # clip back's order of precedence
# The embed stage's caption bound (embed/decode.py: caption_for_tokenizer, which a query module may not import):
# the tokenizer's work stays bounded and the leading tokens the model keeps are unchanged.
MAX_TEXT_CHARS, MAX_WORDS, MAX_WORD_CHARS = 20_000, 1024, 256


class RequestError(Exception):
    """A request that cannot be answered as asked: `status` is the HTTP status, the message says why."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class KnnRequest:
    """One /knn-service request, checked: what to embed, which index to search, how many results.

    Accepted and ignored, as clip back does when started without the models they need (its default):
    use_safety_model, use_violence_detector, aesthetic_score, aesthetic_weight (ClipClient sends them every time)."""

    indice_name: str | None
    modality: str
    kind: str  # one of QUERY_KINDS
    query: Any  # a string, or the list of numbers of embedding_input
    num_images: int  # results given with their metadata
    num_result_ids: int  # results searched for (after those, id and similarity only)
    deduplicate: bool

    @classmethod
    def parse(cls, body: Any, max_results: int) -> KnnRequest:
        if not isinstance(body, dict):
            raise RequestError(f"expected a JSON object, got {type(body).__name__}")
        given = [(k, body.get(k)) for k in QUERY_KINDS if body.get(k) not in (None, "", [])]
        if not given:
            raise RequestError("give one of text, image (base64), image_url or embedding_input")
        kind, query = given[0]
        if kind != "embedding_input" and not isinstance(query, str):
            raise RequestError(f"{kind}: expected a string, got {type(query).__name__}")
        modality = body.get("modality") or "image"
        if modality not in MODALITIES:
            raise RequestError(f"modality: expected image or text, got {modality!r}")
        num_images = _count(body, "num_images", 100, max_results)
        if _flag(body, "use_mclip"):
            raise RequestError("use_mclip: clipline serve has no multilingual CLIP; send use_mclip=false")
        return cls(
            indice_name=_name(body),
            modality=modality,
            kind=kind,
            query=query,
            num_images=num_images,
            num_result_ids=_count(body, "num_result_ids", num_images, max_results),
            deduplicate=_flag(body, "deduplicate"),
        )

    def describe(self) -> str:
        """For the request's log line (the query itself is not logged)."""
        dedup = " deduplicate" if self.deduplicate else ""
        return f"{self.kind} -> {self.indice_name or '(first)'}/{self.modality} k={self.num_result_ids}{dedup}"


def _count(body: dict[str, Any], key: str, default: int, cap: int) -> int:
    value = body.get(key)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RequestError(f"{key}: expected a count (an integer >= 0), got {value!r}")
    if value > cap:
        raise RequestError(f"{key}={value} is more than this server answers (serve.max_results={cap})")
    return value


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"{key}: expected true or false, got {value!r}")
    return value


def _name(body: dict[str, Any]) -> str | None:
    value = body.get("indice_name")
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise RequestError(f"indice_name: expected a string, got {value!r}")
    return value


class ServedIndex:
    """One name of /indices-list: an index folder's image and/or text index, one sample id space over both, and the
    model that embeds text and image queries for them (loaded once, used by one request at a time)."""

    def __init__(self, name: str, folder: str, model: ModelConfig, require_model: bool = True):
        self.name, self.folder = name, folder
        self.searchers = {m: Searcher(folder, m, model=model) for m in MODALITIES if read_info(folder, m) is not None}
        if not self.searchers:
            raise ConfigError(f"serve: {name} ({folder}) holds no index (image.json or text.json of `clipline index`)")
        image, text = self.searchers.get("image"), self.searchers.get("text")
        self.offset = int(image.index.ntotal) if image is not None else 0
        self.text_samples = text_sample_ids(image, text, self.offset) if text is not None else None
        self.size = self.offset + (int(text.index.ntotal) if text is not None else 0)
        # Deduplication compares the vectors the index holds, as clip back does (search_and_reconstruct).
        self.no_reconstruct = {m: _reconstruct_refusal(s) for m, s in self.searchers.items()}
        self.model_error = self._load_model(require_model)
        self._model_lock = threading.Lock()  # tokenizers and some towers are not safe to call from two threads

    def _load_model(self, required: bool) -> str | None:
        first, *others = self.searchers.values()
        try:
            first.model  # noqa: B018  (loaded and its width checked before any request)
            for s in others:
                if not s.share_model(first):
                    s.model  # noqa: B018
        except (ConfigError, ModelLoadError) as e:
            if required:
                raise ConfigError(f"serve: {self.name}: {e} (serve.require_model=false serves it for embedding_input "
                                  "queries only)") from e  # fmt: skip
            log.warning("serving %s for embedding_input queries only: %s", self.name, e)
            return str(e)
        return None

    def searcher(self, modality: str) -> Searcher:
        if modality not in self.searchers:
            raise RequestError(f"{self.name} has no {modality} index (it has: {', '.join(self.searchers)})")
        return self.searchers[modality]

    def embed(self, modality: str, text: str | None = None, image: Any = None) -> np.ndarray:
        """(1, d) query vector of a text or an RGB image, by the model of the index searched."""
        if self.model_error is not None:
            raise RequestError(f"text and image queries need the model of {self.name}, which is not loaded: "
                               f"{self.model_error}")  # fmt: skip
        searcher = self.searcher(modality)
        with self._model_lock:
            return searcher.embed_text([text]) if text is not None else searcher.embed_images([image])

    def search(self, vector: np.ndarray, modality: str, k: int, deduplicate: bool) -> tuple[np.ndarray, np.ndarray]:
        """Sample ids and similarities of the k nearest, best first; with `deduplicate`, without every result linked
        to a better-ranked one by cosine > 0.94 (through others, as connected components: clip back's rule)."""
        index = self.searcher(modality).index
        if k == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        x = np.ascontiguousarray(vector, np.float32).reshape(1, -1)
        if deduplicate:
            if self.no_reconstruct[modality]:
                raise RequestError(f"deduplicate: the {modality} index of {self.name} cannot give back its vectors "
                                   f"({self.no_reconstruct[modality]}); send deduplicate=false")  # fmt: skip
            sims, ids, vectors = index.search_and_reconstruct(x, k)
        else:
            sims, ids = index.search(x, k)
        found = ids[0] >= 0  # padding when fewer than k are found: clip back stops at the first -1
        n = int(found.argmin()) if not found.all() else len(found)
        hits, scores = ids[0][:n].astype(np.int64), sims[0][:n]
        samples = hits if modality == "image" else self.text_samples[hits]  # type: ignore[index]
        if deduplicate:
            keep = ~near_duplicates(vectors[0][:n])
            samples, scores = samples[keep], scores[keep]
        return samples, scores

    def metadata(self, samples: np.ndarray, columns: Sequence[str]) -> list[dict[str, Any]]:
        """The id map's `columns` of each sample id (all within 0..size-1), in the order given."""
        out: list[dict[str, Any]] = [{} for _ in range(len(samples))]
        is_image = samples < self.offset
        for modality, where, rows in (
            ("image", np.nonzero(is_image)[0], samples[is_image]),
            ("text", np.nonzero(~is_image)[0], samples[~is_image] - self.offset),
        ):
            if len(where):
                table = self.searchers[modality].ids.take(pa.array(rows)).select(list(columns))
                for i, record in zip(where, table.to_pylist()):
                    out[i] = record
        return out


def text_sample_ids(image: Searcher | None, text: Searcher, offset: int) -> np.ndarray:
    """text id -> sample id: the image id of the same (shard, row) when the sample has one, else offset + text id."""
    out = offset + np.arange(text.index.ntotal, dtype=np.int64)
    if image is None:
        return out
    left = text.ids.select(["shard", "row", "id"]).rename_columns(["shard", "row", "text_id"])
    joined = left.join(image.ids.select(["shard", "row", "id"]), keys=["shard", "row"], join_type="left outer")
    text_ids = joined["text_id"].to_numpy()
    image_ids = pc.fill_null(joined["id"], -1).to_numpy()
    out[text_ids] = np.where(image_ids >= 0, image_ids, out[text_ids])
    return out


def _reconstruct_refusal(searcher: Searcher) -> str | None:
    try:
        searcher.index.search_and_reconstruct(np.zeros((1, searcher.index.d), np.float32), 1)
        return None
    except RuntimeError as e:  # faiss: this index type keeps no vectors it can give back
        return str(e).strip().splitlines()[-1][:200]


def near_duplicates(vectors: np.ndarray, threshold: float = DEDUP_THRESHOLD, block: int = DEDUP_BLOCK) -> np.ndarray:
    """Which rows (ranked best first) to drop: all but the first of each connected component of the graph whose
    edges join rows of cosine > threshold. Rows are compared `block` at a time, carrying the components found so
    far as edges, so memory stays O(block x n) whatever the number of near-identical results."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(vectors)
    x = np.asarray(vectors, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms == 0, 1, norms)  # clip back normalizes the reconstructed vectors, zero ones left as is
    first = np.arange(n)  # each row's component, named by its best-ranked member
    for start in range(0, n, block):
        i, j = np.nonzero(x[start : start + block] @ x.T > threshold)
        a, b = np.concatenate([i + start, np.arange(n)]), np.concatenate([j, first])
        _, comp = connected_components(coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n)), directed=False)
        best = np.full(comp.max() + 1, n)
        np.minimum.at(best, comp, np.arange(n))
        first = best[comp]
    return np.asarray(first != np.arange(n))


class ClipBack:
    """The API of one `clipline serve`: the served names, in order, and the answer to each endpoint's request."""

    def __init__(self, served: Sequence[ServedIndex], settings: ServeConfig):
        self.served = {s.name: s for s in served}
        self.settings = settings
        self.policy = FetchPolicy(
            timeout_s=settings.timeout_s,
            max_bytes=settings.max_image_bytes,
            allow_private_addresses=settings.allow_private_addresses,
            allow_networks=parse_networks(settings.allow_networks),
        )

    def indices_list(self) -> list[str]:
        return list(self.served)

    def served_index(self, name: str | None) -> ServedIndex:
        if name is None:  # clip back: the first index
            return next(iter(self.served.values()))
        if name not in self.served:
            raise RequestError(f"indice_name {name!r} is not served here (served: {', '.join(self.served)})")
        return self.served[name]

    def knn(self, req: KnnRequest, deadline: float) -> list[dict[str, Any]]:
        """/knn-service: every result found (up to num_result_ids) as {id, similarity}, the first num_images with
        the metadata columns first, as clip back's map_to_metadata gives them."""
        served = self.served_index(req.indice_name)
        vector = self._vector(served, req, deadline)
        if time.monotonic() > deadline:
            raise RequestError(f"not answered within serve.timeout_s={self.settings.timeout_s:g}s", 503)
        samples, scores = served.search(vector, req.modality, req.num_result_ids, req.deduplicate)
        metas = served.metadata(samples[: req.num_images], self.settings.columns)
        results = []
        for i, (sample, score) in enumerate(zip(samples, scores)):
            entry = dict(metas[i]) if i < len(metas) else {}
            entry["id"] = int(sample)
            entry["similarity"] = float(score)
            results.append(entry)
        return results

    def _vector(self, served: ServedIndex, req: KnnRequest, deadline: float) -> np.ndarray:
        if req.kind == "embedding_input":
            return _embedding(req.query, served.searcher(req.modality))
        served.searcher(req.modality)  # an index the name lacks is refused before any fetch or model call
        if req.kind == "text":
            return served.embed(req.modality, text=_bounded_text(req.query))
        data = _base64(req.query) if req.kind == "image" else self._fetch(req.query, deadline)
        try:
            image = decode_query_image(data, self.settings.max_pixels)
        except SampleError as e:  # the policy's message names the embed setting; here the limit is serve's own
            raise RequestError(
                f"{req.kind}: {e.status}: {str(e).replace('embed.max_pixels', 'serve.max_pixels')}"
            ) from None
        return served.embed(req.modality, image=image)

    def _fetch(self, url: str, deadline: float) -> bytes:
        try:
            return fetch(url, self.policy, deadline).body
        except FetchError as e:  # refused by policy: the request's fault (400); the server's failure: 502
            upstream = isinstance(e, (HTTPStatusError, ConnectionFailed, FetchTimeout))
            raise RequestError(f"image_url: {e}", 502 if upstream else 400) from None

    def metadata(self, body: Any) -> list[dict[str, Any]]:
        """/metadata: {id, metadata} of each id asked for, in order."""
        if not isinstance(body, dict):
            raise RequestError(f"expected a JSON object, got {type(body).__name__}")
        ids = body.get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise RequestError("ids: expected a list of integers")
        if not ids:
            return []
        if len(ids) > self.settings.max_results:
            raise RequestError(f"ids: {len(ids)} ids is more than serve.max_results={self.settings.max_results}")
        served = self.served_index(_name(body))
        outside = [i for i in ids if not 0 <= i < served.size]
        if outside:
            raise RequestError(f"ids not in {served.name} (0..{served.size - 1}): {outside[:10]}")
        metas = served.metadata(np.asarray(ids, np.int64), self.settings.columns)
        return [{"id": i, "metadata": m} for i, m in zip(ids, metas)]


def _embedding(values: Any, searcher: Searcher) -> np.ndarray:
    """embedding_input as clip back takes it: one vector, searched as given (clip back does not normalize it)."""
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise RequestError("embedding_input: expected a list of numbers")
    try:
        x = np.asarray(values, np.float32)
    except OverflowError:
        raise RequestError("embedding_input: numbers out of range") from None
    if len(x) != searcher.index.d:
        raise RequestError(f"embedding_input: {len(x)} numbers, the {searcher.modality} index holds "
                           f"{searcher.index.d}-d vectors")  # fmt: skip
    if not np.isfinite(x).all():
        raise RequestError("embedding_input: every number must be finite")
    return x[None]


def _base64(data: str) -> bytes:
    if data.startswith("data:") and "," in data:  # a data URL, as a browser's FileReader gives it
        data = data.split(",", 1)[1]
    try:
        return base64.b64decode(data)  # as clip back decodes: characters outside the alphabet are skipped
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"image: not base64 ({e})") from None


def _bounded_text(text: str) -> str:
    if len(text) <= MAX_WORD_CHARS:
        return text
    words = text[:MAX_TEXT_CHARS].split()[:MAX_WORDS]
    return " ".join(w[:MAX_WORD_CHARS] for w in words)
