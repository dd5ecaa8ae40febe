"""The README's main command: `clipline demo` end to end, offline, with results checked against the planted truth,
its report written, and a console that shows only clipline's own lines. The demo runs once per session (the
`demo_run` fixture in tests/conftest.py)."""

from __future__ import annotations

import json
import posixpath
import re
from pathlib import Path

import pandas as pd
import pytest

from pipeline.query.search import Searcher
from tests.conftest import DemoRun
from tests.support.console import foreign_lines

pytestmark = pytest.mark.slow


def test_every_stage_wrote_its_outputs(demo: Path) -> None:
    assert sorted(p.name for p in (demo / "shards").glob("*.tar"))
    assert json.loads((demo / "embeddings" / "manifest.json").read_text())["model"]["family"] == "offline"
    for f in ("image.index", "image.json", "image_ids.parquet", "text.index"):
        assert (demo / "embeddings" / "index" / f).exists(), f
    for f in ("duplicates.parquet", "keep.parquet", "drop.parquet", "summary.json", "similarity_hist.png"):
        assert (demo / "embeddings" / "dedup" / f).exists(), f
    run = json.loads((demo / "run.json").read_text())
    assert run["exit_status"] == 0 and run["summary"]["cat_query_top5_cat_photos"] >= 3


def test_every_url_accounted_for(demo: Path) -> None:
    truth = json.loads((demo / "source" / "truth.json").read_text())
    rows = pd.concat(pd.read_parquet(p) for p in (demo / "shards").glob("*.parquet"))
    assert len(rows) == truth["n_urls"]
    failed = {posixpath.basename(u) for u in rows.loc[rows["status"] != "success", "url"]}
    assert failed == set(truth["broken"])


def test_cat_query_returns_cat_photos_first(demo: Path, demo_searcher: Searcher) -> None:
    truth = json.loads((demo / "source" / "truth.json").read_text())
    top = demo_searcher.search_text(["a photo of a cat"], k=3)
    assert all(posixpath.basename(u) in truth["cat_photos"] for u in top["url"])


def test_planted_near_duplicates_come_out_as_groups(demo: Path) -> None:
    truth = json.loads((demo / "source" / "truth.json").read_text())
    dup = pd.read_parquet(demo / "embeddings" / "dedup" / "duplicates.parquet")
    meta = pd.concat(pd.read_parquet(p) for p in (demo / "embeddings" / "metadata").glob("*.parquet"))
    name_of = dict(zip(meta["key"], meta["url"].map(posixpath.basename)))
    group_of = {name_of[k]: g for k, g in zip(dup["key"], dup["group_id"])}
    for planted in truth["near_duplicate_groups"]:
        groups = [group_of.get(n) for n in planted]
        # the original and at least its re-encode and resize land in one group
        assert groups[0] is not None and groups.count(groups[0]) >= 3, planted
    keep = pd.read_parquet(demo / "embeddings" / "dedup" / "keep.parquet")
    kept_groups = dup[dup["kept"]]["group_id"]
    assert kept_groups.is_unique and set(dup[dup["kept"]]["key"]) <= set(keep["key"])


def test_writes_the_report_and_ends_with_the_path_to_open(demo_run: DemoRun) -> None:
    page = demo_run.root / "report.html"
    assert demo_run.stdout.rstrip("\n").splitlines()[-1] == f"  report: {page}"
    html = page.read_text()
    sections = re.findall(r'<section id="([^"]+)">', html)
    assert {"counts", "similarity", "groups", "queries", "index", "provenance"} <= set(sections)
    assert 'class="error"' not in html and 'class="missing"' not in html  # every stage ran: nothing missing
    # the report's own lines came before the summary: the page and each section's state
    assert f"report: {page}" in demo_run.stdout and all(f"  {s}: ok" in demo_run.stdout for s in sections)


def test_console_shows_only_clipline_log_lines(demo_run: DemoRun) -> None:
    """No faiss.loader lines, no autofaiss INFO, no progress bars or prints of img2dataset or transformers, no
    leaked-semaphore warning at exit: only clipline's records on stderr."""
    assert "pipeline.run.demo: serving the demo images" in demo_run.stderr  # clipline's own INFO lines stay
    assert foreign_lines(demo_run.stderr) == []
