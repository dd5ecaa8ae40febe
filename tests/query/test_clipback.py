"""/knn-service requests checked as clip back reads them (the HTTP end to end is in test_serve.py)."""

from __future__ import annotations

import pytest

from pipeline.models.text import caption_for_tokenizer as _bounded_text
from pipeline.query.clipback import KnnRequest
from pipeline.query.served import RequestError
from tests.support.clipretrieval import front_body


def test_request_parsing() -> None:
    req = KnnRequest.parse(front_body(text="", image="aGk=", num_result_ids=60, num_images=7), 100)
    assert (req.kind, req.query, req.num_images, req.num_result_ids, req.deduplicate) == ("image", "aGk=", 7, 60, True)
    assert KnnRequest.parse({"text": "a", "indice_name": None}, 100).indice_name is None  # then the first index
    for body, message in [
        ([], "JSON object"),
        ({"text": 3}, "expected a string"),
        ({}, "give one of"),
        ({"text": "a", "modality": "video"}, "modality"),
        ({"text": "a", "num_images": "ten"}, "num_images"),
        ({"text": "a", "num_images": True}, "num_images"),
        ({"text": "a", "num_result_ids": 101}, "serve.max_results=100"),
        ({"text": "a", "deduplicate": "yes"}, "deduplicate"),
        ({"text": "a", "use_mclip": True}, "use_mclip"),
        ({"text": "a", "indice_name": 5}, "indice_name"),
    ]:
        with pytest.raises(RequestError, match=message):
            KnnRequest.parse(body, 100)


def test_long_text_is_bounded_before_the_tokenizer() -> None:
    assert _bounded_text("a short query") == "a short query"
    assert _bounded_text("x" * 1_000_000) == "x" * 256  # one endless word: BPE cost grows with its length squared
    words = _bounded_text(" ".join(["word"] * 5000)).split()
    assert len(words) == 1024 and set(words) == {"word"}  # far more than any tokenizer keeps
