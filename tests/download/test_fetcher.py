"""img2dataset's fetch step replaced: ShardFetch's results, retries and shard deadline against misbehaving loopback
servers; pixel bombs refused from the header; the swap in and out of img2dataset's modules."""

from __future__ import annotations

import importlib
import io
import pickle
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
from img2dataset import downloader as i2d_downloader

from pipeline.core.config import load_config
from pipeline.download import fetcher
from pipeline.download.fetcher import (
    ROBOTS_REFUSAL,
    SafeDownloader,
    ShardFetch,
    pixel_refusal,
    safe_fetch_engine,
    settings_for,
    shard_timeout_s,
)
from pipeline.download.layout import classify_error
from tests.support.helpers import jpeg_bytes
from tests.support.webservers import WebServer, jpeg_claiming, png_header, web_server

HANG_GUARD_S = 15.0


@pytest.fixture(scope="module")
def server() -> Iterator[WebServer]:
    with web_server(drip_interval_s=0.1) as s:
        s.files["ok.jpg"] = jpeg_bytes(1, (40, 30))
        s.files["bomb.png"] = png_header(100_000, 100_000)
        s.files["bomb.jpg"] = jpeg_claiming(jpeg_bytes(2, (32, 32)), 30_000, 30_000)
        s.files["page.html"] = b"<!DOCTYPE html><html><body>moved</body></html>"
        yield s


def _settings(*extra: str) -> fetcher.FetchSettings:
    cfg = load_config(["download.timeout=1", "download.allow_networks=[127.0.0.1]", *extra])
    return settings_for(cfg.download)


def _fetch(url: Any, retries: int = 0, deadline_s: float = 60.0, *extra: str, disallowed: Any = None) -> Any:
    step = ShardFetch(_settings(*extra), time.monotonic() + deadline_s, disallowed)
    return step((7, url), timeout=1, retries=retries, user_agent_token=None, disallowed_header_directives=disallowed)


def test_success_is_img2datasets_triple(server: WebServer) -> None:
    key, stream, err = _fetch(f"{server.base}/f/ok.jpg")
    assert key == 7 and err is None and isinstance(stream, io.BytesIO)
    assert stream.read() == server.files["ok.jpg"]


def test_timeouts_are_retried_and_each_attempt_is_bounded(server: WebServer) -> None:
    before = server.requests["/trickle"]
    t0 = time.monotonic()
    key, stream, err = _fetch(f"{server.base}/trickle", retries=1)
    elapsed = time.monotonic() - t0
    assert stream is None and classify_error(err) == "timeout"
    assert server.requests["/trickle"] - before == 2  # the first attempt and one retry, 1 s each
    assert 2.0 <= elapsed < HANG_GUARD_S


def test_only_what_could_change_is_retried(server: WebServer) -> None:
    for path, tries in (("/status/404", 1), ("/status/503", 3), ("/loop/500", 1)):
        before = server.requests[path]
        _, stream, err = _fetch(f"{server.base}{path}", retries=2)
        assert stream is None and server.requests[path] - before == tries, (path, err)


def test_refusals_never_connect(server: WebServer, tmp_path: Any) -> None:
    before = server.connections
    for url, reason in (
        ((tmp_path / "x.jpg").as_uri(), "scheme refused"),
        ("http://169.254.169.254/latest/meta-data/", "address refused"),
        (f"http://127.0.0.2:{server.server_port}/f/ok.jpg", "address refused"),
        (None, "bad url"),
    ):
        _, stream, err = _fetch(url, retries=3)
        assert stream is None and classify_error(err) == reason, (url, err)
    assert server.connections == before


def test_the_shard_deadline_stops_fetches_in_flight_and_to_come(server: WebServer) -> None:
    """The watchdog: with a 60 s per-URL timeout, a trickling URL still ends when the shard's 0.5 s run out, and a
    URL whose turn comes after that is not fetched at all."""
    t0 = time.monotonic()
    _, stream, err = _fetch(f"{server.base}/trickle", 5, 0.5, "download.timeout=60")
    assert stream is None and classify_error(err) == "shard timeout" and time.monotonic() - t0 < HANG_GUARD_S
    before = server.connections
    _, stream, err = _fetch(f"{server.base}/f/ok.jpg", 0, -1.0)
    assert stream is None and classify_error(err) == "shard timeout" and server.connections == before


def test_pixel_bombs_are_refused_from_the_header(server: WebServer) -> None:
    for name in ("bomb.png", "bomb.jpg"):
        _, stream, err = _fetch(f"{server.base}/f/{name}")
        assert stream is None and classify_error(err) == "too many pixels", err
    _, stream, err = _fetch(f"{server.base}/f/ok.jpg", 0, 60.0, "download.max_pixels=1000")
    assert stream is None and "40x30 = 1200 > download.max_pixels 1000" in err
    _, stream, err = _fetch(f"{server.base}/f/page.html")
    assert stream is None and classify_error(err) == "cannot decode image"


def test_pixel_check_reads_the_header_only() -> None:
    """10^10 pixels claimed (30 GB decoded): refused with Python allocations of a few kilobytes."""
    bomb = png_header(100_000, 100_000)
    tracemalloc.start()
    try:
        why = pixel_refusal(bomb, 89_478_485)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert why is not None and "too many pixels" in why and peak < 1 << 20
    assert pixel_refusal(jpeg_bytes(3, (64, 48)), 64 * 48) is None


def test_x_robots_tag_is_honoured_as_img2dataset_does(server: WebServer) -> None:
    url = f"{server.base}/f/ok.jpg?robots=noai"
    _, stream, err = _fetch(url, disallowed={"noai"})
    assert stream is None and err == ROBOTS_REFUSAL and classify_error(err) == "disallowed by X-Robots-Tag"
    _, stream, err = _fetch(url)
    assert err is None and stream is not None


def test_an_unexpected_exception_still_gives_a_row(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("something odd")

    monkeypatch.setattr(fetcher.webfetch, "fetch", boom)
    key, stream, err = _fetch("http://127.0.0.1/x.jpg")
    assert key == 7 and stream is None and err == "RuntimeError: something odd"


def test_settings_from_config() -> None:
    cfg = load_config(
        [
            "download.timeout=3",
            "download.retries=2",
            "download.thread_count=10",
            "download.number_sample_per_shard=95",
            "download.max_bytes=1000",
            "download.max_redirects=2",
            "download.user_agent_token=MyBot",
        ]
    )
    s = settings_for(cfg.download)
    assert s.policy.timeout_s == 3 and s.policy.max_bytes == 1000 and s.policy.max_redirects == 2
    assert not s.policy.allow_private_addresses and s.policy.allow_networks == ()
    assert s.policy.user_agent.endswith("(compatible; mybot; +https://github.com/rom1504/img2dataset)")
    assert shard_timeout_s(cfg.download) == 3 * 3 * 10 + fetcher.SHARD_SLACK_S  # ceil(95 / 10) waves of 3 tries
    assert shard_timeout_s(load_config(["download.shard_timeout=5"]).download) == 5
    assert pickle.loads(pickle.dumps(s)) == s


def _downloader(settings: fetcher.FetchSettings) -> SafeDownloader:
    i2d_main = importlib.import_module("img2dataset.main")
    with safe_fetch_engine(settings):
        made = i2d_main.Downloader(
            sample_writer_class=None,
            resizer=None,
            thread_count=2,
            save_caption=True,
            extract_exif=False,
            output_folder="/nowhere",
            column_list=["url"],
            timeout=1,
            number_sample_per_shard=10,
            oom_shard_count=5,
            compute_hash=None,
            verify_hash_type=None,
            encode_format="jpg",
            retries=0,
            user_agent_token=None,
            disallowed_header_directives=["noai"],
        )
    assert i2d_main.Downloader is i2d_downloader.Downloader  # restored on exit
    return made  # type: ignore[no-any-return]


def test_img2dataset_builds_the_safe_downloader_and_each_shard_swaps_the_fetch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = _settings()
    d = pickle.loads(pickle.dumps(_downloader(settings)))  # what a spawned worker or a Spark executor receives
    assert isinstance(d, SafeDownloader) and d.settings == settings
    original = i2d_downloader.download_image_with_retry
    seen: list[Any] = []

    def shard(self: Any, row: Any) -> None:
        seen.append(i2d_downloader.download_image_with_retry)
        if row[0] == "bad":
            raise OSError("disk full")

    monkeypatch.setattr(i2d_downloader.Downloader, "download_shard", shard)
    d.download_shard(("good", "shard"))
    assert d(("bad", "shard")) == (False, ("bad", "shard"))  # img2dataset's __call__ reports the failed shard
    assert all(isinstance(f, ShardFetch) and f.disallowed == {"noai"} for f in seen) and len(seen) == 2
    assert i2d_downloader.download_image_with_retry is original  # restored, also after the failure
