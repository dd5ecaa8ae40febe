"""`clipline serve` over real HTTP: clip back's API answered for requests shaped exactly as clip-retrieval's
ClipClient (clip_retrieval/clip_client.py 2.45) and front end (front/src/clip-service.js) send them, its limits,
its refusals, and ClipClient itself when its module is at hand."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipeline.core.config import load_config
from pipeline.core.errors import ConfigError
from pipeline.index.stage import build
from pipeline.query.backserver import ClipBackServer
from pipeline.query.clipback import ClipBack, KnnRequest
from pipeline.query.serve import make_server, serve_cli
from tests.query.conftest import CAPTION, DUPLICATE_KEYS, IMAGE_KEY, NO_IMAGE_KEY, QUERY_JPEG, TEXT_KEY
from tests.support.clipretrieval import NAME, clip_client_body, clip_client_module, front_body
from tests.support.foreign import make_samples, write_clip_retrieval
from tests.support.helpers import overrides
from tests.support.webservers import WebServer, png_header, watched_fifo, web_server

slow = pytest.mark.slow  # these share one built index (tiny model + autofaiss, ~15 s) and servers over it


# ---- clients --------------------------------------------------------------------------------------------------


def call(url: str, method: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any, dict]:
    """One request as requests sends ClipClient's (a JSON string body, no Content-Type); (status, JSON, headers)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data)
        resp = conn.getresponse()
        payload = resp.read()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        return resp.status, json.loads(payload) if payload else None, headers
    finally:
        conn.close()


def knn(server: ClipBackServer, body: dict[str, Any]) -> Any:
    status, answer, _ = call(server.url, "POST", "/knn-service", body)
    assert status == 200, answer
    return answer


def refused(server: ClipBackServer, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, str]:
    status, answer, _ = call(server.url, "POST", path, body, raw)
    assert 400 <= status < 600 and status != 500, (status, answer)
    return status, answer["message"]


def raw_exchange(server: ClipBackServer, data: bytes, wait_s: float = 0.0) -> bytes:
    """Bytes sent on a bare socket (optionally then silence), and everything the server answers until it closes."""
    with socket.create_connection(server.server_address[:2], timeout=20) as s:
        s.sendall(data)
        time.sleep(wait_s)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


# ---- servers --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def running(server: ClipBackServer) -> Iterator[ClipBackServer]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def config(index_dir: Path, *extra: str) -> Any:
    return load_config([f"input={index_dir}", f"serve.name={NAME}", "serve.port=0", *extra])


@pytest.fixture(scope="module")
def server(index_dir: Path) -> Iterator[ClipBackServer]:
    """The default settings (private image URLs refused) on a free loopback port."""
    with running(make_server(config(index_dir))) as s:
        yield s


@contextlib.contextmanager
def variant(base: ClipBackServer, index_dir: Path, *settings: str) -> Iterator[ClipBackServer]:
    """Another server over the same loaded indices and model, with other serve.* settings."""
    cfg = config(index_dir, *settings)
    with running(ClipBackServer(ClipBack(list(base.api.served.values()), cfg.serve), cfg.serve)) as s:
        yield s


@pytest.fixture(scope="module")
def open_server(server: ClipBackServer, index_dir: Path) -> Iterator[ClipBackServer]:
    with variant(server, index_dir, "serve.allow_private_addresses=true") as s:
        yield s


@pytest.fixture(scope="module")
def web() -> Iterator[WebServer]:
    with web_server() as w:
        w.files["q.jpg"] = QUERY_JPEG
        yield w


@pytest.fixture(scope="module")
def ids(index_dir: Path) -> dict[str, dict[str, int]]:
    """key -> faiss id, per modality."""
    out = {}
    for modality in ("image", "text"):
        table = pq.read_table(index_dir / f"{modality}_ids.parquet").to_pydict()
        out[modality] = dict(zip(table["key"], table["id"]))
    return out


def stored(server: ClipBackServer, modality: str, faiss_id: int) -> list[float]:
    return [float(v) for v in server.api.served[NAME].searchers[modality].index.reconstruct(faiss_id)]


# ---- the API --------------------------------------------------------------------------------------------------


@slow
def test_indices_list_and_cors(server: ClipBackServer) -> None:
    assert server.server_address[0] == "127.0.0.1"  # loopback unless serve.host says otherwise
    status, answer, headers = call(server.url, "GET", "/indices-list")
    assert status == 200 and answer == [NAME]
    assert headers["content-type"] == "application/json" and headers["access-control-allow-origin"] == "*"
    status, _, headers = call(server.url, "OPTIONS", "/knn-service")  # a browser page's preflight
    assert status == 204 and "POST" in headers["access-control-allow-methods"]


@slow
def test_text_query_as_clip_client_sends_it(server: ClipBackServer, ids: dict[str, dict[str, int]]) -> None:
    results = knn(server, clip_client_body(text=CAPTION, num_images=3))
    assert len(results) == 3 and all(list(r) == ["url", "caption", "id", "similarity"] for r in results)
    assert results[0]["id"] == ids["image"][TEXT_KEY] and results[0]["caption"] == CAPTION
    assert results[0]["url"] == "http://127.0.0.1/00001/7.jpg" and results[0]["similarity"] > 0.99
    sims = [r["similarity"] for r in results]
    assert sims == sorted(sims, reverse=True)


@slow
def test_front_end_search_then_metadata_as_it_scrolls(server: ClipBackServer) -> None:
    results = knn(server, front_body(text=CAPTION, num_images=5, num_result_ids=20, deduplicate=False))
    assert len(results) == 20
    assert all(set(r) == {"url", "caption", "id", "similarity"} for r in results[:5])
    assert all(set(r) == {"id", "similarity"} for r in results[5:])  # clip back: metadata of num_images only
    more = [r["id"] for r in results[5:10]]
    status, answer, _ = call(server.url, "POST", "/metadata", {"ids": more, "indice_name": NAME})
    assert status == 200 and [a["id"] for a in answer] == more
    table = server.api.served[NAME].searchers["image"].ids.to_pydict()
    assert [a["metadata"] for a in answer] == [{"url": table["url"][i], "caption": table["caption"][i]} for i in more]
    assert call(server.url, "POST", "/metadata", {"ids": [], "indice_name": NAME})[:2] == (200, [])


@slow
def test_image_as_base64(server: ClipBackServer, ids: dict[str, dict[str, int]]) -> None:
    encoded = base64.b64encode(QUERY_JPEG).decode()
    for image in (encoded, f"data:image/jpeg;base64,{encoded}"):  # ClipClient's, and a browser's data URL
        top = knn(server, clip_client_body(image=image, num_images=2))[0]
        assert top["id"] == ids["image"][IMAGE_KEY] and top["similarity"] > 0.99
    status, message = refused(server, "/knn-service", clip_client_body(image=base64.b64encode(b"no image").decode()))
    assert status == 400 and "decode_error" in message
    bomb = base64.b64encode(png_header(20_000, 20_000)).decode()
    status, message = refused(server, "/knn-service", clip_client_body(image=bomb))
    assert status == 400 and "too_large" in message and "serve.max_pixels" in message


@slow
def test_image_url_fetched_when_private_addresses_are_allowed(
    open_server: ClipBackServer, web: WebServer, ids: dict[str, dict[str, int]]
) -> None:
    top = knn(open_server, clip_client_body(image_url=f"{web.base}/f/q.jpg", num_images=2))[0]
    assert top["id"] == ids["image"][IMAGE_KEY] and top["similarity"] > 0.99
    assert web.requests["/f/q.jpg"] >= 1
    status, message = refused(open_server, "/knn-service", clip_client_body(image_url=f"{web.base}/status/404"))
    assert status == 502 and "404" in message
    status, message = refused(open_server, "/knn-service", clip_client_body(image_url="http://169.254.169.254/x"))
    assert status == 400 and "metadata endpoint" in message  # always refused, whatever is allowed


@slow
def test_private_and_file_urls_refused_by_default(server: ClipBackServer, web: WebServer, tmp_path: Path) -> None:
    status, message = refused(server, "/knn-service", clip_client_body(image_url=f"{web.base}/f/private.jpg"))
    assert status == 400 and "loopback" in message and web.requests["/f/private.jpg"] == 0
    with watched_fifo(tmp_path / "fifo") as opened:
        status, message = refused(server, "/knn-service", clip_client_body(image_url=f"file://{tmp_path}/fifo"))
        time.sleep(0.2)
    assert status == 400 and "scheme refused" in message and not opened
    status, message = refused(server, "/knn-service", clip_client_body(image_url="ftp://127.0.0.1/x.jpg"))
    assert status == 400 and "scheme refused" in message


@slow
def test_embedding_input(server: ClipBackServer, ids: dict[str, dict[str, int]]) -> None:
    vector = stored(server, "image", ids["image"][IMAGE_KEY])
    top = knn(server, clip_client_body(embedding_input=vector, num_images=1))
    assert len(top) == 1 and top[0]["id"] == ids["image"][IMAGE_KEY] and top[0]["similarity"] == pytest.approx(1, 1e-3)
    status, message = refused(server, "/knn-service", clip_client_body(embedding_input=vector[:8]))
    assert status == 400 and "32-d" in message
    status, message = refused(server, "/knn-service", clip_client_body(embedding_input=["a"] * 32))
    assert status == 400 and "numbers" in message
    nan = json.dumps(clip_client_body(embedding_input=[0.0] * 32)).replace("0.0]", "NaN]", 1).encode()
    status, message = refused(server, "/knn-service", raw=nan)  # Python's json writes NaN: not finite
    assert status == 400 and "finite" in message


@slow
def test_text_index_and_one_sample_id_space(server: ClipBackServer, ids: dict[str, dict[str, int]]) -> None:
    text_first = knn(server, clip_client_body(text=CAPTION, modality="text", num_images=1))[0]
    assert text_first["id"] == ids["image"][TEXT_KEY] and text_first["caption"] == CAPTION  # the sample's image id
    offset = len(ids["image"])
    vector = stored(server, "text", ids["text"][NO_IMAGE_KEY])
    top = knn(server, clip_client_body(embedding_input=vector, modality="text", num_images=1))[0]
    assert top["id"] == offset + ids["text"][NO_IMAGE_KEY] and top["caption"] == "caption 00000 20"
    status, answer, _ = call(server.url, "POST", "/metadata", {"ids": [top["id"]], "indice_name": NAME})
    assert status == 200 and answer[0]["metadata"]["caption"] == "caption 00000 20"


@slow
def test_deduplicate(server: ClipBackServer, ids: dict[str, dict[str, int]]) -> None:
    first, second = (ids["image"][k] for k in DUPLICATE_KEYS)
    body = clip_client_body(embedding_input=stored(server, "image", first), num_images=5)
    plain = knn(server, {**body, "deduplicate": False})
    assert [r["id"] for r in plain[:2]] == [first, second] and len(plain) == 5
    deduped = knn(server, body)
    assert [r["id"] for r in deduped] == [r["id"] for r in plain if r["id"] != second]


@slow
def test_bad_requests_are_answered_4xx(server: ClipBackServer) -> None:
    assert refused(server, "/knn-service", raw=b"{not json")[0] == 400
    status, message = refused(server, "/knn-service", clip_client_body(text="a", indice_name="laion"))
    assert status == 400 and "served: clipline" in message
    assert refused(server, "/knn-service", clip_client_body())[0] == 400
    assert refused(server, "/metadata", {"ids": [10_000], "indice_name": NAME})[0] == 400
    assert refused(server, "/metadata", {"ids": ["a"]})[0] == 400
    status, answer, _ = call(server.url, "GET", "/")
    assert status == 404 and "/knn-service" in answer["message"]
    assert call(server.url, "GET", "/knn-service")[0] == 405
    assert b"400" in raw_exchange(server, b"\x16\x03\x01 not http\r\n\r\n")  # the stdlib's own answer
    assert knn(server, clip_client_body(text=CAPTION, num_images=1))[0]["caption"] == CAPTION  # still serving


@slow
def test_request_size_and_result_count_caps(server: ClipBackServer, index_dir: Path) -> None:
    with variant(server, index_dir, "serve.max_results=10", "serve.max_request_bytes=4096") as capped:
        for counts in ({"num_images": 11, "num_result_ids": 5}, {"num_images": 5, "num_result_ids": 11}):
            status, message = refused(capped, "/knn-service", clip_client_body(text="a", **counts))
            assert status == 400 and f"{next(k for k, v in counts.items() if v == 11)}=11" in message
            assert "serve.max_results=10" in message
        assert len(knn(capped, clip_client_body(text="a", num_images=10, deduplicate=False))) == 10
        assert refused(capped, "/metadata", {"ids": list(range(11)), "indice_name": NAME})[0] == 400
        big = clip_client_body(image=base64.b64encode(os.urandom(6000)).decode())
        status, message = refused(capped, "/knn-service", big)  # answered, not reset, although the body is unread
        assert status == 413 and "serve.max_request_bytes=4096" in message
        chunked = b'POST /knn-service HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\n'
        assert raw_exchange(capped, chunked).startswith(b"HTTP/1.0 411")
    with variant(server, index_dir, "serve.max_connections=1") as single:
        with socket.create_connection(single.server_address[:2]):  # accepted first, says nothing: holds the slot
            status, message = refused(single, "/knn-service", clip_client_body(text="a"))
            assert status == 503 and "serve.max_connections" in message
        for _ in range(200):  # the slot is given back once its handler sees that connection end
            if call(single.url, "GET", "/indices-list")[0] == 200:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the connection slot was never given back")


class _StuckAPI:
    """An API whose searches last until released: longer than the server's timeout."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def indices_list(self) -> list[str]:
        return [NAME]

    def knn(self, req: KnnRequest, deadline: float) -> list[Any]:
        self.release.wait(10)
        return []


@slow
def test_every_request_has_one_deadline(server: ClipBackServer, index_dir: Path, web: WebServer) -> None:
    """Each answer below could only come from the deadline: the work, the image server and the client never end."""
    cfg = config(index_dir, "serve.timeout_s=1")
    stuck = _StuckAPI()
    with running(ClipBackServer(stuck, cfg.serve)) as stuck_server:  # type: ignore[arg-type]
        status, message = refused(stuck_server, "/knn-service", clip_client_body(text="a"))
        assert status == 503 and "serve.timeout_s=1" in message and not stuck.release.is_set()
        stuck.release.set()
    with variant(server, index_dir, "serve.timeout_s=1", "serve.allow_private_addresses=true") as quick:
        status, message = refused(quick, "/knn-service", clip_client_body(image_url=f"{web.base}/stall"))
        assert status == 504 and "timed out" in message and "serve.timeout_s=1s" in message
        answer = raw_exchange(quick, b'POST /knn-service HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"text":')
        assert answer.startswith(b"HTTP/1.0 408")  # a client that stops sending its body


@slow
def test_one_log_line_per_request(server: ClipBackServer, caplog: pytest.LogCaptureFixture) -> None:
    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "pipeline.query.backserver"]

    with caplog.at_level(logging.INFO, logger="pipeline.query.backserver"):
        call(server.url, "GET", "/indices-list")
        knn(server, clip_client_body(text=CAPTION, num_images=1))
        refused(server, "/knn-service", clip_client_body(text="a", indice_name="nope"))
        for _ in range(100):  # each line is written once its answer is sent: maybe after the client has read it
            if len(lines()) >= 3:
                break
            time.sleep(0.02)
    found = sorted(lines(), key=lambda line: ("GET" not in line, " 400 " in line))
    assert len(found) == 3
    assert '"GET /indices-list HTTP/1.1" 200' in found[0]
    assert '"POST /knn-service HTTP/1.1" 200' in found[1] and "text -> clipline/image k=1" in found[1]
    assert '"POST /knn-service HTTP/1.1" 400' in found[2] and CAPTION not in " ".join(found)  # queries not logged


# ---- configuration, foreign embeddings, the command -----------------------------------------------------------


@slow
def test_config_is_checked_before_serving(index_dir: Path, tmp_path: Path) -> None:
    from pipeline.cli.main import main

    for extra, message in [
        ([f"input=[{index_dir}, {index_dir}]"], "one index folder"),
        ([f"serve.indices.{NAME}={index_dir}"], "that name is input="),
        ([f"input={tmp_path}"], "holds no index"),
        (["input=null", "serve.name=x"], "serve.name"),
        (["serve.host="], "serve.host"),
    ]:
        with pytest.raises(ConfigError, match=message):
            make_server(config(index_dir, *extra))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    with taken, pytest.raises(ConfigError, match="cannot listen"):
        make_server(config(index_dir, f"serve.port={taken.getsockname()[1]}"))
    assert main(["serve", f"input={index_dir}", "distributor=spark"]) == 2


@slow
def test_non_loopback_host_is_served_only_when_named_and_warned(
    index_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline.query.serve"):
        server = make_server(config(index_dir, "serve.host=0.0.0.0"))
        server.server_close()
    assert server.server_address[0] == "0.0.0.0"
    assert any("not a loopback address" in r.getMessage() for r in caplog.records)


@slow
def test_index_of_foreign_embeddings_served_with_model_given(tmp_path: Path, tiny_model: dict[str, str]) -> None:
    data = make_samples(n_shards=2, per_shard=40, dim=32)
    folder = write_clip_retrieval(str(tmp_path / "cr"), data)
    fmt = ["embeddings.input_format=clip-retrieval", "embeddings.key_column=key"]
    build(
        load_config(
            [
                f"input={folder}",
                f"output={tmp_path / 'ix'}",
                "index.recall_queries=10",
                "embeddings.record_model=false",
                *fmt,
            ]
        )
    )
    served = [f"input={tmp_path / 'ix'}", "serve.name=cr", "serve.port=0", "serve.columns=[key, caption]"]
    with running(make_server(load_config([*served, *overrides(tiny_model), "model.pretrained=null"]))) as s:
        assert len(knn(s, clip_client_body(text="a photo", indice_name="cr", num_images=3))) == 3
        top = knn(s, clip_client_body(embedding_input=data.img["00000"][3].tolist(), indice_name="cr"))[0]
        assert top == {
            "key": data.keys["00000"][3],
            "caption": data.captions["00000"][3],
            "id": 3,
            "similarity": pytest.approx(1, 1e-3),
        }
    with pytest.raises(ConfigError, match="512-d"):  # model.* left at its default: ViT-B-32 is not the 32-d model
        make_server(load_config(served))
    with running(make_server(load_config([*served, "serve.require_model=false"]))) as s:
        assert knn(s, clip_client_body(embedding_input=data.img["00000"][3].tolist(), indice_name="cr"))[0]["id"] == 3
        status, message = refused(s, "/knn-service", clip_client_body(text="a photo", indice_name="cr"))
        assert status == 400 and "not loaded" in message


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@slow
def test_serve_cli_stops_cleanly_on_sigterm(index_dir: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    asked: list[int] = []

    def client() -> None:
        for _ in range(200):
            try:
                asked.append(call(url, "GET", "/indices-list")[0])
                break
            except OSError:
                time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=client, daemon=True).start()
    summary = serve_cli(config(index_dir, f"serve.port={port}"))
    assert asked == [200] and summary["answers"] == {"200": 1} and summary["indices"] == [NAME]
    assert signal.getsignal(signal.SIGTERM) is before


@slow
def test_clipline_serve_command_until_sigint(index_dir: Path, repo_root: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "serve", f"input={index_dir}", "serve.port=0", "serve.name=cmd"],
        cwd=repo_root,
        env={**os.environ, "PYTHONPATH": str(repo_root)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        url = None
        for line in proc.stderr:
            if "serving cmd at " in line:
                url = line.split("serving cmd at ", 1)[1].split()[0]
                break
        assert url is not None, "the server never said where it listens"
        assert call(url, "GET", "/indices-list")[:2] == (200, ["cmd"])
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "== serve ==" in out and "answers: 200=1" in out
    assert '"GET /indices-list HTTP/1.1" 200' in err


# ---- ClipClient itself ----------------------------------------------------------------------------------------


@slow
def test_clip_client_itself(
    server: ClipBackServer, open_server: ClipBackServer, web: WebServer, index_dir: Path, ids: dict[str, dict[str, int]]
) -> None:
    cc = clip_client_module()
    client = cc.ClipClient(url=f"{server.url}/knn-service", indice_name=NAME, num_images=3)
    results = client.query(text=CAPTION)
    assert len(results) == 3 and results[0]["caption"] == CAPTION and results[0]["id"] == ids["image"][TEXT_KEY]
    image_path = str(index_dir.parent.parent / "query.jpg")
    assert client.query(image=image_path)[0]["id"] == ids["image"][IMAGE_KEY]  # sent as base64
    vector = stored(server, "image", ids["image"][IMAGE_KEY])
    assert client.query(embedding_input=vector)[0]["id"] == ids["image"][IMAGE_KEY]
    texts = cc.ClipClient(f"{server.url}/knn-service", NAME, modality=cc.Modality.TEXT, num_images=1)
    assert texts.query(text=CAPTION)[0]["id"] == ids["image"][TEXT_KEY]
    fetching = cc.ClipClient(url=f"{open_server.url}/knn-service", indice_name=NAME, num_images=2)
    assert fetching.query(image=f"{web.base}/f/q.jpg")[0]["id"] == ids["image"][IMAGE_KEY]  # sent as image_url
    assert "loopback" in client.query(image=f"{web.base}/f/q.jpg")["message"]  # refused by default
