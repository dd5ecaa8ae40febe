"""The console rules of pipeline/core/logs.py: clipline's own records at any level, other libraries' (named loggers
and open_clip's root-logger lines) only from WARNING up unless log_level=DEBUG; and timed()."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.logs import setup_logging, setup_worker_logging, timed

pytestmark = pytest.mark.usefixtures("restore_logging")


def _emit_all() -> None:
    logging.getLogger("pipeline.embed.stage").info("own info")
    logging.getLogger("pipeline.index.stage").debug("own debug")
    logging.getLogger("clipline").info("command info")
    logging.getLogger("faiss.loader").info("Loading faiss with AVX2 support.")
    logging.getLogger("autofaiss").info("Launching the whole pipeline")
    logging.info("Parsing model identifier. Schema: None")  # open_clip logs through the root logger
    logging.getLogger("autofaiss").warning("library warning")
    logging.getLogger("py4j.clientserver").debug("Command to send: c")


@pytest.mark.parametrize("setup", [setup_logging, setup_worker_logging])
def test_only_own_records_below_warning(setup: object, capsys: pytest.CaptureFixture[str]) -> None:
    setup("INFO")  # type: ignore[operator]
    _emit_all()
    err = capsys.readouterr().err
    assert "own info" in err and "command info" in err and "library warning" in err
    assert "own debug" not in err  # the level still applies to clipline's own records
    for noise in ("Loading faiss", "Launching the whole pipeline", "Parsing model identifier", "Command to send"):
        assert noise not in err, noise
    assert os.environ["TQDM_DISABLE"] == "1"  # stderr is not a terminal here: libraries' bars are off too


def test_debug_shows_libraries_too(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("DEBUG")
    _emit_all()
    err = capsys.readouterr().err
    for line in ("own debug", "Loading faiss", "Launching the whole pipeline", "root: Parsing model identifier"):
        assert line in err, line
    assert "Command to send" not in err  # py4j's per-call protocol lines stay off: they would bury the rest
    assert "TQDM_DISABLE" not in os.environ


def test_worker_lines_name_their_process(capsys: pytest.CaptureFixture[str]) -> None:
    setup_worker_logging("INFO")
    logging.getLogger("pipeline.embed.runner").info("loaded")
    assert " INFO [MainProcess] pipeline.embed.runner: loaded" in capsys.readouterr().err


def test_timed_logs_and_returns_the_seconds(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.test")
    with timed("the block", logging.getLogger("pipeline.test")) as took:
        pass
    assert took["seconds"] >= 0 and any(r.getMessage().startswith("the block took ") for r in caplog.records)


LEAK_PROBE = """
import multiprocessing, os, sys

def worker(fix):
    if fix:
        from pipeline.core.logs import setup_worker_logging

        setup_worker_logging("INFO")
    from tqdm import tqdm

    for _ in tqdm(range(3), disable=True):  # even a disabled bar makes tqdm's lock
        pass
    os._exit(0)  # how the local pool's workers leave (pipeline/distribute/local.py)

if __name__ == "__main__":
    p = multiprocessing.get_context("spawn").Process(target=worker, args=(sys.argv[1] == "fix",))
    p.start()
    p.join()
"""


@pytest.mark.parametrize("fix", [False, True])
def test_workers_leave_no_leaked_semaphore_warning(fix: bool, tmp_path: Path, repo_root: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(LEAK_PROBE)
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    r = subprocess.run([sys.executable, str(probe), "fix" if fix else "as-is"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    # without setup_worker_logging the probe shows the warning, so the check below can fail
    assert ("leaked semaphore" in r.stderr) is not fix, r.stderr
