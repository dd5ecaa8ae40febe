"""`clipline serve`: clip-retrieval's clip back HTTP API over index folders, for ClipClient scripts and
clip-retrieval's front end (docs/FORMAT.md, "Serving to clip-retrieval's tools"): which folders under which names,
everything loaded before listening, loopback unless serve.host names another address, until SIGINT or SIGTERM.
The API is clipback.py's, the names served.py's, the HTTP backserver.py's.
"""

from __future__ import annotations

import ipaddress
import logging
import posixpath
import signal
import socket
import threading
import time
from typing import Any

from pipeline.core.config import Config
from pipeline.core.errors import ConfigError
from pipeline.query.backserver import ENDPOINTS, ClipBackServer
from pipeline.query.clipback import ClipBack
from pipeline.query.served import ServedIndex

log = logging.getLogger(__name__)


def served_folders(cfg: Config) -> dict[str, str]:
    """name -> index folder: input= (under serve.name, else its folder's name), then serve.indices in order."""
    if isinstance(cfg.input, list):
        raise ConfigError("input: one index folder (serve more under names with serve.indices.NAME=FOLDER)")
    folders: dict[str, str] = {}
    if cfg.input:
        folders[cfg.serve.name or posixpath.basename(cfg.input.rstrip("/")) or cfg.input] = cfg.input
    elif cfg.serve.name:
        raise ConfigError("serve.name: names the index folder of input=, which is not given")
    for name, folder in cfg.serve.indices.items():
        if name in folders:
            raise ConfigError(f"serve.indices.{name}: that name is input='s already (give it another serve.name)")
        folders[name] = folder
    if not folders:
        raise ConfigError(
            "missing required value: input= (an index folder, for example input=/data/emb/index) or "
            "serve.indices.NAME=FOLDER"
        )
    return folders


def make_server(cfg: Config) -> ClipBackServer:
    """Load every served index and its model, then listen (nothing is answered before serve_forever())."""
    served = []
    for name, folder in served_folders(cfg).items():
        try:
            served.append(ServedIndex(name, folder, cfg.model, cfg.serve.require_model))
        except (FileNotFoundError, RuntimeError) as e:  # unreadable, or index and id map disagree
            raise ConfigError(f"serve: {name} ({folder}): {e}") from e
        for modality, s in served[-1].searchers.items():
            log.info(
                "%s: %s index of %d vectors (%s) from %s",
                name,
                modality,
                s.index.ntotal,
                s.info.get("index_key"),
                folder,
            )
    server = ClipBackServer(ClipBack(served, cfg.serve), cfg.serve)
    if not _is_loopback(cfg.serve.host):
        log.warning(
            "serve.host=%s is not a loopback address: other machines can query these indices and make this "
            "one fetch image URLs, with no authentication",
            cfg.serve.host,
        )
    return server


def _is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return all(ipaddress.ip_address(str(i[4][0]).split("%", 1)[0]).is_loopback for i in infos)


def serve_cli(cfg: Config) -> dict[str, Any]:
    """`clipline serve input=INDEX_DIR`: answer clip back's API until SIGINT or SIGTERM, then finish the requests in
    flight and return the summary. Call it from the main thread (signal handlers)."""
    server = make_server(cfg)
    stopping = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        if not stopping.is_set():
            stopping.set()
            log.info("%s: finishing the requests in flight, then stopping", signal.Signals(signum).name)
            threading.Thread(target=server.shutdown, name="clipline-serve-stop", daemon=True).start()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    started = time.monotonic()
    try:
        log.info("serving %s at %s (%s)", ", ".join(server.api.indices_list()), server.url, ENDPOINTS)
        server.serve_forever(poll_interval=0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        server.server_close()
    return {
        "url": server.url,
        "indices": server.api.indices_list(),
        "answers": {str(code): n for code, n in sorted(server.answers.items())},
        "seconds": round(time.monotonic() - started, 1),
    }
