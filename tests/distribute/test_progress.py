"""Progress in samples: the estimated total, rate and ETA, and the periodic log line when stderr is no terminal."""

from __future__ import annotations

import logging

import pytest

from pipeline.distribute.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_rate_estimated_total_and_eta() -> None:
    clock = Clock()
    p = Progress("embed", "shard", tasks=10, clock=clock)
    assert p.estimated_total() is None and p.eta_s() is None
    assert p.line() == "embed: 0 samples, 0.0/s; 0/10 shards done; ETA ?"
    clock.t += 10
    p.add(1000)
    p.finished(True, 1000)  # one shard of 1,000 samples in 10 s
    p.add(500)  # half of the next one
    assert p.rate() == 150.0
    assert p.estimated_total() == 10_000  # 1,000 done + 9 shards left at 1,000 each
    assert p.eta_s() == pytest.approx((10_000 - 1500) / 150)
    p.finished(False, 0)
    p.finished(True, 0)  # skipped as already committed: done, but no basis for the mean
    assert p.estimated_total() == 8_000 and p.done == 2 and p.failed == 1
    assert p.line() == "embed: 1,500 samples, 150.0/s; 2/10 shards done, 1 failed; ETA 0:00:43"
    p.close()


def test_without_a_terminal_one_log_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.distribute.progress")
    clock = Clock()
    p = Progress("embed", "shard", tasks=4, log_every_s=60, clock=clock)
    assert p.bar.disable  # pytest's stderr is not a terminal
    for _ in range(59):
        clock.t += 1
        p.add(10)
        p.show()
    assert caplog.records == []  # silent until the interval has passed
    clock.t += 1
    p.show()
    clock.t += 30
    p.show()
    assert [r.getMessage() for r in caplog.records] == ["embed: 590 samples, 9.8/s; 0/4 shards done; ETA ?"]
    p.close()
