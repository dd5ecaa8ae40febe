"""The distributed dedup's tasks and work folder: the task type and the run parameters it carries, where each
task's shuffle file and commit marker live (OUTPUT/_dedup_work/STEP/NNNNNN.bin, then .done.json, written last),
the probe the distributors ask before a retry, and a map task's shard rows."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

from pipeline.core.config import Config
from pipeline.core.fsio import read_json
from pipeline.dedup import records as rc
from pipeline.dedup import shuffle

COMMITTED = "pipeline.dedup.work:committed"


@dataclass(frozen=True)
class Params:
    """What every task of one run needs besides the config; small, so it travels inside each task."""

    work: str  # the work folder on the output filesystem
    output: str
    n_shards: int
    n_groups: int  # map tasks: embed shards are handled `group` at a time
    group: int
    dim: int
    exact_parts: int
    kmeans_rate: float  # share of rows sampled for k-means
    tune_rate: float  # ... as spill-tuning queries
    recall_rate: float  # ... as recall queries
    k: int = 0  # clusters (known after the k-means)
    spill: int = 1  # clusters each row is compared in (known after tuning)
    max_spill: int = 8
    n_exact: int = 0  # exact tasks (their files feed decide)
    n_pairs: int = 0  # pairs tasks (likewise)


@dataclass(frozen=True)
class StepTask:
    """One task of one step. Map steps: shards (names) from ordinal lo. Range steps: partitions/clusters [lo, hi).
    Tiles: cluster lo, blocks bi and bj of `block` rows."""

    step: str
    index: int
    params: Params
    shards: tuple[str, ...] = ()
    lo: int = 0
    hi: int = 0
    block: int = 0
    bi: int = 0
    bj: int = 0
    members: int = 0  # tiles: the cluster's own rows (they come before its guests)
    tar: str = ""

    @property
    def name(self) -> str:
        return f"{self.step}-{self.index:06d}"


def data_path(work: str, step: str, index: int) -> str:
    return posixpath.join(work, step, f"{index:06d}.bin")


def marker_path(work: str, step: str, index: int) -> str:
    return posixpath.join(work, step, f"{index:06d}.done.json")


def step_files(p: Params, step: str, count: int) -> shuffle.Files:
    return shuffle.Files([data_path(p.work, step, i) for i in range(count)])


def driver_file(p: Params, name: str) -> str:
    """Files the driver writes for the tasks (centroids, queries, truth pairs)."""
    return posixpath.join(p.work, name)


def truth_pairs_file(p: Params) -> str:
    """The recall queries' true pairs (records.TRUTH_PAIR), written by the driver, read by pairs and decide tasks."""
    return driver_file(p, "truth_pairs.bin")


def committed(task: StepTask, cfg: Config) -> dict[str, Any] | None:
    """The probe: the stats a committed task's marker holds, or None."""
    return read_json(marker_path(task.params.work, task.step, task.index))  # type: ignore[no-any-return]


def shard_rows(task: StepTask, cfg: Config) -> list[tuple[int, rc.ShardRows]]:
    return [(task.lo + i, rc.ShardRows.read(cfg, s, task.lo + i)) for i, s in enumerate(task.shards)]
