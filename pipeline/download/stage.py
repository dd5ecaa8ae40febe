"""`clipline download`: validate a URL list, run img2dataset into WebDataset shards, account for every URL."""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import posixpath
import signal
import sys
import threading
import time
from collections.abc import Iterator
from multiprocessing.pool import ThreadPool
from typing import Any

import fsspec

from pipeline.core.config import Config
from pipeline.core.errors import ConfigError, JobFailed
from pipeline.download import layout
from pipeline.download.urllist import FORMATS, InputPlan, format_of, plan_input  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

LEGACY_ASIDE = ".clipline_aside"  # where versions before the run record moved to _clipline/ set run.json aside


def expected_shards(rows_per_file: list[int], per_shard: int) -> dict[int, int]:
    """Shard id -> URL count, numbered as img2dataset's reader numbers them (consecutively across files)."""
    out: dict[int, int] = {}
    start = 0
    for n in rows_per_file:
        n_shards = math.ceil(n / per_shard)
        for i in range(n_shards):
            out[start + i] = min(per_shard, n - i * per_shard)
        start += n_shards
    return out


def _repair_after_kill(fs: Any, root: str) -> None:
    """Undo what a killed run can leave: torn stats files (img2dataset writes them in place); and move an earlier
    version's run record out of img2dataset's way."""
    if not fs.exists(root):
        return
    _move_legacy_record(fs, root)
    for sid, shard in layout.completed(fs, root).items():
        try:
            layout.read_stats(fs, shard)
        except ValueError:
            log.warning("shard %05d: torn stats file from an interrupted run; the shard will be redone", sid)
            for q in (shard.stats, shard.tar, shard.urls):
                if fs.exists(q):
                    fs.rm(q)


def _move_legacy_record(fs: Any, root: str) -> None:
    """Earlier versions kept the download run.json beside the shards (and in .clipline_aside/ while img2dataset ran),
    where img2dataset takes it for a stats file: move it to where the record lives now (runinfo.record_path)."""
    from pipeline.core.runinfo import RUN_JSON, record_path

    dest = record_path(root, "download")
    for old in (posixpath.join(root, LEGACY_ASIDE, RUN_JSON), posixpath.join(root, RUN_JSON)):
        if fs.exists(old):
            fs.makedirs(posixpath.dirname(dest), exist_ok=True)
            fs.mv(old, dest)
    aside = posixpath.join(root, LEGACY_ASIDE)
    if fs.exists(aside):
        for p in fs.ls(aside, detail=False):  # anything else set aside by an earlier version goes back
            if not fs.exists(posixpath.join(root, posixpath.basename(p))):
                fs.mv(p, posixpath.join(root, posixpath.basename(p)))
        fs.rm(aside, recursive=True)


def _check_no_foreign_json(fs: Any, root: str) -> None:
    """img2dataset's incremental mode takes every OUTPUT/*.json for a shard's stats file and parses its name as a
    shard number: refuse, before any work, a folder where that would crash."""
    foreign = sorted(
        posixpath.basename(p)
        for p in fs.glob(root.rstrip("/") + "/*.json")
        if not layout.STATS_RE.match(posixpath.basename(p))
    )
    if foreign:
        raise ConfigError(
            f"output: {root} holds {', '.join(foreign[:3])}, which img2dataset would take for a shard's stats file "
            "(it reads every *.json of its output folder); move it out of the download output"
        )


def _log_prints(read_fd: int) -> None:
    """One log record per line img2dataset printed: its running totals (one line per finished shard) at INFO, the
    rest (banners, per-worker lines) at DEBUG, like other libraries' chatter (pipeline/core/logs.py)."""
    with os.fdopen(read_fd, "r", errors="replace") as lines:
        for line in lines:
            text = line.rstrip()
            if text:
                log.log(logging.INFO if text.startswith("total") else logging.DEBUG, "img2dataset: %s", text)


@contextlib.contextmanager
def _prints_to_log() -> Iterator[None]:
    """img2dataset and its spawned workers print progress on stdout, which is reserved for the summary: file
    descriptor 1 (inherited by the workers) goes to a pipe whose lines become log records on stderr."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real stdout (embedded interpreter): nothing to protect
        yield
        return
    read_fd, write_fd = os.pipe()
    # A daemon: a worker img2dataset leaves behind keeps the pipe open, and must not hold the command's exit.
    reader = threading.Thread(target=_log_prints, args=(read_fd,), name="img2dataset-prints", daemon=True)
    reader.start()
    pipe = os.fdopen(write_fd, "w", buffering=1, errors="replace")
    try:
        os.dup2(write_fd, 1)  # for the workers, which inherit descriptor 1
        with contextlib.redirect_stdout(pipe):  # for this process, whatever sys.stdout is (a test may capture it)
            yield
    finally:
        pipe.close()
        os.dup2(saved, 1)  # the last of this process's ends of the pipe: the reader ends when the workers' do
        os.close(saved)
        reader.join(timeout=5)


def img2dataset_kwargs(cfg: Config, plan: InputPlan) -> dict[str, Any]:
    """The keyword arguments of img2dataset.download() for this config."""
    dl = cfg.download
    return dict(
        url_list=plan.url_list,
        output_folder=cfg.output,
        input_format=plan.input_format,
        url_col=dl.url_col,
        caption_col=plan.caption_col,
        save_additional_columns=list(dl.save_additional_columns) or None,
        image_size=dl.image_size,
        resize_mode=dl.resize_mode,
        resize_only_if_bigger=dl.resize_only_if_bigger,
        encode_format=dl.encode_format,
        encode_quality=dl.encode_quality,
        output_format=dl.output_format,
        processes_count=dl.processes_count,
        thread_count=dl.thread_count,
        number_sample_per_shard=dl.number_sample_per_shard,
        retries=dl.retries,
        timeout=dl.timeout,
        min_image_size=dl.min_image_size,
        max_aspect_ratio=float("inf") if dl.max_aspect_ratio is None else dl.max_aspect_ratio,
        incremental_mode="incremental" if dl.incremental else "overwrite",
        user_agent_token=dl.user_agent_token,
        enable_wandb=False,
        compute_hash="sha256",
        distributor="pyspark" if cfg.distributor == "spark" else "multiprocessing",
    )


def _run_img2dataset(cfg: Config, kwargs: dict[str, Any]) -> None:
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"  # before the import: albumentations phones home otherwise
    os.environ["WANDB_MODE"] = "disabled"
    import img2dataset
    from img2dataset.logger import LoggerProcess

    from pipeline.download.fetcher import safe_fetch_engine, settings_for

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if in_main else None
    try:
        with contextlib.ExitStack() as stack:
            if cfg.distributor == "spark":
                from pipeline.distribute.spark_session import spark_session

                # img2dataset's pyspark distributor runs on the active session; stopped after only if made here.
                stack.enter_context(spark_session(cfg))
            stack.enter_context(_prints_to_log())
            stack.enter_context(safe_fetch_engine(settings_for(cfg.download)))  # img2dataset's fetch step replaced
            img2dataset.download(**kwargs)
    except SystemExit as e:
        # img2dataset's SIGINT handler calls sys.exit(0): an interrupted job must not look successful.
        raise KeyboardInterrupt from e
    except Exception as e:
        raise JobFailed(f"img2dataset failed: {type(e).__name__}: {e}") from e
    finally:
        if in_main and previous is not None:
            signal.signal(signal.SIGINT, previous)
        # After an exception img2dataset never stops its logger process, which would hang interpreter exit.
        import multiprocessing

        for child in multiprocessing.active_children():
            if isinstance(child, LoggerProcess):
                child.terminate()
                child.join(timeout=5)


def _check_done_shards(fs: Any, root: str, expected: dict[int, int], done: set[int]) -> None:
    """Completed shards must match the plan; otherwise incremental mode would skip the wrong URLs."""
    stats = layout.completed(fs, root)
    for s in sorted(done & set(expected)):
        count = int(layout.read_stats(fs, stats[s]).get("count", -1))
        if count != expected[s]:
            raise ConfigError(
                f"download.number_sample_per_shard: shard {s} in {root} holds {count} URLs but this URL list and "
                f"shard size give it {expected[s]}; the input or shard size changed since it was written. "
                "Use a new output folder or download.incremental=false (which deletes the old shards)"
            )


def summarize(
    fs: Any, root: str, plan: InputPlan, expected: dict[int, int], before: set[int], seconds: float
) -> dict[str, Any]:
    """Build the job summary from img2dataset's per-shard parquet and stats files."""
    shards = layout.completed(fs, root)
    done = sorted(set(shards) & set(expected))
    with ThreadPool(min(16, max(1, len(done)))) as pool:  # remote filesystems: overlap the round trips
        counts = pool.map(lambda s: layout.url_outcomes(fs, shards[s]), done)
    written = 0
    reasons: collections.Counter[str] = collections.Counter()
    for ok, r in counts:
        written += ok
        reasons.update(r)
    new = [s for s in done if s not in before]
    urls_this_run = 0
    for s in new:
        urls_this_run += int(layout.read_stats(fs, shards[s]).get("count", 0))
    failed = sum(reasons.values())
    summary: dict[str, Any] = {
        "urls_in": plan.urls_in,
        "images_written": written,
        "failed": failed,
        "failures_by_reason": dict(reasons.most_common()),
        "shards": len(done),
        "shards_written": len(new),
        "shards_skipped": len(done) - len(new),
        "shards_failed": len(expected) - len(done),
        "unaccounted": plan.urls_in - written - failed,
        "seconds": round(seconds, 2),
        "urls_per_second": round(urls_this_run / seconds, 1) if seconds > 0 else None,
        "output": root,
    }
    if summary["unaccounted"]:
        log.error(
            "%d of %d URLs are in no shard's parquet (neither success nor failure)",
            summary["unaccounted"],
            plan.urls_in,
        )
    return summary


def download(cfg: Config) -> dict[str, Any]:
    """Download cfg.input (a URL list) into WebDataset shards in cfg.output; returns the job summary."""
    plan = plan_input(cfg)
    assert cfg.output is not None
    dl = cfg.download
    expected = expected_shards(plan.rows_per_file, dl.number_sample_per_shard)
    fs, root = fsspec.core.url_to_fs(cfg.output)
    _repair_after_kill(fs, root)
    before = set(layout.completed(fs, root)) if dl.incremental else set()
    log.info(
        "%d URLs from %s -> %d shards in %s (%d already done)",
        plan.urls_in,
        plan.url_list,
        len(expected),
        cfg.output,
        len(before & set(expected)),
    )
    _check_done_shards(fs, root, expected, before)
    t0 = time.perf_counter()
    if expected and set(expected) <= before:
        log.info("every shard is already done; nothing to download")
        tmp = root.rstrip("/") + "/_tmp"
        if fs.exists(tmp):  # img2dataset's work folder, left when a run was killed after its last shard
            fs.rm(tmp, recursive=True)
    elif expected:
        if dl.incremental and fs.exists(root):  # overwrite mode deletes the folder first
            _check_no_foreign_json(fs, root)
        _run_img2dataset(cfg, img2dataset_kwargs(cfg, plan))
    seconds = time.perf_counter() - t0
    summary = summarize(fs, root, plan, expected, before, seconds)
    if summary["shards"] == 0:
        raise JobFailed(f"no shard was written to {cfg.output}", summary)
    if summary["shards_failed"]:
        raise JobFailed(
            f"{summary['shards_failed']} shard(s) failed after img2dataset's retries; "
            "re-run the same command to retry them",
            summary,
        )
    return summary
