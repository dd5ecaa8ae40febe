"""A job's progress in samples: a tqdm bar with samples/s and an ETA on a terminal, else one log line a minute."""

from __future__ import annotations

import logging
import time
from typing import Callable

from tqdm import tqdm

log = logging.getLogger(__name__)

LOG_EVERY_S = 60.0  # without a terminal: the interval of the one-line progress log


def _duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """Samples finished by this run (running attempts included) and tasks done or failed, with the rate and an ETA.

    The total is not known before the tasks are read, so it is estimated: the samples of the finished tasks plus, for
    each task not finished, the mean of the finished tasks that did work (a task skipped as committed does none).
    """

    def __init__(
        self,
        name: str,
        unit: str,
        tasks: int,
        log_every_s: float = LOG_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.name, self.unit, self.tasks = name, unit, tasks
        self.samples = 0
        self.done = self.failed = 0
        self.ran = self.ran_samples = 0  # finished tasks that did work, and their samples
        self.clock, self.log_every_s = clock, log_every_s
        self.start = self.logged = clock()
        self.bar = tqdm(
            total=None, desc=name, unit=" samples", unit_scale=True, dynamic_ncols=True, disable=None, leave=False
        )

    def add(self, samples: int) -> None:
        """Samples finished by a running attempt (negative when a failed attempt's samples are dropped)."""
        self.samples += samples

    def finished(self, ok: bool, samples: int) -> None:
        """A task's final outcome; `samples` is what its successful attempt did (0 when skipped as committed)."""
        if not ok:
            self.failed += 1
            return
        self.done += 1
        if samples > 0:
            self.ran += 1
            self.ran_samples += samples

    def rate(self) -> float:
        return self.samples / max(self.clock() - self.start, 1e-9)

    def estimated_total(self) -> int | None:
        if not self.ran:
            return None
        left = self.tasks - self.done - self.failed
        return max(self.samples, round(self.ran_samples + left * self.ran_samples / self.ran))

    def eta_s(self) -> float | None:
        total, rate = self.estimated_total(), self.rate()
        return (total - self.samples) / rate if total is not None and rate > 0 else None

    def line(self) -> str:
        eta = self.eta_s()
        failed = f", {self.failed} failed" if self.failed else ""
        return (
            f"{self.name}: {self.samples:,} samples, {self.rate():.1f}/s; {self.done}/{self.tasks} {self.unit}s done"
            f"{failed}; ETA {_duration(eta) if eta is not None else '?'}"
        )

    def show(self) -> None:
        """Refresh the bar, or without a terminal write the log line when LOG_EVERY_S has passed."""
        if not self.bar.disable:
            self.bar.total = self.estimated_total()
            self.bar.n = self.samples
            failed = f", {self.failed} failed" if self.failed else ""
            self.bar.set_postfix_str(f"{self.done}/{self.tasks} {self.unit}s{failed}", refresh=False)
            self.bar.refresh()
        elif self.clock() - self.logged >= self.log_every_s:
            self.logged = self.clock()
            log.info("%s", self.line())

    def close(self) -> None:
        self.bar.close()
