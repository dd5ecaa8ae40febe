"""The whole chain on an S3 API (moto's server on 127.0.0.1), configured only through clipline's `storage` section:
download to s3://, embed killed with SIGKILL and resumed to the output of an uninterrupted local run, index, dedup,
query and report on the same URLs, embed on Spark; and a planted secret appears in no file and no log.

The commands run as subprocesses with an environment that names no endpoint and no credentials (no AWS_*, no
FSSPEC_*), so each process (the CLI, the local pool's workers, img2dataset's workers and logger, Spark's executors)
reaches the server only if the storage section reached it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli.main import main
from pipeline.run.httpserver import serve_directory
from tests.support import s3
from tests.support.helpers import jpeg_bytes, overrides

moto_endpoint = s3.moto_endpoint  # the server alone, configured nowhere

pytestmark = pytest.mark.slow

N_URLS, PER_SHARD = 48, 12  # four shards: one img2dataset worker (it restarts them every 5 shards)
SECRET_VAR = "CLIPLINE_TEST_S3_SECRET"
PLANTED_SECRET = "PlantedSecret-7f3a9c1e"  # moto accepts any credentials
PLANTED_KEY = "PLANTEDKEYID4b8d2"  # a literal access key id in the config: redacted, never written
BUCKET = "chain"


def _storage_args(endpoint: str) -> list[str]:
    return [
        f"storage.s3.endpoint_url={endpoint}",
        f"storage.s3.key={PLANTED_KEY}",
        f"storage.s3.secret=${{ENV:{SECRET_VAR}}}",
        "storage.s3.client_kwargs.region_name=us-east-1",
    ]


def _clean_env() -> dict[str, str]:
    """This environment without any S3 endpoint or credentials, with the secret under its own name only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_"))}
    env.update({SECRET_VAR: PLANTED_SECRET, "PYTHONUNBUFFERED": "1", "AWS_CONFIG_FILE": os.devnull})
    env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    return env


def _clipline(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def _bucket_fs(endpoint: str) -> Any:
    import s3fs

    # client_kwargs, not endpoint_url: it replaces whatever another test's session fixture left in fsspec's config
    return s3fs.S3FileSystem(
        client_kwargs={"endpoint_url": endpoint},
        key="testing",
        secret="testing",
        skip_instance_cache=True,
        use_listings_cache=False,
    )


def _make_site(root: Path) -> list[str]:
    root.mkdir(parents=True)
    names = [f"img_{i:04d}.jpg" for i in range(N_URLS)]
    for i, name in enumerate(names):
        s = i % 40  # images i and i + 40 are the same bytes
        (root / name).write_bytes(jpeg_bytes(s, size=(40 + s % 7, 32 + s % 5)))
    return names


@pytest.fixture(scope="module")
def chain(
    moto_endpoint: str, tiny_model: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """download -> embed (killed, resumed) -> index -> dedup -> query -> report, each a `clipline` process."""
    tmp = tmp_path_factory.mktemp("s3chain")
    fs = _bucket_fs(moto_endpoint)
    fs.mkdir(BUCKET)
    root = f"s3://{BUCKET}/run"
    env, storage = _clean_env(), _storage_args(moto_endpoint)
    logs: list[str] = []
    seconds: dict[str, float] = {}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        t0 = time.monotonic()
        r = subprocess.run(_clipline(*args, *storage), env=env, capture_output=True, text=True, timeout=300)
        seconds[args[0]] = seconds.get(args[0], 0.0) + time.monotonic() - t0
        logs.extend([r.stdout, r.stderr])
        assert r.returncode == 0, f"clipline {args[0]}: {r.stderr[-3000:]}"
        return r

    def run_here(*args: str) -> subprocess.CompletedProcess[str]:
        """In this process (saves a torch import per command), with what the subprocesses lack removed here too: no
        S3 endpoint in fsspec's config (tests/support/s3.py's s3_server sets one for the session), no credentials."""
        t0 = time.monotonic()
        out, err = io.StringIO(), io.StringIO()
        with pytest.MonkeyPatch.context() as mp:
            mp.delitem(fsspec.config.conf, "s3", raising=False)
            for k in [k for k in os.environ if k.startswith(("AWS_", "FSSPEC_"))]:
                mp.delenv(k)
            mp.setenv(SECRET_VAR, PLANTED_SECRET)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main([*args, *storage])
        seconds[args[0]] = seconds.get(args[0], 0.0) + time.monotonic() - t0
        logs.extend([out.getvalue(), err.getvalue()])
        assert code == 0, f"clipline {args[0]}: {err.getvalue()[-3000:]}"
        return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())

    names = _make_site(tmp / "site")
    with serve_directory(tmp / "site") as base:
        url_list = tmp / "urls.parquet"
        pq.write_table(pa.table({"url": [f"{base}/{n}" for n in names], "caption": names}), url_list)
        run(
            "download",
            f"input={url_list}",
            f"output={root}/shards",
            "download.processes_count=1",
            "download.thread_count=8",
            f"download.number_sample_per_shard={PER_SHARD}",
            "download.timeout=5",
            "download.allow_private_addresses=true",
        )

    model = overrides(tiny_model)
    embed_args = [f"input={root}/shards", "embed.batch_size=2", "local.processes=1", *model]
    killed = subprocess.Popen(
        _clipline("embed", *embed_args, f"output={root}/embeddings", *storage),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    stats_dir = f"{BUCKET}/run/embeddings/stats"
    while time.monotonic() < deadline and killed.poll() is None:
        if fs.exists(stats_dir) and any(p.endswith(".json") for p in fs.ls(stats_dir, refresh=True)):
            break
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)  # the CLI and its pool worker at once, mid-job
    logs.append(killed.communicate()[0])
    at_kill = sorted(p for p in fs.ls(stats_dir, refresh=True) if p.endswith(".json"))
    resumed = run("embed", *embed_args, f"output={root}/embeddings")

    # The uninterrupted local run: the same shards copied to disk, embedded into a local folder.
    fs.get(f"{BUCKET}/run/shards/", str(tmp / "shards"), recursive=True)
    assert main(["embed", f"input={tmp / 'shards'}", f"output={tmp / 'local'}", *embed_args[1:]]) == 0

    run_here("index", f"input={root}/embeddings", "index.recall_queries=10", "index.nb_cores=1")
    run_here("dedup", f"input={root}/embeddings", "dedup.mode=exact", "dedup.threshold=1.0")
    query = run_here("query", f"input={root}/embeddings/index", "--text", names[3], "-k", "3", "--format", "jsonl")
    report = run_here("report", root, "--query", names[5])
    yield {
        "fs": fs,
        "root": root,
        "tmp": tmp,
        "env": env,
        "storage": storage,
        "model": model,
        "logs": logs,
        "at_kill": at_kill,
        "resumed": resumed,
        "query": query,
        "report": report,
    }
    print("seconds per command:", {k: round(v, 1) for k, v in seconds.items()})


def _same_embeddings(fs: Any, remote: str, local: Path) -> None:
    for sub, ext in (("img_emb", "npy"), ("text_emb", "npy"), ("metadata", "parquet")):
        names = sorted(Path(p).name for p in fs.ls(f"{remote}/{sub}", refresh=True))
        assert names == sorted(p.name for p in (local / sub).iterdir()), sub
        for name in names:
            data = fs.cat_file(f"{remote}/{sub}/{name}")
            if ext == "npy":
                assert data == (local / sub / name).read_bytes(), name
            else:
                got = pq.read_table(pa.BufferReader(data)).to_pandas()
                pd.testing.assert_frame_equal(got, pq.read_table(local / sub / name).to_pandas())


def test_download_to_s3_writes_every_shard(chain: dict[str, Any]) -> None:
    fs = chain["fs"]
    tars = sorted(p for p in fs.ls(f"{BUCKET}/run/shards", refresh=True) if p.endswith(".tar"))
    assert len(tars) == N_URLS // PER_SHARD
    record = json.loads(fs.cat_file(f"{BUCKET}/run/shards/_clipline/run.json"))
    assert record["exit_status"] == 0 and record["summary"]["images_written"] == N_URLS


def test_embed_killed_on_s3_resumes_to_the_local_runs_output(chain: dict[str, Any]) -> None:
    assert 1 <= len(chain["at_kill"]) < N_URLS // PER_SHARD, "the kill must land mid-job"
    assert f"shards_skipped: {len(chain['at_kill'])}" in chain["resumed"].stdout
    _same_embeddings(chain["fs"], f"{BUCKET}/run/embeddings", chain["tmp"] / "local")
    leftovers = [p for p in chain["fs"].find(f"{BUCKET}/run/embeddings") if ".tmp-" in p]
    assert leftovers == []


def test_index_dedup_query_and_report_on_s3(chain: dict[str, Any]) -> None:
    fs = chain["fs"]
    ids = pq.read_table(pa.BufferReader(fs.cat_file(f"{BUCKET}/run/embeddings/index/image_ids.parquet")))
    assert ids.num_rows == N_URLS
    drop = pq.read_table(pa.BufferReader(fs.cat_file(f"{BUCKET}/run/embeddings/dedup/drop.parquet")))
    reasons = drop.column("reason").to_pylist()
    assert reasons.count("exact") == N_URLS - 40  # images i and i + 40 are the same bytes
    hits = [json.loads(line) for line in chain["query"].stdout.splitlines() if line.startswith("{")]
    assert len(hits) == 3 and all(h["url"] for h in hits)
    assert fs.exists(f"{BUCKET}/run/report.html")
    assert "report.html" in chain["report"].stdout


def test_planted_secret_is_in_no_file_and_no_log(chain: dict[str, Any]) -> None:
    fs, tmp = chain["fs"], chain["tmp"]
    written = {f"s3://{p}": fs.cat_file(p) for p in fs.find(BUCKET)}
    written.update({str(p): p.read_bytes() for p in tmp.rglob("*") if p.is_file()})
    assert len(written) > 50 and any(k.endswith("run.json") for k in written)
    for planted in (PLANTED_SECRET, PLANTED_KEY):
        assert [k for k, v in written.items() if planted.encode() in v] == []
        assert [i for i, text in enumerate(chain["logs"]) if planted in text] == []
    # the record says how the secret was given, and that a literal one was there
    record = json.loads(written[f"s3://{BUCKET}/run/embeddings/run.json"])
    assert record["config"]["storage"]["s3"]["secret"] == f"${{ENV:{SECRET_VAR}}}"
    assert record["config"]["storage"]["s3"]["key"] == "***"
    assert "storage.s3.key=***" in record["argv"]


@pytest.mark.spark
def test_embed_on_spark_reads_and_writes_s3_through_the_storage_section(chain: dict[str, Any]) -> None:
    fs, tmp = chain["fs"], chain["tmp"]
    config = tmp / "spark.yaml"
    # a secret in a Spark conf entry and the storage section in YAML: both kept out of every file and log
    config.write_text(
        json.dumps({"spark": {"conf": {"spark.ui.enabled": "false", "spark.hadoop.fs.s3a.secret.key": PLANTED_SECRET}}})
    )
    args = _clipline(
        "embed",
        "--config",
        str(config),
        f"input={chain['root']}/shards",
        f"output={chain['root']}/spark",
        "distributor=spark",
        "spark.master=local[2]",
        "embed.batch_size=2",
        *chain["model"],
        *chain["storage"],
    )
    r = subprocess.run(args, env=chain["env"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _same_embeddings(fs, f"{BUCKET}/run/spark", tmp / "local")
    record = fs.cat_file(f"{BUCKET}/run/spark/run.json")
    assert json.loads(record)["config"]["spark"]["conf"]["spark.hadoop.fs.s3a.secret.key"] == "***"
    for text in (r.stdout, r.stderr, record.decode()):
        assert PLANTED_SECRET not in text and PLANTED_KEY not in text
