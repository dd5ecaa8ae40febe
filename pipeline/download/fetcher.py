"""img2dataset with clipline's fetch step (pipeline/web/fetch.py) in place of its own, in every process that runs
its downloader; sharding, resizing, writers, stats files and incremental mode stay img2dataset's.

img2dataset's fetch (`downloader.download_image`) cannot be configured into safety: urllib's per-read timeout lets a
trickling server hold a shard forever, the body is read whole into memory, any scheme urllib knows is opened, and
there is no address check. The seam is `img2dataset.downloader.download_image_with_retry`, which `download_shard` looks
up by name for every URL: `SafeDownloader` (what `img2dataset.main` builds while `safe_fetch_engine()` is active)
swaps in `ShardFetch` around each shard. The Downloader instance is what img2dataset pickles to its spawned workers
and to Spark executors, so the swap happens wherever the shard runs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import logging
import math
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from img2dataset import downloader as i2d_downloader
from PIL import Image

from pipeline.web import fetch as webfetch
from pipeline.web.addresses import parse_networks

if TYPE_CHECKING:  # not imported in img2dataset's workers, which only unpickle FetchSettings
    from pipeline.core.config import DownloadConfig

log = logging.getLogger(__name__)

# img2dataset's own User-Agent, so servers see the same client as before
USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
ROBOTS_REFUSAL = "Use of image disallowed by X-Robots-Tag directive"  # img2dataset's message, counted as before
# The per-shard watchdog's allowance beyond the longest the URLs themselves may take (resizing, writing).
SHARD_SLACK_S = 60.0


@dataclass(frozen=True)
class FetchSettings:
    """Everything the fetch step needs in a worker process: small, picklable, from the download config."""

    policy: webfetch.FetchPolicy
    max_pixels: int
    shard_timeout_s: float


def shard_timeout_s(dl: DownloadConfig) -> float:
    """download.shard_timeout, or by default the longest a shard can take when every URL uses its whole timeout on
    every attempt: with the per-URL deadline in force, the watchdog only fires if something escaped it."""
    if dl.shard_timeout is not None:
        return dl.shard_timeout
    waves = math.ceil(dl.number_sample_per_shard / dl.thread_count)
    return dl.timeout * (dl.retries + 1) * waves + SHARD_SLACK_S


def settings_for(dl: DownloadConfig) -> FetchSettings:
    ua = USER_AGENT
    if dl.user_agent_token:
        ua += f" (compatible; {dl.user_agent_token.strip().lower()}; +https://github.com/rom1504/img2dataset)"
    policy = webfetch.FetchPolicy(
        timeout_s=float(dl.timeout),
        max_bytes=dl.max_bytes,
        max_redirects=dl.max_redirects,
        allow_private_addresses=dl.allow_private_addresses,
        allow_networks=parse_networks(dl.allow_networks),
        user_agent=ua,
    )
    return FetchSettings(policy, dl.max_pixels, shard_timeout_s(dl))


def pixel_refusal(body: bytes, max_pixels: int) -> str | None:
    """Why an image is refused from its header alone (no pixel is decoded), or None: more pixels than max_pixels,
    or bytes whose header Pillow cannot read (img2dataset's decoder would fail on them, after allocating)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(body)) as im:
                width, height = im.size
        except Image.DecompressionBombError as e:
            return f"too many pixels: {e}"
        except Exception as e:  # noqa: BLE001 - any parser failure means "not an image we can bound"
            return f"cannot identify image: {type(e).__name__}: {str(e)[:120]}"
    if width * height > max_pixels:
        return f"too many pixels: header claims {width}x{height} = {width * height} > download.max_pixels {max_pixels}"
    return None


class ShardFetch:
    """Stands in for `img2dataset.downloader.download_image_with_retry` during one shard: same arguments, same
    result `(key, BytesIO or None, error message or None)`, under the policy and the shard's deadline."""

    def __init__(self, settings: FetchSettings, deadline: float, disallowed: set[str] | None):
        self.settings, self.deadline, self.disallowed = settings, deadline, disallowed

    def __call__(
        self, row: tuple[int, Any], timeout: Any, retries: int, user_agent_token: str | None, **_: Any
    ) -> tuple[int, io.BytesIO | None, str | None]:
        key, url = row
        try:
            body, err = self.fetch(url, retries, user_agent_token)
        except Exception as e:  # noqa: BLE001 - as img2dataset's own fetch: every URL gets a row, whatever happens
            log.debug("fetch of %r raised", url, exc_info=True)
            body, err = None, f"{type(e).__name__}: {e}"
        return key, (io.BytesIO(body) if body is not None else None), err

    def fetch(self, url: Any, retries: int, user_agent_token: str | None) -> tuple[bytes | None, str | None]:
        if not isinstance(url, str):
            return None, f"bad url: {url!r} is not a string"
        err = "not fetched"
        for _ in range(retries + 1):
            if time.monotonic() >= self.deadline:
                return None, self._watchdog_message()
            try:
                resp = webfetch.fetch(url, self.settings.policy, deadline=self.deadline)
            except webfetch.FetchError as e:
                err = self._watchdog_message() if time.monotonic() >= self.deadline else str(e)
                if not e.retryable:
                    break
                continue
            if self.disallowed and i2d_downloader.is_disallowed(resp.headers, user_agent_token, self.disallowed):
                return None, ROBOTS_REFUSAL
            refusal = pixel_refusal(resp.body, self.settings.max_pixels)
            return (None, refusal) if refusal else (resp.body, None)
        return None, err

    def _watchdog_message(self) -> str:
        return f"shard deadline passed: download.shard_timeout ({self.settings.shard_timeout_s:g}s) ran out"


_SWAP_LOCK = threading.Lock()  # one shard at a time swaps img2dataset's module attribute in a process


class SafeDownloader(i2d_downloader.Downloader):  # type: ignore[misc]
    """img2dataset's Downloader whose shards fetch through ShardFetch; built by img2dataset.main under
    safe_fetch_engine() and pickled to its workers like the original."""

    def __init__(self, *args: Any, settings: FetchSettings, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.settings = settings

    def download_shard(self, row: Any) -> None:
        step = ShardFetch(
            self.settings, time.monotonic() + self.settings.shard_timeout_s, self.disallowed_header_directives
        )
        with _SWAP_LOCK:
            original = i2d_downloader.download_image_with_retry
            i2d_downloader.download_image_with_retry = step
            try:
                super().download_shard(row)
            finally:
                i2d_downloader.download_image_with_retry = original


@contextlib.contextmanager
def safe_fetch_engine(settings: FetchSettings) -> Iterator[None]:
    """While active, img2dataset.download() builds a SafeDownloader with these settings (driver side)."""
    # img2dataset/__init__.py rebinds the name `main` to the function: the module itself comes from importlib
    i2d_main = importlib.import_module("img2dataset.main")
    original = i2d_main.Downloader  # type: ignore[attr-defined]
    i2d_main.Downloader = functools.partial(SafeDownloader, settings=settings)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        i2d_main.Downloader = original  # type: ignore[attr-defined]
