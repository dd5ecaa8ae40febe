"""One served name's pure parts: clip back's deduplicate as connected components, and the sample id space of an
image and a text index (the HTTP end to end is in test_serve.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa

from pipeline.query.served import near_duplicates, text_sample_ids
from tests.support.foreign import near_copy
from tests.support.helpers import random_unit


def test_near_duplicates_are_connected_components() -> None:
    a = random_unit(1, 32, 0)[0]
    b = near_copy(a, 0.96, 1)
    c = near_copy(b, 0.96, 2)  # near b, not near a: dropped with b, as clip back's components drop it
    d = random_unit(1, 32, 3)[0]
    x = np.stack([a, d, b, c])
    assert float(a @ c) < 0.94
    assert near_duplicates(x).tolist() == [False, False, True, True]
    many = np.repeat(x[:1], 700, axis=0)  # more rows than one block of comparisons
    assert near_duplicates(many, block=256).tolist() == [False] + [True] * 699


def _ids(rows: list[tuple[str, int]]) -> SimpleNamespace:
    """What text_sample_ids reads of a Searcher: its id map and its index's size."""
    table = pa.table(
        {
            "id": pa.array(range(len(rows)), pa.int64()),
            "shard": [s for s, _ in rows],
            "row": pa.array([r for _, r in rows], pa.int32()),
        }
    )
    return SimpleNamespace(ids=table, index=SimpleNamespace(ntotal=len(rows)))


def test_text_ids_become_the_samples_image_ids() -> None:
    image = _ids([("a", 0), ("a", 2), ("b", 0)])
    text = _ids([("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)])  # a/1 and b/1: no image vector
    assert text_sample_ids(image, text, 3).tolist() == [0, 3 + 1, 1, 2, 3 + 4]  # type: ignore[arg-type]
    assert text_sample_ids(None, text, 0).tolist() == [0, 1, 2, 3, 4]  # type: ignore[arg-type]
