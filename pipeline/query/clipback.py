"""clip-retrieval's `clip back` API over clipline index folders, without the HTTP: /indices-list, /knn-service and
/metadata requests checked, bounded and answered with clip back's JSON shapes (as clip_retrieval/clip_back.py 2.45
reads and answers them: KnnService.post, query and map_to_metadata, MetadataService.post, IndicesList.get). The
served names and their ids are pipeline/query/served.py's.
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pipeline.core.config import ServeConfig
from pipeline.core.images import SampleError
from pipeline.index.store import MODALITIES
from pipeline.models.text import caption_for_tokenizer
from pipeline.query.search import Searcher, decode_query_image
from pipeline.query.served import RequestError, ServedIndex
from pipeline.web.addresses import parse_networks
from pipeline.web.fetch import ConnectionFailed, FetchError, FetchPolicy, FetchTimeout, HTTPStatusError, fetch

QUERY_KINDS = ("text", "image", "image_url", "embedding_input")  # clip back's order of precedence


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
            return served.embed(req.modality, text=caption_for_tokenizer(req.query))
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
        except FetchTimeout:
            raise RequestError(
                f"image_url: timed out: not fetched within the request's serve.timeout_s={self.settings.timeout_s:g}s",
                504,
            ) from None
        except FetchError as e:  # refused by policy: the request's fault (400); the server's failure: 502
            upstream = isinstance(e, (HTTPStatusError, ConnectionFailed))
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
        raise RequestError(
            f"embedding_input: {len(x)} numbers, the {searcher.modality} index holds {searcher.index.d}-d vectors"
        )
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
