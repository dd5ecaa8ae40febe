"""clip-retrieval's clients as clipline serve's tests meet them: request bodies exactly as ClipClient
(clip_retrieval/clip_client.py 2.45) and the front end (front/src/clip-service.js) send them, and ClipClient's
own module when it is at hand (clip-retrieval is not a dependency: its pins, pyarrow<16 among them, conflict)."""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType
from typing import Any

import pytest

NAME = "clipline"  # the indice_name the tests serve under


def clip_client_body(**query: Any) -> dict[str, Any]:
    """What ClipClient.query posts with its defaults (text=, image= as base64, image_url= or embedding_input=)."""
    body = {
        "text": None,
        "image": None,
        "image_url": None,
        "embedding_input": None,
        "deduplicate": True,
        "use_safety_model": True,
        "use_violence_detector": True,
        "indice_name": NAME,
        "use_mclip": False,
        "aesthetic_score": 9,
        "aesthetic_weight": 0.5,
        "modality": "image",
        "num_images": 40,
        "num_result_ids": 40,
    }
    body.update(query)
    if "num_images" in query and "num_result_ids" not in query:
        body["num_result_ids"] = query["num_images"]  # ClipClient sends num_result_ids = num_images
    return body


def front_body(**query: Any) -> dict[str, Any]:
    """What clip-retrieval's front end posts (its callClip: 40 images shown, 3000 result ids, filters on)."""
    body = {
        "text": None,
        "image": None,
        "image_url": None,
        "embedding_input": None,
        "modality": "image",
        "num_images": 40,
        "indice_name": NAME,
        "num_result_ids": 3000,
        "use_mclip": False,
        "deduplicate": True,
        "use_safety_model": True,
        "use_violence_detector": True,
        "aesthetic_score": "",
        "aesthetic_weight": "0.5",
    }
    body.update(query)
    return body


def clip_client_module() -> ModuleType:
    """clip_retrieval/clip_client.py: from an installed clip-retrieval, or the file CLIP_CLIENT_PY names (e.g. from
    `pip download clip-retrieval --no-deps`, unzipped). It imports only requests and the standard library, so it
    is loaded alone, without clip-retrieval's package __init__ and its pinned dependencies."""
    path = os.environ.get("CLIP_CLIENT_PY")
    if not path:
        spec = importlib.util.find_spec("clip_retrieval")
        if spec is not None and spec.submodule_search_locations:
            path = os.path.join(list(spec.submodule_search_locations)[0], "clip_client.py")
    if not path or not os.path.isfile(path):
        pytest.skip("clip-retrieval's clip_client.py is not here (install clip-retrieval or set CLIP_CLIENT_PY)")
    pytest.importorskip("requests")
    spec = importlib.util.spec_from_file_location("clip_client_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
