"""Stream raw samples out of one input shard (WebDataset tar, img2dataset parquet, or a folder chunk)."""

from __future__ import annotations

import json
import logging
import posixpath
import queue
import re
import tarfile
import threading
from typing import Any, Iterator

import fsspec
from webdataset.tariterators import base_plus_ext

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


class _Tail:
    """The shard's byte stream, counting what it gave and keeping the last bytes, so a member header cut by the
    end of the file can be read back (tarfile's stream mode takes such a cut for the end of the archive)."""

    KEEP = 64 * 1024

    def __init__(self, f: Any):
        self.f, self.count, self.tail, self.eof = f, 0, b"", False

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        if not data and n != 0:
            self.eof = True
        self.count += len(data)
        self.tail = (self.tail + data)[-self.KEEP :]
        return data  # type: ignore[no-any-return]

    def header_at(self, offset: int) -> bytes | None:
        """The bytes from `offset` to the end, if the stream ended there within one 512-byte header."""
        if not self.eof or not offset <= self.count < offset + tarfile.BLOCKSIZE:
            return None
        start = offset - (self.count - len(self.tail))
        return self.tail[start:] if start >= 0 else None


def _cut_member_name(header: bytes) -> str | None:
    """The member name of a header cut short, when its name field survived whole."""
    name = header[:100].split(b"\0", 1)
    if len(name) == 1 and len(header) < 100:
        return None  # the name itself is cut
    return name[0].decode("utf-8", "surrogateescape") or None


def _members(stream: tarfile.TarFile) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """(key, field, member) of each regular file that belongs to a sample, before its data is read: so when the
    data turns out to be cut, the sample it belongs to is known."""
    for info in stream:
        if not info.isreg() or _META.match(info.name):  # webdataset skips __key__-style metadata members
            continue
        prefix, suffix = base_plus_ext(info.name)
        if prefix is not None:
            yield prefix, suffix.lower(), info


_META = re.compile(r"__[^/]*__($|/)")


def iter_tar(task: ShardTask, image_keys: list[str], caption_keys: list[str]) -> Iterator[RawSample]:
    """Consecutive members with the same key form a sample; a repeated field starts a new one (duplicate key).

    When the archive is cut, every sample read whole is kept as it is and the sample the cut falls in gets its own
    flagged row (`RawSample.error`), then ShardDamaged is raised."""
    index = 0
    key: str | None = None
    fields: dict[str, bytes] = {}

    def sample(error: str | None = None) -> RawSample:
        assert key is not None
        s = _sample_from_fields(key, index, fields, image_keys, caption_keys)
        s.error = error
        return s

    with fsspec.open(task.input_url, "rb") as f:
        raw = _Tail(f)
        try:
            stream = tarfile.open(fileobj=raw, mode="r|*")  # type: ignore[call-overload]
            for prefix, suffix, info in _members(stream):
                if key is not None and (prefix != key or suffix in fields):
                    yield sample()
                    index += 1
                    fields = {}
                key = prefix
                member = stream.extractfile(info)
                assert member is not None
                fields[suffix] = member.read()  # a cut here leaves `key` naming the sample it falls in
                stream.members = []  # stream mode: do not keep every TarInfo of a 10k-sample shard
        except DAMAGE_ERRORS as e:
            if key is not None:
                yield sample(f"sample cut by shard damage ({type(e).__name__}: {e})")
            raise ShardDamaged(f"{type(e).__name__}: {e}") from e
        cut = _cut_header(stream, raw)
    if cut is None:
        if key is not None:
            yield sample()
        return
    name = _cut_member_name(cut[1])
    cut_key, cut_field = base_plus_ext(name) if name else (None, None)
    message = f"archive cut at byte {raw.count}, inside or just before the header of member {name or '(unreadable)'}"
    if key is not None and cut_key == key and cut_field is not None and cut_field.lower() not in fields:
        yield sample(f"sample cut by shard damage ({message})")  # the cut member belongs to this sample
    else:
        if key is not None:
            yield sample()  # read whole: kept (a member of it may follow the cut, unknowable when unnamed)
            index += 1
        if cut_key is not None:
            key, fields = cut_key, {}
            yield sample(f"sample cut by shard damage ({message})")
    raise ShardDamaged(f"ReadError: {message}")


def _cut_header(stream: tarfile.TarFile, raw: _Tail) -> tuple[int, bytes] | None:
    """Where an uncompressed tar that ended without its end-of-archive block was cut: (offset, header bytes)."""
    if getattr(stream.fileobj, "comptype", "tar") != "tar":
        return None  # offsets count uncompressed bytes: no comparison with the file's length
    header = raw.header_at(stream.offset)
    return None if header is None else (stream.offset, header)


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
