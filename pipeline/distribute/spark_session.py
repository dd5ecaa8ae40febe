"""Spark sessions for clipline: reuse the active one (never stopped here), else build one from `cfg.spark` and stop
only that one. Used by the Spark distributor, the download stage (img2dataset's pyspark mode) and the index stage
(autofaiss's distributed build)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Iterator

from pipeline.core.config import Config

if TYPE_CHECKING:
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

_OWNED: dict[str, Any] = {}  # the SparkContext get_session created, if any: the only one stop_session stops


def get_session(cfg: Config) -> SparkSession:
    """The active session if there is one (never stopped here), else a new one built from `cfg.spark`."""
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is None and SparkContext._active_spark_context is not None:
        active = SparkSession.builder.getOrCreate()  # made in another thread: the active session is per thread
    if active is not None:
        master = session_context(active).master
        if cfg.spark.master and cfg.spark.master != master:
            log.warning("spark.master=%s ignored: reusing the active session (master %s)", cfg.spark.master, master)
        return active
    builder = SparkSession.builder.appName(cfg.spark.app_name)
    if cfg.spark.master:  # None: spark-submit's --master, or Spark's own default
        builder = builder.master(cfg.spark.master)
    # Worker reuse: one model load per executor Python process. The console bar would fight clipline's own.
    conf = {"spark.python.worker.reuse": "true", "spark.ui.showConsoleProgress": "false"}
    # Without a master and outside spark-submit (no gateway handed over), Spark defaults to local[*].
    master = cfg.spark.master or ("local[*]" if "PYSPARK_GATEWAY_PORT" not in os.environ else "")
    if master.startswith("local") and "PYSPARK_PYTHON" not in os.environ:
        # Local executors should run this interpreter, not `python3` on PATH; PySpark reads only the variable.
        os.environ["PYSPARK_PYTHON"] = sys.executable
    conf.update(cfg.spark.conf)
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    _OWNED["context"] = spark.sparkContext
    log.info("started Spark session (master %s)", spark.sparkContext.master)
    return spark


def stop_session(spark: SparkSession) -> bool:
    """Stop `spark` if get_session created it; returns whether it was stopped (others' sessions are kept)."""
    owned = _OWNED.get("context")
    if owned is None or session_context(spark) is not owned:
        return False
    _OWNED.pop("context")
    spark.stop()
    return True


@contextlib.contextmanager
def spark_session(cfg: Config) -> Iterator[SparkSession]:
    """get_session for the length of a block, with the storage section's options for its executors
    (core/storage.py: spark_environment); stops the session on exit only if the block created it."""
    from pipeline.core.storage import spark_environment

    owned_before = _OWNED.get("context")
    spark = get_session(cfg)
    created = _OWNED.get("context") is not owned_before
    try:
        # The storage options reach every Python worker of tasks defined meanwhile, whoever defines them
        with spark_environment(session_context(spark), cfg.storage):
            yield spark
    finally:
        if created:
            stop_session(spark)


def session_context(spark: SparkSession) -> SparkContext:
    """The session's SparkContext; a clear error for Spark Connect sessions, which have none."""
    try:
        return spark.sparkContext
    except Exception as e:  # Spark Connect sessions (Databricks serverless / shared access mode) have no RDDs
        raise RuntimeError(
            "distributor=spark needs a classic Spark session with the RDD API; Spark Connect sessions "
            "(Databricks serverless or shared access mode) are not supported: use a single-user cluster"
        ) from e


def check_reuse(sc: SparkContext) -> None:
    if sc.getConf().get("spark.python.worker.reuse", "true").lower() != "true":
        log.warning("spark.python.worker.reuse is false: the model is reloaded for every Spark task")
