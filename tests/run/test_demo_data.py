"""The offline demo dataset: deterministic, with the planted near-duplicates, the cat photo and broken URLs."""

from __future__ import annotations

import hashlib
import io
import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.run.demo_data import CAT_CAPTION, DemoData, build_demo_dataset, plan_items, write_url_list
from pipeline.run.httpserver import serve_directory


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoData:
    return build_demo_dataset(tmp_path_factory.mktemp("demo"))


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _pixels(path: Path, size: int = 16) -> np.ndarray:
    img = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float32) / 255


def test_default_size_and_url_list(demo: DemoData) -> None:
    table = pq.read_table(demo.url_list).to_pylist()
    assert 150 <= len(table) <= 200 and demo.truth["n_urls"] == len(table)
    assert {r["url"] for r in table} == set(demo.truth["items"])  # every planted file has a URL, once
    assert all(r["caption"] for r in table)
    served = {p.name for p in demo.images_dir.iterdir()}
    assert served == {r["url"] for r in table} - {n for n, k in demo.truth["broken"].items() if k == "404"}
    assert json.loads(demo.truth_path.read_text()) == demo.truth  # type: ignore[union-attr]


def test_deterministic(demo: DemoData, tmp_path: Path) -> None:
    again = build_demo_dataset(tmp_path / "again")
    assert _digests(again.images_dir) == _digests(demo.images_dir)
    assert pq.read_table(again.url_list).equals(pq.read_table(demo.url_list))
    assert again.truth == demo.truth


def test_cat_photo(demo: DemoData) -> None:
    rows = {r["url"]: r["caption"] for r in pq.read_table(demo.url_list).to_pylist()}
    cats = demo.truth["cat_photos"]
    assert "chelsea.jpg" in cats and rows["chelsea.jpg"] == CAT_CAPTION == "a photo of a cat"
    assert all("cat" in rows[n] for n in cats) and len(cats) >= 5
    assert not any("cat" in c.split() for n, c in rows.items() if n not in cats)
    img = Image.open(demo.images_dir / "chelsea.jpg")
    assert img.format == "JPEG" and min(img.size) >= 200


def test_planted_near_duplicates_are_close_and_variants_are_not(demo: DemoData) -> None:
    groups = demo.truth["near_duplicate_groups"]
    assert len(groups) >= 4 and all(len(g) >= 4 for g in groups)
    for group in groups:
        original = _pixels(demo.images_dir / group[0])
        dup = max(np.abs(_pixels(demo.images_dir / m) - original).mean() for m in group[1:])
        src = demo.truth["items"][group[0]]["source"]
        crop = np.abs(_pixels(demo.images_dir / f"{src}_crop.jpg") - original).mean()
        assert dup < 0.065 and dup < 0.5 * crop, (group, dup, crop)  # a variant is a different picture
    ((a, b),) = demo.truth["exact_duplicate_groups"]
    assert (demo.images_dir / a).read_bytes() == (demo.images_dir / b).read_bytes()


def test_broken_urls(demo: DemoData) -> None:
    broken = demo.truth["broken"]
    kinds = sorted(set(broken.values()))
    assert kinds == ["404", "empty", "not_image"] and sum(k == "404" for k in broken.values()) >= 3
    for name, kind in broken.items():
        path = demo.images_dir / name
        if kind == "404":
            assert not path.exists()
        else:
            with pytest.raises(OSError):  # PIL.UnidentifiedImageError
                Image.open(io.BytesIO(path.read_bytes())).load()


def test_served_with_absolute_urls(demo: DemoData) -> None:
    with serve_directory(demo.images_dir) as base:
        out = write_url_list(demo, base)
        urls = pq.read_table(out).column("url").to_pylist()
        assert out != demo.url_list and all(u.startswith(base + "/") for u in urls)
        assert pq.read_table(out).column("caption").equals(pq.read_table(demo.url_list).column("caption"))
        cat = next(u for u in urls if u.endswith("/chelsea.jpg"))
        assert urllib.request.urlopen(cat, timeout=5).read() == (demo.images_dir / "chelsea.jpg").read_bytes()
        missing = next(u for u in urls if u.endswith("/missing_0.jpg"))
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(missing, timeout=5)


def test_smaller_demo_keeps_planted_items(tmp_path: Path, demo: DemoData) -> None:
    required, _ = plan_items()
    small = build_demo_dataset(tmp_path / "small", n_images=len(required) + 5)
    assert small.truth["n_urls"] == len(required) + 5
    assert small.truth["near_duplicate_groups"] == demo.truth["near_duplicate_groups"]
    assert small.truth["broken"] == demo.truth["broken"]
    for name in small.truth["items"]:  # a file's bytes do not depend on the demo size
        if (small.images_dir / name).exists():
            assert (small.images_dir / name).read_bytes() == (demo.images_dir / name).read_bytes()
    with pytest.raises(ValueError, match="at least"):
        build_demo_dataset(tmp_path / "tiny", n_images=3)
