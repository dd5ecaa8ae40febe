"""`clipline report`: the demo's report holds every section with numbers that match the data, plots and thumbnails
are embedded, missing stages are said, broken parts fail the job; a headless Chromium screenshot is not blank."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.core.config import load_config
from pipeline.core.errors import JobFailed
from pipeline.report import runoutput
from pipeline.report.page import REPORT_FILE, report_cli, section_queries, sections
from pipeline.report.runoutput import RunOutput
from pipeline.report.sections import section_similarity
from tests.conftest import DemoRun
from tests.support.helpers import random_unit, write_fake_embed_output

SECTIONS = [anchor for anchor, _, _ in sections(None)]


@pytest.fixture(scope="module")
def page(demo_run: DemoRun) -> dict[str, str]:
    """The report `clipline demo` wrote (the page of `clipline report` on the demo output) and what it printed."""
    html = (demo_run.root / REPORT_FILE).read_text()
    found = dict(re.findall(r'<section id="([^"]+)">(.*?)</section>', html, flags=re.S))
    return {"printed": demo_run.stdout, "html": html, **found}


def _cells(fragment: str) -> dict[str, str]:
    """First two cells of every table row, as label -> value."""
    return {a: b for a, b in re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td>", fragment)}


def _num(text: str) -> float:
    return float(text.replace(",", ""))


def _meta(demo: Path) -> pd.DataFrame:
    return pd.concat(pd.read_parquet(p) for p in sorted((demo / "embeddings" / "metadata").glob("*.parquet")))


@pytest.mark.slow
def test_every_section_is_present_with_data(page: dict[str, str]) -> None:
    assert any(line.startswith("report: ") and line.endswith("/report.html") for line in page["printed"].splitlines())
    for anchor in SECTIONS:
        assert anchor in page, anchor
        assert 'class="missing"' not in page[anchor] and 'class="error"' not in page[anchor], anchor
        assert f"{anchor}: ok" in page["printed"]


@pytest.mark.slow
def test_counts_match_the_data(page: dict[str, str], demo: Path) -> None:
    meta = _meta(demo)
    truth = json.loads((demo / "source" / "truth.json").read_text())
    cells = _cells(page["counts"])
    assert (
        _num(cells["embedded"])
        == (meta["status"] == "ok").sum()
        == json.loads((demo / "embeddings" / "index" / "image.json").read_text())["ntotal"]
    )
    assert _num(cells["samples read"]) == len(meta) and _num(cells["embed failures"]) == (meta["status"] != "ok").sum()
    assert _num(cells["URLs in"]) == truth["n_urls"]
    assert _num(cells["images downloaded"]) + _num(cells["download failures"]) == truth["n_urls"]
    n404 = sum(v == "404" for v in truth["broken"].values())
    assert re.search(rf"<td>download</td><td>http 404</td><td>{n404}</td>", page["counts"])
    tp = page["throughput"]
    assert re.search(rf"<td>embed \(samples\)</td><td>\d+</td><td>{len(meta)}</td>", tp)
    clip = _cells(page["clip-score"])
    scored = meta.loc[(meta["status"] == "ok") & (meta["caption_status"] == "ok"), "clip_score"]
    assert _num(clip["samples scored"]) == len(scored)
    assert abs(_num(clip["p50"]) - float(scored.median())) < 1e-3


@pytest.mark.slow
def test_index_dedup_and_provenance_numbers(page: dict[str, str], demo: Path) -> None:
    info = json.loads((demo / "embeddings" / "index" / "image.json").read_text())
    assert re.search(rf"<td>image</td><td>{info['index_key']}</td><td>{info['ntotal']}</td>", page["index"])
    assert "recall@10" in page["index"] and "p99 latency ms" in page["index"]
    ds = json.loads((demo / "embeddings" / "dedup" / "summary.json").read_text())
    sim = _cells(page["similarity"])
    assert _num(sim["groups"]) == ds["groups"] and _num(sim["threshold"]) == ds["threshold"]
    assert f"{ds['samples_embedded']} of {ds['samples_embedded']} embedded images" in page["similarity"]
    assert "exact search over all of them" in page["similarity"]
    prov = page["provenance"]
    assert "efficientnet-lite0" in prov and "<td>numpy</td>" in prov and "resolved configuration" in prov
    for stage in ("download", "embed", "index", "dedup"):  # summary.json of the chain
        assert re.search(rf"<td>{stage}</td><td>ok</td><td>0</td>", prov), stage


@pytest.mark.slow
def test_plots_and_thumbnails_are_embedded(page: dict[str, str]) -> None:
    srcs = re.findall(r'<img[^>]* src="([^"]+)"', page["html"])
    assert srcs and all(s.startswith("data:image/") for s in srcs)  # opens offline: nothing to fetch
    pngs = [s for s in srcs if s.startswith("data:image/png;base64,")]
    assert len(pngs) >= 5  # failures, throughput, time split, clip score, similarity
    for s in pngs:
        im = Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1])))
        assert im.format == "PNG" and im.size[0] > 300
        assert np.asarray(im.convert("L")).std() > 5  # something was drawn


@pytest.mark.slow
def test_duplicate_groups_show_their_images(page: dict[str, str], demo: Path) -> None:
    dup = pd.read_parquet(demo / "embeddings" / "dedup" / "duplicates.parquet")
    sizes = dup.groupby("group_id").size().sort_values(ascending=False, kind="stable")
    groups = page["groups"]
    tiles = re.findall(r'<figure class="tile[^"]*">(.*?)</figure>', groups, flags=re.S)
    assert len(tiles) == sum(min(n, 8) for n in sizes.iloc[:6])
    assert all("data:image/jpeg;base64," in t for t in tiles)  # every thumbnail was found in its tar
    assert groups.count('class="tile kept"') == min(6, len(sizes))
    first = re.search(r"group (\d+): (\d+) samples", groups)
    assert first and int(first.group(2)) == sizes.iloc[0]
    sims = [float(x) for x in re.findall(r"<div>(0\.\d+|1\.0+) \((?:near|exact)\)</div>", groups)]
    assert sims and min(sims) >= 0.0 and max(sims) <= 1.0 + 1e-6


@pytest.mark.slow
def test_queries_given_by_the_user(demo: Path, demo_searcher: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.models

    # the section builds its own Searcher: give it the session's loaded model (its fingerprint is still checked)
    monkeypatch.setattr(pipeline.models, "load_model", lambda cfg: demo_searcher.model)
    html = section_queries(RunOutput(str(demo)), ["a photo of a cat"])
    assert "a photo of a cat" in html and "green marks" not in html  # not sampled captions
    captions = re.findall(r"<div>#\d+  [\d.]+</div><div>(.*?)</div>", html)
    assert len(captions) == 6 and "cat" in captions[0]
    assert html.count("data:image/jpeg;base64,") == 6


@pytest.mark.slow
def test_nearest_neighbour_similarities(demo: Path) -> None:
    out = RunOutput(str(demo))
    full = out.nn_similarities()
    ds = json.loads((demo / "embeddings" / "dedup" / "summary.json").read_text())
    assert len(full) == out.embedded == ds["samples_embedded"]
    # every grouped sample has a neighbour at or above the threshold, and only those (groups here are near-based)
    assert int((full >= ds["threshold"]).sum()) == ds["samples_in_groups"]
    sampled = out.nn_similarities(max_queries=50)
    assert 15 < len(sampled) < 100
    assert all(np.isclose(full, s, atol=1e-6).any() for s in sampled)


@pytest.mark.slow
def test_nearest_neighbours_through_the_index_on_big_outputs(demo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = RunOutput(str(demo))
    full = out.nn_similarities()
    monkeypatch.setattr(runoutput, "EXACT_NN_MAX", 10)
    assert not out.nn_exact()
    approx = out.nn_similarities(max_queries=40)
    assert len(approx) == 40
    assert all(np.isclose(full, s, atol=1e-4).any() for s in approx)  # the demo's index is exact (Flat)
    assert "approximate, searched in the image index" in section_similarity(out)


def test_missing_stages_are_said(tmp_path: Path) -> None:
    root = tmp_path / "partial"
    write_fake_embed_output(root / "embeddings", {"00000": random_unit(20, 16, seed=1)})
    text = report_cli(load_config([f"input={root}"]))
    html = (root / REPORT_FILE).read_text()
    assert "counts: partial" in text and "groups: missing" in text and "queries: missing" in text
    assert "No download output" in html and "No dedup output" in html and "No image index" in html
    assert "No run.json" in html and 'class="error"' not in html
    # an embed folder given directly, and an empty folder, render too
    assert "clip-score: ok" in report_cli(load_config([f"input={root / 'embeddings'}", f"output={tmp_path / 'r2'}"]))
    (tmp_path / "empty").mkdir()
    text = report_cli(load_config([f"input={tmp_path / 'empty'}"]))
    assert all(f"{a}: missing" in text for a in SECTIONS)


def test_a_broken_part_fails_the_job_but_the_page_is_written(tmp_path: Path) -> None:
    root = tmp_path / "broken"
    write_fake_embed_output(root / "embeddings", {"00000": random_unit(10, 16, seed=2)})
    (root / "embeddings" / "index").mkdir()
    (root / "embeddings" / "index" / "image.json").write_text("{not json")
    with pytest.raises(JobFailed, match="index") as e:
        report_cli(load_config([f"input={root}"]))
    assert "index" in e.value.summary["failed_sections"]
    html = (root / REPORT_FILE).read_text()
    assert 'class="error"' in html and "counts" in html


def _chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.slow
def test_screenshot_in_headless_chromium(page: dict[str, str], demo: Path, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary (apt-get install -y chromium)")
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,3000",
            (demo / REPORT_FILE).as_uri(),
        ],
        check=True,
        timeout=120,
        capture_output=True,
    )
    assert shot.stat().st_size > 50_000
    im = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert im.shape[:2] == (3000, 1200)
    assert im.std() > 20  # not a blank page
    not_white = (im.min(axis=2) < 240).mean()
    assert not_white > 0.05  # tables, plots and thumbnails cover part of the page
    assert (np.ptp(im, axis=2) > 60).mean() > 0.005  # colour: plots and photos, not only text
