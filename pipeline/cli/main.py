"""The `clipline` command: parse argv, load config, set up logging, call one stage, map outcomes to exit codes."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import textwrap
from typing import Any, Callable

from pipeline.core.config import Config, load_config
from pipeline.core.errors import ConfigError, JobFailed
from pipeline.core.logs import setup_logging
from pipeline.core.summary import format_summary

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

COMMON = """
Configuration: conf/base.yaml, then --config FILE, then KEY=VALUE overrides (dotted paths,
YAML values): input=... output=... model.arch=ViT-B-32 model.pretrained=laion2b_s34b_b79k
model.checkpoint=/path/ckpt.pt model=conf-group-or-spec distributor=local|spark.
Unknown keys and wrong types exit 2 before anything is written.
Exit codes: 0 success, 1 the job failed (some shard or stage failed), 2 usage/config error.
Logs go to stderr; the summary goes to stdout. Every run writes OUTPUT/run.json
(download: OUTPUT/_clipline/run.json, out of img2dataset's way)."""

COMMANDS: dict[str, dict[str, str]] = {
    "download": {
        "fn": "pipeline.download.stage:download",
        "help": "fetch a URL list into WebDataset tar shards with img2dataset",
        "doc": """
Download images of a URL list (csv, tsv, parquet, jsonl; any fsspec path) into WebDataset
shards with img2dataset: OUTPUT/{00000..}.tar plus per-shard .parquet and _stats.json.
Re-running skips completed shards. Prints URLs in, images written, failures by reason.

Main options: download.url_col, download.caption_col, download.image_size,
download.resize_mode, download.processes_count, download.thread_count, download.retries,
download.number_sample_per_shard, download.timeout, distributor=spark.

Example:
  clipline download input=urls.parquet output=/data/shards download.caption_col=TEXT \\
      download.image_size=256 download.processes_count=8""",
    },
    "embed": {
        "fn": "pipeline.embed.stage:embed",
        "help": "embed shards with a CLIP model into npy + parquet shards",
        "doc": """
Embed images and captions of WebDataset tars (paths, folders, {00000..00099} patterns,
fsspec URLs), img2dataset parquet, or an image folder. Writes, one output shard per input:
  OUTPUT/img_emb/img_emb_N.npy  OUTPUT/text_emb/text_emb_N.npy  (L2-normalized, float16)
  OUTPUT/metadata/metadata_N.parquet  (key, caption, url, sha256, clip_score, status, ...)
  OUTPUT/stats/stats_N.json (commit marker)  OUTPUT/manifest.json (model identity)
Committed shards are skipped, so re-running resumes a killed job.

Main options: model.arch, model.pretrained, model.checkpoint, model.precision (fp32|fp16|
bf16|int8), embed.batch_size, embed.output_dtype, embed.write_parquet, local.processes,
local.threads, embed.max_shard_retries, distributor=spark.

Example:
  clipline embed input='/data/shards/{00000..00099}.tar' output=/data/emb \\
      model.arch=ViT-B-32 model.pretrained=laion2b_s34b_b79k embed.batch_size=256""",
    },
    "index": {
        "fn": "pipeline.index.stage:build",
        "help": "build faiss indices from embeddings with autofaiss",
        "doc": """
Build OUTPUT/image.index and OUTPUT/text.index (plus .json infos and an id->key mapping)
from an embed output folder with autofaiss, within index.max_index_memory_usage, and
measure recall@10/@100 and latency against exact search. New shards are appended to an
existing index unless index.rebuild=true.

Example:
  clipline index input=/data/emb output=/data/emb/index index.max_index_memory_usage=2G""",
    },
    "dedup": {
        "fn": "pipeline.dedup.stage:dedup",
        "help": "find exact and near duplicates; write keep/drop lists",
        "doc": """
Find exact duplicates (same sha256) and near duplicates (image cosine >= dedup.threshold)
in an embed output folder. Writes OUTPUT/duplicates.parquet, keep.parquet, drop.parquet,
summary.json and a similarity histogram.

Main options: dedup.threshold, dedup.mode (auto|exact|ivf|semdedup), dedup.keep
(first|largest|clip_score|shortest_url), dedup.min_clip_score, dedup.materialize.

Example:
  clipline dedup input=/data/emb output=/data/emb/dedup dedup.threshold=0.95""",
    },
    "query": {
        "fn": "pipeline.query.search:query_cli",
        "help": "search an index by text, image or key",
        "doc": """
Search an index folder (made by `clipline index`) with text, an image or an indexed key.
The model is the one recorded in the embeddings' manifest.

Example:
  clipline query input=/data/emb/index --text "a dog in the snow" -k 5
  clipline query input=/data/emb/index --image cat.jpg --format jsonl""",
    },
    "run": {
        "fn": "pipeline.run.chain:run",
        "help": "download -> embed -> index -> dedup from one config",
        "doc": """
Run the whole chain: input= is the URL list, output= the root; stages write to
OUTPUT/shards, OUTPUT/embeddings, OUTPUT/embeddings/index and OUTPUT/embeddings/dedup.
Each stage resumes, so re-running processes only what is new.

input= may be one URL list or a folder of them: files added later are downloaded on the next
run, only new shards are embedded and appended to the index, and dedup re-runs over the union.
A lock file stops two runs on the same output. --stage runs only the named stage(s).

Example:
  clipline run --config conf/dataset/example.yaml
  clipline run --config conf/dataset/example.yaml --stage embed --stage index""",
    },
    "report": {
        "fn": "pipeline.report.page:report_cli",
        "help": "an HTML report of a run: counts, throughput, duplicates, queries, index quality",
        "doc": """
Write one self-contained HTML page (plots and thumbnails embedded: it opens offline) about the output root of
`clipline run` or `clipline demo`: samples in, embedded and failed by reason; throughput over time and the embed
time split; the CLIP score distribution; the nearest-neighbour similarity histogram with the dedup threshold; the
largest duplicate groups and example text queries as thumbnails read from the shards; index type, size, recall and
latency; provenance (model, versions, config, summary.json). Stages that did not run are reported as missing.
Writes OUTPUT_DIR/report/index.html (output=DIR writes DIR/index.html). Example queries: --query (repeatable),
default three captions sampled from the data. Exits 1 if a section failed to render (the rest is still written).

Example:
  clipline demo /tmp/clipline-demo
  clipline report /tmp/clipline-demo --query "a photo of a cat" --query "a cup of coffee"
  xdg-open /tmp/clipline-demo/report/index.html""",
    },
    "models": {
        "fn": "pipeline.models.catalog:list_models_cli",
        "help": "list the models available here and what each needs",
        "doc": """
List model families and what each needs: the offline ConSE model (installed or not),
open_clip architectures and pretrained tags (and whether their weights are cached
locally), and Hugging Face CLIP/SigLIP directories.

Example:
  clipline models --family open_clip""",
    },
    "classify": {
        "fn": "pipeline.query.zeroshot:classify_cli",
        "help": "zero-shot labels for embedded images from class names",
        "doc": """
Zero-shot classification of an embed output folder: class names are put in prompt templates,
embedded with the model recorded in the manifest, averaged per class (as in the CLIP paper)
and compared with the stored image embeddings. Writes OUTPUT/zeroshot/zeroshot_N.parquet
(key, label_1..k, score_1..k); output= defaults to the embed folder.

Example:
  clipline classify input=/data/emb --class cat --class dog --class car \
      --template "a photo of a {}." -k 2""",
    },
    "demo": {
        "fn": "pipeline.run.demo:demo_cli",
        "help": "offline end-to-end demo on generated data",
        "doc": """
Build a small dataset offline (sample photos shipped with scikit-image plus variants and
planted near-duplicates and broken URLs), serve it on 127.0.0.1, download it with
img2dataset, then embed, index, dedup and query it. Needs no network.

Example:
  clipline demo /tmp/clipline-demo""",
    },
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clipline",
        description="Batch CLIP embedding pipeline: download -> embed -> index -> dedup -> query.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `clipline COMMAND --help` for a worked example of each command." + COMMON,
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, spec in COMMANDS.items():
        sp = sub.add_parser(
            name,
            help=spec["help"],
            description=textwrap.dedent(spec["doc"]).strip() + "\n" + COMMON,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if name == "demo":
            sp.add_argument(
                "out_dir", nargs="?", default="clipline-demo", help="where the demo writes (default ./clipline-demo)"
            )
            sp.add_argument("--n-images", type=int, default=None, help="size of the generated dataset")
            sp.add_argument("--keep-going", action="store_true", help=argparse.SUPPRESS)
        if name == "report":
            sp.add_argument(
                "out_dir", nargs="?", default=None, help="output root of clipline run or demo (same as input=)"
            )
        sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="configuration overrides")
        sp.add_argument("--config", "-c", help="a YAML file merged over conf/base.yaml")
        if name == "report":
            sp.add_argument(
                "--query",
                dest="queries",
                action="append",
                metavar="TEXT",
                help="example text query (repeatable; default: captions sampled from the data)",
            )
        if name == "run":
            sp.add_argument(
                "--stage",
                dest="stages",
                action="append",
                choices=["download", "embed", "index", "dedup"],
                help="run only this stage (repeatable; default: all four in order)",
            )
        if name == "models":
            sp.add_argument("--family", choices=["offline", "open_clip", "hf"], default=None, help="only this family")
        if name == "classify":
            sp.add_argument("--class", dest="classes", action="append", metavar="NAME", help="class name (repeatable)")
            sp.add_argument("--classes-file", help="text file, one class name per line (# comments ok)")
            sp.add_argument(
                "--template",
                dest="templates",
                action="append",
                metavar="TEXT",
                help="prompt with {} for the class (repeatable; default 'a photo of a {}.')",
            )
            sp.add_argument("--templates-file", help="text file, one template per line")
            sp.add_argument("-k", type=int, default=5, help="labels kept per image")
        if name == "query":
            g = sp.add_mutually_exclusive_group()
            g.add_argument("--text", action="append", help="text query (repeatable)")
            g.add_argument("--image", action="append", help="image path or URL (repeatable)")
            g.add_argument("--key", action="append", help="neighbours of an indexed sample key (repeatable)")
            sp.add_argument("-k", type=int, default=None, help="results per query (query.k)")
            sp.add_argument("--format", choices=["table", "jsonl"], default=None, help="output format (query.format)")
    return p


def _call(fn_path: str) -> Callable[..., Any]:
    module, _, name = fn_path.partition(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def _print_result(command: str, result: Any) -> None:
    if isinstance(result, dict):
        print(format_summary(command, result))
    elif isinstance(result, str):
        print(result)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    parser = _parser()
    try:
        # KEY=VALUE overrides may also come after options (`query --text T log_level=ERROR`).
        args, extra = parser.parse_known_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if e.code in (0, None) else EXIT_USAGE
    stray = [a for a in extra if "=" not in a or a.startswith("-")]
    if stray:
        print(f"clipline: unrecognized arguments: {' '.join(stray)}", file=sys.stderr)
        return EXIT_USAGE
    if extra and getattr(args, "overrides", None) is not None:
        args.overrides = [*args.overrides, *extra]
    if args.version:
        from pipeline import __version__

        print(__version__)
        return EXIT_OK
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    spec = COMMANDS[args.command]
    overrides = list(args.overrides)
    if args.command == "query":
        if args.k is not None:
            overrides.append(f"query.k={args.k}")
        if args.format is not None:
            overrides.append(f"query.format={args.format}")
    if args.command == "report" and args.out_dir is not None:
        # `clipline report input=X` lands in out_dir too: then it is an override like the others
        overrides.insert(0, args.out_dir if "=" in args.out_dir else f"input={args.out_dir}")
    try:
        cfg = load_config(overrides, args.config)
    except ConfigError as e:
        print(f"clipline {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(cfg.log_level)
    log = logging.getLogger("clipline")
    kwargs: dict[str, Any] = {}
    if args.command == "query":
        kwargs = {"text": args.text, "image": args.image, "key": args.key}
    if args.command == "demo":
        kwargs = {"out_dir": args.out_dir, "n_images": args.n_images}
    if args.command == "models":
        kwargs = {"family": args.family}
    if args.command == "report":
        kwargs = {"queries": args.queries}
    if args.command == "run" and args.stages:
        kwargs = {"stages": tuple(args.stages)}
    if args.command == "classify":
        kwargs = {
            "classes": args.classes,
            "templates": args.templates,
            "k": args.k,
            "classes_file": args.classes_file,
            "templates_file": args.templates_file,
        }
    return run_command(args.command, spec["fn"], cfg, log, kwargs)


def run_command(command: str, fn_path: str, cfg: Config, log: logging.Logger, kwargs: dict[str, Any]) -> int:
    from pipeline.core.runinfo import RunRecord

    output = cfg.output
    if command == "demo":
        output = kwargs.get("out_dir")
    elif command in ("index", "dedup") and not output and cfg.input:
        output = f"{str(cfg.input).rstrip('/')}/{command}"  # the stages' own default output
    record = RunRecord(command, cfg, output)
    try:
        result = _call(fn_path)(cfg, **kwargs)
    except ConfigError as e:
        print(f"clipline {command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except JobFailed as e:
        log.error("%s failed: %s", command, e)
        if e.summary:
            print(format_summary(command, e.summary))
        record.finish(EXIT_FAILED, e.summary, str(e))
        return EXIT_FAILED
    except KeyboardInterrupt:
        log.error("%s interrupted; committed shards are kept, re-run to resume", command)
        record.finish(130, None, "interrupted")
        return 130
    except Exception as e:  # any other failure is a failed job, never exit 0
        log.exception("%s failed: %s", command, e)
        record.finish(EXIT_FAILED, None, f"{type(e).__name__}: {e}")
        return EXIT_FAILED
    _print_result(command, result)
    if isinstance(result, dict) and result.get("output") and not record.output:
        record.output = str(result["output"])
    record.finish(EXIT_OK, result if isinstance(result, dict) else None)
    return EXIT_OK


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
