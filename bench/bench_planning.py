"""Seconds and storage requests per shard of embed planning, a no-op resume and one progress poll, at 100 to 20,000
committed shards, on local disk and on the S3 API (moto's server on 127.0.0.1).

Usage: python bench/bench_planning.py [--sizes 100,1000,20000] [--backends local,s3]

The data is what these steps read and nothing more (tests/support/committed.py, shared with the tests): empty tars
with img2dataset's stats markers beside them, and an embed output where every shard is committed (a stats marker
each, the manifest). Each step starts cold (no cached filesystem instance or listing, as a new process would):
- planning: `embed.stage.plan` on the brace pattern `in/{00000..N-1}.tar`, and on the folder `in/`;
- no-op resume: the embed stage on the brace pattern with everything committed (plans, checks the manifest, sweeps
  leftovers, lists the commit markers, runs nothing);
- poll: one progress poll of the Spark driver (records from its accumulator, in driver memory) over N finished tasks.
Requests are counted as an object store bills them (LIST, HEAD, GET, PUT, COPY, DELETE): on local disk by the
counting filesystem `countfile://` (tests/support/countfs.py), on S3 by the proxy every request passes through
(tests/support/s3proxy.py). A listing page holds up to 1,000 keys on S3, so LIST grows by one per 1,000 shards.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.committed import committed_files, measured_steps, write_committed  # noqa: E402  (shared with tests)

KINDS = ("LIST", "HEAD", "GET", "PUT", "COPY", "DELETE")


class LocalCounter:
    """Requests on local disk through `countfile://`, counted in this process."""

    name = "local"

    def __init__(self, root: Path):
        from tests.support.countfs import CountingFileSystem

        self.fs_cls, self.root = CountingFileSystem, root

    def url(self, rel: str) -> str:
        return f"countfile://{self.root}/{rel}"

    def reset(self) -> None:
        self.fs_cls.calls.clear()

    def counts(self) -> Counter[str]:
        return Counter({k: self.fs_cls.calls[k] for k in KINDS})

    def write(self, input_url: str, output_url: str, n: int, manifest: dict[str, Any]) -> None:
        write_committed(input_url, output_url, n, manifest)

    def cold(self) -> None:
        pass  # the local filesystem caches no listing

    def stop(self) -> None:
        pass


class S3Counter:
    """Requests on moto's S3 server, counted by the proxy in front of it."""

    name = "s3"

    def __init__(self) -> None:
        import fsspec
        from moto.server import ThreadedMotoServer

        from tests.support.s3proxy import S3Proxy

        for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            os.environ.setdefault(k, v)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.proxy = S3Proxy(f"http://{host}:{port}").start()
        fsspec.config.conf["s3"] = {"client_kwargs": {"endpoint_url": self.proxy.url}}
        self.fs_cls = fsspec.get_filesystem_class("s3")
        fsspec.filesystem("s3").mkdir("bench")

    def url(self, rel: str) -> str:
        return f"s3://bench/{rel}"

    def write(self, input_url: str, output_url: str, n: int, manifest: dict[str, Any]) -> None:
        """Straight into moto's in-process store: 40,000 PUTs over HTTP would take minutes and are not measured."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        for path, data in committed_files(input_url, output_url, n, manifest).items():
            bucket, key = path.split("/", 1)
            backend.put_object(bucket, key, data)

    def reset(self) -> None:
        self.proxy.reset()

    def counts(self) -> Counter[str]:
        return self.proxy.counts()

    def cold(self) -> None:
        self.fs_cls.clear_instance_cache()  # a new filesystem instance: no listing cached

    def stop(self) -> None:
        self.proxy.stop()
        self.server.stop()


def measure(counter: Any, n: int, model: dict[str, str]) -> list[tuple[str, float, Counter[str]]]:
    from pipeline.core.config import load_config
    from pipeline.embed.plan import plan_shards  # noqa: F401  (imported before timing)
    from pipeline.embed.stage import build_manifest, plan

    base = f"n{n}"
    brace = counter.url(f"{base}/in/{{00000..{n - 1:05d}}}.tar")
    args = [f"{k}={v}" for k, v in model.items()] + [f"output={counter.url(base + '/out')}", "log_level=WARNING"]
    cfg = load_config([*args, f"input={brace}"])
    folder_cfg = load_config([*args, f"input={counter.url(base + '/in')}"])
    t0 = time.perf_counter()
    counter.write(counter.url(f"{base}/in"), counter.url(f"{base}/out"), n, build_manifest(cfg))
    print(f"  [{counter.name}] wrote {n} committed shards in {time.perf_counter() - t0:.1f} s", flush=True)
    steps: dict[str, Callable[[], None]] = dict(measured_steps(cfg, n))
    steps = {
        "planning (brace)": steps["planning"],
        "planning (folder)": lambda: None if len(plan(folder_cfg)) == n else sys.exit("planning lost shards"),
        "no-op resume": steps["resume"],
        "one poll": steps["poll"],
    }
    rows = []
    for name, run in steps.items():
        counter.cold()
        counter.reset()
        t0 = time.perf_counter()
        run()
        rows.append((name, time.perf_counter() - t0, counter.counts()))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,1000,20000")
    ap.add_argument("--backends", default="local,s3")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from tests.support.helpers import make_tiny_checkpoint

    sizes = [int(s) for s in a.sizes.split(",")]
    print("load before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_planning_") as tmp:
        model = make_tiny_checkpoint(Path(tmp) / "model")
        table = []
        for backend in a.backends.split(","):
            counter = LocalCounter(Path(tmp) / "local") if backend == "local" else S3Counter()
            try:
                for n in sizes:
                    table += [(backend, n, *row) for row in measure(counter, n, model)]
            finally:
                counter.stop()
    print("load after: ", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    head = f"{'backend':7} {'shards':>6}  {'step':18} {'seconds':>8} {'ms/shard':>8} {'requests':>8} {'req/shard':>9}  by kind"
    print("\n" + head + "\n" + "-" * len(head))
    for backend, n, step, seconds, counts in table:
        total = sum(counts.values())
        kinds = " ".join(f"{k}={v}" for k, v in counts.items() if v) or "-"
        print(
            f"{backend:7} {n:>6}  {step:18} {seconds:>8.3f} {1000 * seconds / n:>8.3f} {total:>8} "
            f"{total / n:>9.4f}  {kinds}"
        )


if __name__ == "__main__":
    main()
