"""Response bodies while they arrive: small ones in a bytearray, big ones in a map under the per-process budget."""

from __future__ import annotations

import os
import threading
import time

import pytest

from pipeline.web import bodies
from pipeline.web.bodies import BUDGET, SLACK, SMALL, Body


def _fill(body: Body, data: bytes) -> None:
    for i in range(0, len(data), SLACK):
        body.add(data[i : i + SLACK])


def test_small_and_big_bodies_read_back_whole() -> None:
    for size, expected in ((1000, None), (SMALL, SMALL), (3 * SMALL + 5, None), (3 * SMALL + 5, 3 * SMALL + 5)):
        data = os.urandom(size)
        with Body(expected, 8 * SMALL, time.monotonic() + 5) as body:
            _fill(body, data)
            assert body.take() == data
            assert (body.mm is None) == (size <= SMALL)
            if body.mm is not None:  # the map is sized for the announced length, or the cap
                assert len(body.mm) == (expected or 8 * SMALL) + SLACK and BUDGET.used == len(body.mm)
        assert BUDGET.used == 0


def test_a_body_cannot_overrun_its_map() -> None:
    with Body(2 * SMALL, 8 * SMALL, time.monotonic() + 5) as body:
        with pytest.raises(ValueError, match="overruns"):
            _fill(body, b"x" * (2 * SMALL + 2 * SLACK))
    assert BUDGET.used == 0


def test_the_budget_holds_two_caps_and_waits_for_room() -> None:
    """Two capped bodies fit; a third waits until one ends, or fails at its deadline; a lone body always fits."""
    cap = 4 * SMALL
    first, second = Body(None, cap, time.monotonic() + 5), Body(None, cap, time.monotonic() + 5)
    for b in (first, second):
        b.__enter__()
        _fill(b, b"x" * (SMALL + 1))
    assert BUDGET.used == 2 * (cap + SLACK)
    with Body(None, cap, time.monotonic() + 0.2) as late:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            _fill(late, b"x" * (SMALL + 1))
        assert time.monotonic() - t0 >= 0.2
    got: list[float] = []

    def third() -> None:
        with Body(None, cap, time.monotonic() + 10) as b:
            _fill(b, b"x" * (SMALL + 1))
            got.append(time.monotonic())

    t = threading.Thread(target=third)
    t.start()
    time.sleep(0.2)
    assert got == []  # still waiting for room
    released = time.monotonic()
    first.__exit__(None, None, None)
    t.join(5)
    assert got and got[0] >= released
    second.__exit__(None, None, None)
    assert BUDGET.used == 0
    with Body(None, 100 * SMALL, time.monotonic() + 1) as huge:  # bigger than any limit, alone: it fits
        _fill(huge, b"x" * (SMALL + 1))
    assert BUDGET.used == 0 and bodies.BUDGET is BUDGET
