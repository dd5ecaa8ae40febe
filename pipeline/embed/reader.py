"""Stream raw samples out of one input shard (WebDataset tar, img2dataset parquet, or a folder chunk)."""

from __future__ import annotations

import json
import logging
import posixpath
import queue
import tarfile
import threading
from typing import Any, Iterator

import fsspec
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from pipeline.core.tasks import ShardTask
from pipeline.embed.batch import RawSample

log = logging.getLogger(__name__)

# A damaged archive is data (keep what came before, record it); anything else (network, permissions) fails the shard.
DAMAGE_ERRORS = (tarfile.TarError, EOFError, UnicodeDecodeError)


class ShardDamaged(Exception):
    """The shard's container is corrupt or truncated; samples before the damage were read."""


class ReadTimeout(TimeoutError):
    """Reading the shard stalled longer than embed.read_timeout_s."""


def _sample_from_fields(
    key: str, index: int, fields: dict[str, bytes], image_keys: list[str], caption_keys: list[str]
) -> RawSample:
    image = next((fields[k] for k in image_keys if k in fields), None)
    caption = next((fields[k] for k in caption_keys if k in fields), None)
    meta: dict[str, Any] = {}
    if "json" in fields:
        try:
            loaded = json.loads(fields["json"])
            meta = loaded if isinstance(loaded, dict) else {}
        except (ValueError, UnicodeDecodeError):
            meta = {"_json_error": "invalid json"}
    return RawSample(key=posixpath.basename(key), index=index, image=image, caption=caption, meta=meta)


def iter_tar(task: ShardTask, image_keys: list[str], caption_keys: list[str]) -> Iterator[RawSample]:
    """Consecutive members with the same key form a sample; a repeated field starts a new one (duplicate key)."""
    index = 0
    key: str | None = None
    fields: dict[str, bytes] = {}
    with fsspec.open(task.input_url, "rb") as f:
        try:
            for member in tar_file_iterator(f):
                prefix, suffix = base_plus_ext(member["fname"])
                if prefix is None:
                    continue
                suffix = suffix.lower()
                if key is not None and (prefix != key or suffix in fields):
                    yield _sample_from_fields(key, index, fields, image_keys, caption_keys)
                    index += 1
                    fields = {}
                key = prefix
                fields[suffix] = member["data"]
        except DAMAGE_ERRORS as e:
            if key is not None:
                # The sample being read when the archive broke may be missing members: keep it, flagged.
                s = _sample_from_fields(key, index, fields, image_keys, caption_keys)
                s.error = f"sample cut by shard damage ({type(e).__name__}: {e})"
                yield s
            raise ShardDamaged(f"{type(e).__name__}: {e}") from e
    if key is not None:
        yield _sample_from_fields(key, index, fields, image_keys, caption_keys)


def iter_parquet(task: ShardTask, image_keys: list[str], caption_keys: list[str]) -> Iterator[RawSample]:
    """img2dataset's parquet output: an image bytes column (jpg/png/webp) plus caption, key, url, sha256..."""
    import pyarrow.parquet as pq

    with fsspec.open(task.input_url, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        img_col = next((k for k in image_keys if k in names), None)
        cap_col = next((k for k in caption_keys if k in names), None)
        index = 0
        for rb in pf.iter_batches(batch_size=256):
            for row in rb.to_pylist():
                meta = {k: v for k, v in row.items() if k not in (img_col, cap_col) and not isinstance(v, bytes)}
                key = str(row.get("key") if row.get("key") is not None else f"{index:09d}")
                yield RawSample(
                    key=key,
                    index=index,
                    image=row.get(img_col) if img_col else None,
                    caption=row.get(cap_col) if cap_col else None,
                    meta=meta,
                )
                index += 1


def iter_folder(task: ShardTask) -> Iterator[RawSample]:
    """A chunk of a plain image folder; captions from same-stem .txt files when present."""
    fs, _ = fsspec.core.url_to_fs(task.members[0])
    for index, url in enumerate(task.members):
        stem, _ext = posixpath.splitext(url)
        key = posixpath.basename(stem)
        with fs.open(url, "rb") as f:
            image = f.read()
        caption = None
        txt = stem + ".txt"
        if fs.exists(txt):
            with fs.open(txt, "rb") as f:
                caption = f.read()
        yield RawSample(key=key, index=index, image=image, caption=caption, meta={"url": None, "path": url})


def iter_samples(task: ShardTask, image_keys: list[str], caption_keys: list[str]) -> Iterator[RawSample]:
    if task.kind == "webdataset":
        return iter_tar(task, image_keys, caption_keys)
    if task.kind == "parquet":
        return iter_parquet(task, image_keys, caption_keys)
    if task.kind == "folder":
        return iter_folder(task)
    raise ValueError(f"unknown shard kind {task.kind!r}")


_END = object()


def threaded(it: Iterator[RawSample], maxsize: int, timeout_s: float) -> Iterator[RawSample]:
    """Run a sample iterator in a background thread: reading overlaps compute and a stalled read times out."""
    q: queue.Queue[Any] = queue.Queue(maxsize=maxsize)
    stop = threading.Event()

    def pump() -> None:
        try:
            for s in it:
                while not stop.is_set():
                    try:
                        q.put(s, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as e:  # handed to the consumer, which re-raises it in its own thread
            q.put(e)

    t = threading.Thread(target=pump, name="shard-reader", daemon=True)
    t.start()
    try:
        while True:
            try:
                item = q.get(timeout=timeout_s)
            except queue.Empty:
                raise ReadTimeout(f"no data for {timeout_s:.0f}s (embed.read_timeout_s)") from None
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
