"""Offline demo dataset: bundled sample photos, their variants, planted near-duplicates and broken URLs."""

from __future__ import annotations

import io
import json
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

SEED = 0
MAX_SIDE = 640  # big bundled photos (retina, hubble) are shrunk: the demo resizes to 256 anyway
CAT_CAPTION = "a photo of a cat"

# (source name, subject for captions). All of these ship inside scikit-image / matplotlib: no network.
SOURCES: list[tuple[str, str]] = [
    ("chelsea", "a cat"),
    ("astronaut", "an astronaut in a spacesuit"),
    ("coffee", "a cup of coffee"),
    ("rocket", "a rocket on a launch pad"),
    ("grace_hopper", "a woman in a navy uniform"),
    ("hubble_deep_field", "galaxies in deep space"),
    ("immunohistochemistry", "stained tissue under a microscope"),
    ("retina", "the retina of an eye"),
    ("colorwheel", "a colour wheel"),
    ("camera", "a man with a camera"),
    ("moon", "the surface of the moon"),
    ("coins", "old coins"),
    ("clock", "a clock"),
    ("brick", "a brick wall"),
    ("grass", "grass"),
    ("gravel", "gravel"),
    ("text", "printed text"),
    ("page", "a page of text"),
    ("cell", "a cell under a microscope"),
]
CAT_SOURCE = "chelsea"
DUP_SOURCES = ("chelsea", "astronaut", "coffee", "rocket", "grace_hopper")
EXACT_COPY_SOURCE = "coffee"

# Variants change the picture enough to be a different image (a region, a rotation, a tint...).
VARIANT_CAPTIONS = {
    "crop": "a cropped photo of {}",
    "flip_crop": "a mirrored close-up of {}",
    "tint": "a colour-tinted photo of {}",
    "gray": "a black and white photo of {}",
    "small": "a small low-resolution photo of {}",
    "rotate": "a sideways rotated photo of {}",
    "zoom": "a zoomed-in detail of {}",
}
# Planted near-duplicates: the same picture after a lossy step a crawler meets on the web.
DUP_KINDS = ("q30", "resize90", "crop3", "bright")
BROKEN = (
    [(f"missing_{i}.jpg", "404") for i in range(4)]
    + [(f"broken_html_{i}.jpg", "not_image") for i in range(3)]
    + [("broken_empty.jpg", "empty")]
)


@dataclass
class DemoData:
    """Where the demo dataset lives and what was planted in it."""

    url_list: Path  # parquet (url, caption) with URLs relative to the served folder; see write_url_list
    images_dir: Path  # the folder to serve over HTTP
    truth: dict[str, Any] = field(default_factory=dict)
    truth_path: Path | None = None


@dataclass(frozen=True)
class _Item:
    name: str
    caption: str
    source: str
    transform: str


def _load_source(name: str) -> Image.Image:
    img: Image.Image
    if name == "grace_hopper":
        import matplotlib.cbook

        img = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    else:
        try:
            import skimage.data
        except ImportError as e:
            raise RuntimeError("the demo dataset needs scikit-image (pip install scikit-image)") from e
        arr = getattr(skimage.data, name)()
        img = Image.fromarray(arr)
    img = img.convert("RGB")
    img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return img


def _crop(img: Image.Image, rng: np.random.Generator, lo: float, hi: float) -> Image.Image:
    w, h = img.size
    cw, ch = int(w * rng.uniform(lo, hi)), int(h * rng.uniform(lo, hi))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x, y, x + cw, y + ch))


def _tint(img: Image.Image, gains: np.ndarray) -> Image.Image:
    arr = np.asarray(img, dtype=np.float32) * gains.astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _variant(img: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """A visibly different picture of the same subject; returns (image, JPEG quality)."""
    if kind == "crop":
        return _crop(img, rng, 0.45, 0.65), 90
    if kind == "flip_crop":
        return ImageOps.mirror(_crop(img, rng, 0.6, 0.8)), 90
    if kind == "tint":
        return _tint(_crop(img, rng, 0.7, 0.9), rng.uniform(0.55, 1.45, size=3)), 90
    if kind == "gray":
        return ImageOps.autocontrast(ImageOps.grayscale(_crop(img, rng, 0.5, 0.8))).convert("RGB"), 90
    if kind == "small":
        w, h = img.size
        return img.resize((max(8, w // 5), max(8, h // 5)), Image.Resampling.BILINEAR), 40
    if kind == "rotate":
        return _crop(img, rng, 0.7, 0.9).transpose(Image.Transpose.ROTATE_90), 90
    if kind == "zoom":
        w, h = img.size
        return img.crop((int(w * 0.3), int(h * 0.3), int(w * 0.7), int(h * 0.7))), 90
    raise ValueError(f"unknown variant {kind}")


def _near_dup(img: Image.Image, kind: str) -> tuple[Image.Image, int]:
    """Small changes only: these must stay near-duplicates of the original."""
    w, h = img.size
    if kind == "q30":
        return img, 30
    if kind == "resize90":
        return img.resize((int(w * 0.9), int(h * 0.9)), Image.Resampling.LANCZOS), 90
    if kind == "crop3":
        dx, dy = int(w * 0.03), int(h * 0.03)
        return img.crop((dx, dy, w - dx, h - dy)), 90
    if kind == "bright":
        return _tint(img, np.array([1.06, 1.06, 1.06])), 90
    raise ValueError(f"unknown near-duplicate kind {kind}")


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def plan_items() -> tuple[list[_Item], list[_Item]]:
    """(required items, optional items in the order they are added): pure, so sizes are predictable."""
    subject = dict(SOURCES)
    required: list[_Item] = []
    for name, kind in BROKEN:
        required.append(_Item(name, f"a photo of a lost item {name.split('.')[0]}", "", f"broken:{kind}"))
    for src in DUP_SOURCES:
        cap = f"a photo of {subject[src]}"
        required.append(_Item(f"{src}.jpg", cap, src, "original"))
        required += [_Item(f"{src}_dup_{k}.jpg", cap, src, f"dup:{k}") for k in DUP_KINDS]
    required.append(
        _Item(
            f"{EXACT_COPY_SOURCE}_copy.jpg", f"a photo of {subject[EXACT_COPY_SOURCE]}", EXACT_COPY_SOURCE, "exact_copy"
        )
    )
    optional = [_Item(f"{s}.jpg", f"a photo of {subj}", s, "original") for s, subj in SOURCES if s not in DUP_SOURCES]
    # Round-robin over variant kinds so a smaller demo still has every kind of change.
    for kind, template in VARIANT_CAPTIONS.items():
        optional += [_Item(f"{s}_{kind}.jpg", template.format(subj), s, kind) for s, subj in SOURCES]
    return required, optional


def _render(item: _Item, source: Callable[[str], Image.Image], seed: int) -> bytes:
    kind = item.transform
    if kind == "broken:not_image":
        return b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>gone</body></html>\n"
    if kind == "broken:empty":
        return b""
    img = source(item.source)
    if kind in ("original", "exact_copy"):
        return _jpeg(img, 92)  # the exact copy has the same bytes as the original: same pixels, same settings
    if kind.startswith("dup:"):
        return _jpeg(*_near_dup(img, kind[4:]))
    # A per-item generator: the bytes of one file do not depend on which other files were selected.
    rng = np.random.default_rng([seed, zlib.crc32(item.name.encode())])
    return _jpeg(*_variant(img, kind, rng))


def build_demo_dataset(out_dir: Path, n_images: int | None = None, seed: int = SEED) -> DemoData:
    """Write the demo images to out_dir/site, the URL list template and truth.json; deterministic for a seed."""
    out_dir = Path(out_dir)
    required, optional = plan_items()
    n = len(required) + len(optional) if n_images is None else n_images
    if n < len(required):
        raise ValueError(
            f"n_images={n_images}: the demo needs at least {len(required)} URLs "
            "(its planted duplicates and broken URLs)"
        )
    items = required + optional[: n - len(required)]
    site = out_dir / "site"
    site.mkdir(parents=True, exist_ok=True)
    cache: dict[str, Image.Image] = {}

    def source(name: str) -> Image.Image:
        if name not in cache:
            cache[name] = _load_source(name)
        return cache[name]

    for item in items:
        if item.transform != "broken:404":
            (site / item.name).write_bytes(_render(item, source, seed))
    order = np.random.default_rng(seed).permutation(len(items))  # mix planted groups across shards
    rows = [items[i] for i in order]
    url_list = out_dir / "urls_template.parquet"
    _write_parquet(url_list, [r.name for r in rows], [r.caption for r in rows])
    truth = _truth(items, seed)
    truth_path = out_dir / "truth.json"
    truth_path.write_text(json.dumps(truth, indent=1, sort_keys=True))
    log.info("demo dataset: %d URLs (%d broken) in %s", len(items), len(truth["broken"]), out_dir)
    return DemoData(url_list=url_list, images_dir=site, truth=truth, truth_path=truth_path)


def _truth(items: list[_Item], seed: int) -> dict[str, Any]:
    groups = [[f"{s}.jpg"] + [f"{s}_dup_{k}.jpg" for k in DUP_KINDS] for s in DUP_SOURCES]
    return {
        "seed": seed,
        "n_urls": len(items),
        "near_duplicate_groups": groups,
        "exact_duplicate_groups": [[f"{EXACT_COPY_SOURCE}.jpg", f"{EXACT_COPY_SOURCE}_copy.jpg"]],
        "broken": {i.name: i.transform.split(":", 1)[1] for i in items if i.transform.startswith("broken:")},
        "cat_caption": CAT_CAPTION,
        "cat_photos": sorted(i.name for i in items if i.source == CAT_SOURCE),
        "items": {i.name: {"source": i.source, "transform": i.transform, "caption": i.caption} for i in items},
    }


def _write_parquet(path: Path, urls: list[str], captions: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"url": urls, "caption": captions}), path)


def write_url_list(data: DemoData, base_url: str) -> Path:
    """Write urls.parquet beside the template with absolute URLs under base_url (the running server's)."""
    import pyarrow.parquet as pq

    table = pq.read_table(data.url_list)
    base = base_url.rstrip("/")
    urls = [f"{base}/{rel}" for rel in table.column("url").to_pylist()]
    out = data.url_list.parent / "urls.parquet"
    _write_parquet(out, urls, table.column("caption").to_pylist())
    return out
