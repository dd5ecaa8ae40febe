"""Shared fixtures; everything is generated in tmp paths and nothing touches the network."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.support.helpers import make_tiny_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# Session fixtures that cost seconds to minutes, and the test files that use them: each group of files runs on one
# xdist worker, so the fixture is built once per run instead of once per worker (pytest_xdist_make_scheduler).
SHARED_FIXTURES = {"demo_run": "demo", "demo": "demo", "demo_searcher": "demo", "index_dir": "query-index"}
GROUP_FILES = {
    "demo": ("tests/cli/test_commands.py", "tests/report/test_page.py", "tests/run/test_demo.py",
             "tests/run/test_demo_data.py", "tests/test_notebooks.py"),
    "query-index": ("tests/query/test_search.py", "tests/query/test_serve.py"),
}  # fmt: skip
GROUP_OF_FILE = {f: group for group, files in GROUP_FILES.items() for f in files}


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's load-scope scheduling with a test file as the unit (its module-scoped fixtures are built once) and
    the files of GROUP_FILES as one unit each; largest units first. (`--dist loadgroup` would do it with markers,
    but xdist 3.8 renames node ids through an attribute pytest 9 no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class FileGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return GROUP_OF_FILE.get(file, file)

    return FileGroupScheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses a shared fixture must be in one of its group's files, or the fixture is built twice."""
    for item in items:
        file = str(item.path.relative_to(REPO))
        for name in set(getattr(item, "fixturenames", ())) & set(SHARED_FIXTURES):
            if GROUP_OF_FILE.get(file) != SHARED_FIXTURES[name]:
                raise pytest.UsageError(
                    f"{item.nodeid} uses {name}: add {file} to GROUP_FILES[{SHARED_FIXTURES[name]!r}]"
                )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Overrides that load a random-weight tiny open_clip model through the checkpoint path."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test that calls setup_logging (main() in-process does) leaves logging as it found it: afterwards, drop
    the handler bound to the test's captured stderr (closed then) but keep pytest's own, and restore the root level
    (log_level=ERROR in one test must not hide the next test's warnings from caplog) and TQDM_DISABLE."""
    import logging

    root = logging.getLogger()
    level, before = root.level, list(root.handlers)
    monkeypatch.setitem(os.environ, "TQDM_DISABLE", "restored after the test")
    del os.environ["TQDM_DISABLE"]
    yield
    for handler in root.handlers:
        if handler not in before and type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    root.setLevel(level)


@dataclass(frozen=True)
class DemoRun:
    """One finished `clipline demo`: its output root and what the command printed (stdout: summaries and the report
    path; stderr: the log)."""

    root: Path
    stdout: str
    stderr: str


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    """`clipline demo` run once per session (about a minute) as a user runs it, in its own process, for every test
    that reads a demo output (tests/run/test_demo.py, tests/report/test_page.py, tests/test_notebooks.py).

    Shared, so read only: a test that must write into a demo output copies it first (shutil.copytree into its
    tmp_path). The teardown fails the session when any file under the root was added, removed or rewritten."""
    root = tmp_path_factory.mktemp("demo") / "run"
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "demo", str(root)], cwd=REPO, capture_output=True, text=True
    )
    assert r.returncode == 0, f"clipline demo exited {r.returncode}:\n{r.stderr[-4000:]}"
    before = _snapshot(root)
    yield DemoRun(root, r.stdout, r.stderr)
    assert _snapshot(root) == before, "a test changed the shared demo output: copy it to tmp_path first"


@pytest.fixture(scope="session")
def demo(demo_run: DemoRun) -> Path:
    """The shared demo output root (read only, see demo_run)."""
    return demo_run.root


@pytest.fixture(scope="session")
def demo_searcher(demo: Path) -> Any:
    """A Searcher on the demo's image index with its model loaded, once: loading the offline model costs 10-40 s,
    and several tests query the demo (pass `demo_searcher.model` where a test builds its own Searcher)."""
    from pipeline.query.search import Searcher

    searcher = Searcher(str(demo / "embeddings" / "index"))
    assert searcher.model is not None
    return searcher
