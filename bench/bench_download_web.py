"""`clipline download` against the misbehaving web: N loopback URLs of which 5% are pathological, a clean list of
the same size, and plain img2dataset on the clean list.

    python bench/bench_download_web.py [--urls 10000] [--timeout 2] [--retries 1] [--processes 2] [--threads 32]
                                       [--per-shard 1000] [--reps 1] [--keep DIR]

The pathological 5%, in four equal parts, spread evenly through the list:
  slow     a server that trickles its body (or its headers) a byte every 200 ms, forever, or never answers
  huge     1 GiB bodies, with Content-Length or ended by closing the connection
  refused  a closed port, file:// URLs, 169.254.169.254 (metadata), 127.0.0.2 (private, not allowed)
  broken   bodies cut short, connections reset, HTML served as .jpg, a PNG claiming 10^10 pixels
The good URLs are the demo dataset's real photos (pipeline.run.demo_data), served from memory by the misbehaving
server of tests/support/webservers.py on 127.0.0.1 (allowed with download.allow_networks; 127.0.0.2 is not).

Reported: every URL accounted for (one parquet row per URL, each with the expected reason), the pathological
run's wall time against the clean run's plus the bound the timeouts give, peak memory (the download workers'
high-water mark and the whole process tree's; pathological / clean, goal <= 1.10), and URLs/s of clipline and of
img2dataset.download() called with the same arguments (bench/compare_tools.py's method) on the clean list (goal
>= 0.9). Plain img2dataset is not run on the pathological list: its fetch never ends on a trickling server.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from compare_tools import I2D_CODE, download_outcome  # noqa: E402


def _tree_memory(pgid: int) -> dict[int, tuple[str, int, int]]:
    """pid -> (role, VmHWM KiB, VmRSS KiB) of every live process in the process group."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if int((d / "stat").read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            status = dict(line.split(":", 1) for line in (d / "status").read_text().splitlines() if ":" in line)
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        if "VmHWM" not in status:
            continue  # a zombie: its memory is gone
        role = "worker" if "spawn_main" in cmd else "other" if "resource_tracker" in cmd else "main"
        out[int(d.name)] = (role, int(status["VmHWM"].split()[0]), int(status["VmRSS"].split()[0]))
    return out


def run(cmd: list[str], log: Path) -> tuple[float, dict[str, float]]:
    """Run cmd in its own process group; returns (wall seconds, memory in MiB): the high-water mark (VmHWM, kept
    by the kernel) of the largest download worker and of the main process, and the peak of the whole tree's summed
    RSS (sampled every 100 ms). Response bodies live in the workers."""
    import subprocess
    import threading
    import time

    peaks: dict[int, tuple[str, int]] = {}
    tree_peak = 0
    with open(log, "w") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        done = threading.Event()

        def sample() -> None:
            nonlocal tree_peak
            while not done.is_set():
                mem = _tree_memory(p.pid)
                tree_peak = max(tree_peak, sum(rss for _, _, rss in mem.values()))
                for pid, (role, hwm, _) in mem.items():
                    peaks[pid] = (role, max(hwm, peaks.get(pid, (role, 0))[1]))
                done.wait(0.1)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        rc = p.wait(3600)
        wall = time.perf_counter() - t0
        done.set()
        t.join()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {rc}; last output:\n{log.read_text()[-2500:]}")
    by_role: dict[str, int] = collections.defaultdict(int)
    for role, hwm in peaks.values():
        by_role[role] = max(by_role[role], hwm)
    return wall, {"worker": by_role["worker"] / 1024, "main": by_role["main"] / 1024, "tree": tree_peak / 1024}


KINDS = {
    "slow": [("/trickle", "timeout"), ("/trickle", "timeout"), ("/trickle-headers", "timeout"), ("/stall", "timeout")],
    "huge": [("/huge", "too large"), ("/huge?declare=0", "too large")],
    "refused": [
        ("closed", "connection refused"),
        ("file", "scheme refused"),
        ("meta", "address refused"),
        ("private", "address refused"),
    ],
    "broken": [
        ("/cut", "connection closed"),
        ("/reset", "connection closed"),
        ("/f/page.html", "cannot decode image"),
        ("/f/bomb.png", "too many pixels"),
    ],
}


def photos() -> list[bytes]:
    from pipeline.run.demo_data import build_demo_dataset

    demo = build_demo_dataset(Path(tempfile.mkdtemp(prefix="clipline-demo-")))
    found = [
        p.read_bytes()
        for p in sorted(demo.images_dir.glob("*.jpg"))
        if p.name not in demo.truth["broken"] and p.stat().st_size > 0
    ]
    shutil.rmtree(demo.images_dir.parent, ignore_errors=True)
    return found


def url_lists(n: int, base: str, private: str, closed_port: int, tmp: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """The clean list and the pathological one: (url, expected outcome); 1 URL in 20 pathological."""
    clean = [f"{base}/f/{i:05d}.jpg" for i in range(n)]
    special = {  # each URL distinct (a query of its own), so each has its own row to check
        "closed": f"http://127.0.0.1:{closed_port}/x.jpg",
        "file": (tmp / "local.jpg").as_uri(),
        "meta": "http://169.254.169.254/latest/meta-data/",
        "private": f"{private}/f/00000.jpg",
    }
    cycle = [(route, why) for kind in KINDS for route, why in KINDS[kind]]
    patho: list[tuple[str, str]] = []
    for i, url in enumerate(clean):
        if i % 20 != 10:
            patho.append((url, "success"))
            continue
        route, why = cycle[(i // 20) % len(cycle)]
        url = special.get(route) or f"{base}{route}"
        patho.append((f"{url}{'&' if '?' in url else '?'}u={i}", why))
    return clean, patho


def write_list(path: Path, urls: list[str]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"url": urls, "caption": [f"photo {i}" for i in range(len(urls))]}), path)
    return path


def settings(args: argparse.Namespace) -> list[str]:
    return [
        f"download.processes_count={args.processes}",
        f"download.thread_count={args.threads}",
        f"download.number_sample_per_shard={args.per_shard}",
        f"download.timeout={args.timeout}",
        f"download.retries={args.retries}",
        "download.allow_networks=[127.0.0.1]",
    ]


def clipline_cmd(url_list: Path, out: Path, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline.cli",
        "download",
        f"input={url_list}",
        f"output={out}",
        *settings(args),
        "log_level=WARNING",
    ]


def img2dataset_cmd(url_list: Path, out: Path, args: argparse.Namespace) -> list[str]:
    from pipeline.core.config import load_config
    from pipeline.download.stage import img2dataset_kwargs, plan_input

    cfg = load_config([f"input={url_list}", f"output={out}", *settings(args)])
    return [sys.executable, "-c", I2D_CODE, json.dumps(img2dataset_kwargs(cfg, plan_input(cfg)))]


def accounted(out: Path, expected: list[tuple[str, str]]) -> dict[str, Any]:
    """Rows per URL and reasons against the plan."""
    got = download_outcome(out)
    want = dict(expected)

    def outcome(url: str) -> str:
        status, reason = got["per_url"].get(url, ("missing", "no row"))
        return "success" if status == "success" else reason

    wrong = collections.Counter(f"{want[u]} -> {outcome(u)}" for u in want if outcome(u) != want[u])
    summary = json.loads((out / "_clipline" / "run.json").read_text())["summary"]
    return {
        "rows": got["rows"],
        "distinct": len(got["per_url"]),
        "unaccounted": summary["unaccounted"],
        "failures_by_reason": summary["failures_by_reason"],
        "unexpected": dict(wrong),
        "every_url_once_as_planned": got["rows"] == len(want) == len(got["per_url"]) and not wrong,
    }


def shard_spans(out: Path) -> list[float]:
    return [(s["end_time"] - s["start_time"]) for s in (json.loads(p.read_text()) for p in out.glob("*_stats.json"))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--urls", type=int, default=10_000)
    ap.add_argument("--timeout", type=int, default=2)
    ap.add_argument("--retries", type=int, default=1)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temp folder, deleted)")
    args = ap.parse_args()

    import socket

    from tests.support.webservers import png_header, web_server

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="clipline-bench-web-"))
    work.mkdir(parents=True, exist_ok=True)
    pics = photos()
    (work / "local.jpg").write_bytes(pics[0])
    results: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    try:
        with web_server() as web, web_server(host="127.0.0.2") as private, socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
            for i in range(args.urls):
                web.files[f"{i:05d}.jpg"] = pics[i % len(pics)]
            web.files["page.html"] = b"<!DOCTYPE html><html><body>moved</body></html>"
            web.files["bomb.png"] = png_header(100_000, 100_000)
            private.files["00000.jpg"] = pics[0]
            clean, patho = url_lists(args.urls, web.base, private.base, closed.getsockname()[1], work)
            lists = {
                "clean": write_list(work / "clean.parquet", clean),
                "patho": write_list(work / "patho.parquet", [u for u, _ in patho]),
            }
            n_slow = sum(why == "timeout" for _, why in patho)
            n_bad = sum(why != "success" for _, why in patho)
            print(
                f"== bench/bench_download_web: {args.urls} URLs, {n_bad} pathological ({n_slow} slow); "
                f"settings: {' '.join(settings(args))}",
                flush=True,
            )
            for rep in range(args.reps):
                runs = [
                    ("img2dataset clean", "clean", img2dataset_cmd),
                    ("clipline clean", "clean", clipline_cmd),
                    ("clipline patho", "patho", clipline_cmd),
                ]
                for name, which, make in runs if rep % 2 == 0 else runs[::-1]:
                    out = work / f"{name.replace(' ', '_')}_{rep}"
                    shutil.rmtree(out, ignore_errors=True)
                    wall, mem = run(make(lists[which], out, args), work / f"{name.replace(' ', '_')}_{rep}.log")
                    r: dict[str, Any] = {"wall": wall, **mem, "spans": shard_spans(out)}
                    r["in_shard"] = download_outcome(out)["in_shard"]
                    if name.startswith("clipline"):
                        r.update(accounted(out, patho if which == "patho" else [(u, "success") for u in clean]))
                    results[name].append(r)
                    print(
                        f"  rep {rep} {name:18s} wall {wall:6.1f} s  {args.urls / wall:6.1f} URLs/s  in shards "
                        f"{r['in_shard']:6.1f} URLs/s  peak MiB: worker {mem['worker']:5.0f} main {mem['main']:5.0f} "
                        f"tree {mem['tree']:5.0f}  longest shard {max(r['spans']):5.1f} s",
                        flush=True,
                    )
            assert private.connections == 0, "a refused private address was connected to"
        report(results, args, n_slow)
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace, n_slow: int) -> None:
    import statistics

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    last = results["clipline patho"][-1]
    shards = math.ceil(args.urls / args.per_shard)
    slow_per_shard = math.ceil(n_slow / shards)
    per_url = args.timeout * (args.retries + 1)
    # A shard's slow URLs run side by side in its threads; shards run `processes` at a time.
    bound = (
        med("clipline clean", "wall")
        + math.ceil(shards / args.processes) * math.ceil(slow_per_shard / args.threads) * per_url
    )
    print("\n== results (medians over reps; measured under load unless the machine was quiet) ==")
    print(
        f"every URL accounted for:   {last['every_url_once_as_planned']} (rows {last['rows']}, distinct "
        f"{last['distinct']}, unaccounted {last['unaccounted']}, unexpected outcomes {last['unexpected'] or 'none'})"
    )
    print(f"failures by reason:        {last['failures_by_reason']}")
    print(
        f"wall, pathological list:   {med('clipline patho', 'wall'):.1f} s; clean {med('clipline clean', 'wall'):.1f} s; "
        f"bound clean + timeouts: {bound:.1f} s (each slow URL {per_url} s = timeout x (retries + 1))"
    )
    print(
        f"longest shard:             pathological {max(last['spans']):.1f} s, clean "
        f"{max(results['clipline clean'][-1]['spans']):.1f} s"
    )
    for key, what in (("worker", "download worker (VmHWM)"), ("tree", "whole tree (summed RSS)")):
        a, b = med("clipline patho", key), med("clipline clean", key)
        print(f"peak memory, {what}: pathological {a:.0f} MiB / clean {b:.0f} MiB = {a / b:.3f} (goal <= 1.10)")
    # clipline's URLs/s over img2dataset's, within each rep (same list, same settings)
    whole = [i["wall"] / c["wall"] for c, i in zip(results["clipline clean"], results["img2dataset clean"])]
    inside = [c["in_shard"] / i["in_shard"] for c, i in zip(results["clipline clean"], results["img2dataset clean"])]
    print(
        f"URLs/s, clean list:        clipline {args.urls / med('clipline clean', 'wall'):.1f}, img2dataset "
        f"{args.urls / med('img2dataset clean', 'wall'):.1f} over the whole command (start-up included); ratio per "
        f"rep {', '.join(f'{x:.2f}' for x in whole)} (goal >= 0.9)"
    )
    print(
        f"URLs/s inside shards:      clipline {med('clipline clean', 'in_shard'):.0f}, img2dataset "
        f"{med('img2dataset clean', 'in_shard'):.0f} (first shard start to last shard end: the fetch step's own "
        f"speed); ratio per rep {', '.join(f'{x:.2f}' for x in inside)}"
    )


if __name__ == "__main__":  # img2dataset spawns processes that re-import this file
    sys.exit(main())
