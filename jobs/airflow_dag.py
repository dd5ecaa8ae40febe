"""Example Airflow DAG: one `clipline run --stage S` task per chain stage, then a report, on a schedule, with retries.

Copy it into Airflow's dags folder and set CLIPLINE_CONFIG (a conf/dataset/*.yaml), CLIPLINE_OUTPUT (the `output:` of
that config) and CLIPLINE_BIN (the clipline executable of the venv it is installed in). Each stage is idempotent: a
retried or re-scheduled task skips what is committed and does only the rest (see docs/SCHEDULING.md). Exit codes: 0
done; 1 the stage failed (retry helps: failed shards are redone); 2 refused before any work (bad config, a changed URL
list, or another run holds the output's lock: retrying later helps only in the last case).

Works with Airflow 2.4+ and 3; importing it without Airflow installed defines nothing. tests/run/test_chain.py imports
it with a stand-in Airflow and checks the tasks, their commands and their order.
"""

from __future__ import annotations

import datetime as dt
import os
import shlex

CONFIG = os.environ.get("CLIPLINE_CONFIG", "/opt/clipline/conf/dataset/example.yaml")
OUTPUT = os.environ.get("CLIPLINE_OUTPUT", "/data/example/clipline")
CLIPLINE = os.environ.get("CLIPLINE_BIN", "/opt/clipline/.venv/bin/clipline")
STAGES = ("download", "embed", "index", "dedup")
# Per stage: retries and the longest a single attempt may take. Downloads meet flaky servers, so they get more.
RETRIES = {"download": 3, "embed": 2, "index": 2, "dedup": 2}
TIMEOUT_HOURS = {"download": 24, "embed": 24, "index": 12, "dedup": 12}

try:  # Airflow 3
    from airflow.providers.standard.operators.bash import BashOperator
    from airflow.sdk import DAG
except ImportError:
    try:  # Airflow 2
        from airflow import DAG
        from airflow.operators.bash import BashOperator
    except ImportError:  # not running under Airflow
        DAG = None


def stage_command(stage: str) -> str:
    return f"{shlex.quote(CLIPLINE)} run --config {shlex.quote(CONFIG)} --stage {stage}"


def report_command() -> str:
    return f"{shlex.quote(CLIPLINE)} report {shlex.quote(OUTPUT)}"


if DAG is not None:
    with DAG(
        dag_id="clipline_example",
        schedule="@daily",
        start_date=dt.datetime(2026, 1, 1),
        catchup=False,
        max_active_runs=1,  # two runs on one output would only meet the lock (exit 2)
        default_args={"retry_delay": dt.timedelta(minutes=15), "retry_exponential_backoff": True},
        tags=["clipline"],
    ) as dag:
        tasks = [
            BashOperator(
                task_id=stage,
                bash_command=stage_command(stage),
                retries=RETRIES[stage],
                execution_timeout=dt.timedelta(hours=TIMEOUT_HOURS[stage]),
            )
            for stage in STAGES
        ]
        # The report also documents failed runs (it says which stages are missing), so it runs whatever happened.
        report = BashOperator(task_id="report", bash_command=report_command(), retries=1, trigger_rule="all_done")
        for upstream, downstream in zip(tasks, tasks[1:] + [report]):
            upstream >> downstream
