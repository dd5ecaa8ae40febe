"""Every `clipline` command described once, as data: the function it runs, its help and worked example, its own
arguments, how parsed arguments become the function's keyword arguments and config overrides, where it writes, and
which distributors its heavy work runs on. main.py and docgen.py only read these records."""

from __future__ import annotations

import argparse
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.run.chain import STAGES

Parsed = argparse.Namespace


@dataclass(frozen=True)
class Arg:
    """One argument of a command as argparse's add_argument takes it; `exclusive` names a mutually exclusive group."""

    flags: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)
    exclusive: str | None = None

    @property
    def positional(self) -> bool:
        return not self.flags[0].startswith("-")


def arg(*flags: str, exclusive: str | None = None, **options: Any) -> Arg:
    return Arg(flags, options, exclusive)


def _no_kwargs(args: Parsed) -> dict[str, Any]:
    return {}


def _user_overrides(args: Parsed, given: list[str]) -> list[str]:
    return given


def _folder(key: str, dest: str) -> Callable[[Parsed, list[str]], list[str]]:
    """A positional folder is `key=folder`, placed before the user's overrides; argparse also hands a first
    KEY=VALUE to the positional slot (`clipline report input=X`, `clipline demo log_level=DEBUG`): then it is an
    override like the others."""

    def overrides(args: Parsed, given: list[str]) -> list[str]:
        value = getattr(args, dest)
        if value is None:
            return given
        return [value if "=" in value else f"{key}={value}", *given]

    return overrides


def _query_overrides(args: Parsed, given: list[str]) -> list[str]:
    """-k and --format are shorthands for query.k and query.format, and win over them."""
    shorthands = {"query.k": args.k, "query.format": args.format}
    return [*given, *(f"{key}={value}" for key, value in shorthands.items() if value is not None)]


@dataclass(frozen=True)
class Command:
    """One `clipline` command. Adding a command is adding one of these to COMMANDS."""

    name: str
    fn: str  # "module:function", imported only when the command runs: `--help` stays fast
    help: str  # one line, in `clipline --help`
    doc: str  # what it does and writes, with a worked example, in `clipline NAME --help` and docs/CLI.md
    args: tuple[Arg, ...] = ()
    overrides: Callable[[Parsed, list[str]], list[str]] = _user_overrides  # (parsed, user's KEY=VALUEs) -> overrides
    kwargs: Callable[[Parsed], dict[str, Any]] = _no_kwargs  # parsed arguments -> keyword arguments of fn
    # "module:function(cfg) -> folder": where the command writes when output= is not given (its run.json goes there)
    default_output: str | None = None
    writes_record: bool = True  # False: a view of other outputs (the report), which must not replace their run.json
    distributors: tuple[str, ...] = ("local",)
    # What distributor=spark runs on Spark, or why the command refuses it (said when it exits 2).
    spark: str = "it runs in one local process"
    # The commands whose heavy work this one runs: distributor=spark needs every one of them to support it.
    parts: Callable[[Parsed], tuple[str, ...]] = lambda args: ()

    def on_spark(self) -> str:
        """What distributor=spark does for this command, in words (for --help and docs/CLI.md)."""
        if "spark" in self.distributors:
            return self.spark
        return f"refused, exit 2 before any work: {self.spark}"

    def description(self) -> str:
        """What the command does, its example, and what distributor=spark means for it."""
        note = textwrap.wrap(f"distributor=spark: {self.on_spark()}.", 90)
        return "\n".join([textwrap.dedent(self.doc).strip(), "", *note])


COMMON = """
Configuration: conf/base.yaml, then --config FILE, then KEY=VALUE overrides (dotted paths,
YAML values): input=... output=... model.arch=ViT-B-32 model.pretrained=laion2b_s34b_b79k
model.checkpoint=/path/ckpt.pt model=conf-group-or-spec distributor=local|spark.
distributor=spark means the same for every command: its heavy work runs on Spark, and a
command that cannot do that exits 2 before any work.
Unknown keys and wrong types exit 2 before anything is written.
Exit codes: 0 success, 1 the job failed (some shard or stage failed), 2 usage/config error.
Logs go to stderr (other libraries' lines only from WARNING up, all with log_level=DEBUG);
the summary goes to stdout. Every command that writes an output records OUTPUT/run.json
(download: OUTPUT/_clipline/run.json, out of img2dataset's way; report, which only reads
another command's output, records nothing there)."""

_COMMANDS = (
    Command(
        name="download",
        fn="pipeline.download.stage:download",
        help="fetch a URL list into WebDataset tar shards with img2dataset",
        doc="""
Download images of a URL list (csv, tsv, parquet, jsonl; any fsspec path) into WebDataset
shards with img2dataset: OUTPUT/{00000..}.tar plus per-shard .parquet and _stats.json.
Re-running skips completed shards. Prints URLs in, images written, failures by reason.

Main options: download.url_col, download.caption_col, download.image_size,
download.resize_mode, download.processes_count, download.thread_count, download.retries,
download.number_sample_per_shard, download.timeout, distributor=spark.

Example:
  clipline download input=urls.parquet output=/data/shards download.caption_col=TEXT \\
      download.image_size=256 download.processes_count=8""",
        distributors=("local", "spark"),
        spark="img2dataset's pyspark distributor: one Spark task per shard of URLs",
    ),
    Command(
        name="embed",
        fn="pipeline.embed.stage:embed",
        help="embed shards with a CLIP model into npy + parquet shards",
        doc="""
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
        distributors=("local", "spark"),
        spark="one Spark task per group of spark.shards_per_task input shards, retried per shard",
    ),
    Command(
        name="index",
        fn="pipeline.index.stage:build",
        help="build faiss indices from embeddings with autofaiss",
        doc="""
Build OUTPUT/image.index and OUTPUT/text.index (plus .json infos and an id->key mapping)
from an embed output folder with autofaiss, within index.max_index_memory_usage, and
measure recall@10/@100 and latency against exact search. New shards are appended to an
existing index unless index.rebuild=true. output= defaults to INPUT/index.

Example:
  clipline index input=/data/emb output=/data/emb/index index.max_index_memory_usage=2G
  clipline index input=hdfs:///data/emb distributor=spark spark.master=yarn""",
        default_output="pipeline.index.stage:default_output",
        distributors=("local", "spark"),
        spark="autofaiss's pyspark mode: the vectors are added to the trained index in Spark tasks and the "
        "partial indices merged (appending new shards to an existing index stays in the driver)",
    ),
    Command(
        name="dedup",
        fn="pipeline.dedup.stage:dedup",
        help="find exact and near duplicates; write keep/drop lists",
        doc="""
Find exact duplicates (same sha256) and near duplicates (image cosine >= dedup.threshold)
in an embed output folder. Writes OUTPUT/duplicates.parquet, keep.parquet, drop.parquet,
summary.json and a similarity histogram. output= defaults to INPUT/dedup.

Main options: dedup.threshold, dedup.mode (auto|exact|ivf|semdedup|distributed), dedup.keep
(first|largest|clip_score|shortest_url), dedup.min_clip_score, dedup.materialize; for the
distributed steps dedup.kmeans_sample, dedup.max_cluster_rows, dedup.spill.

Example:
  clipline dedup input=/data/emb output=/data/emb/dedup dedup.threshold=0.95""",
        default_output="pipeline.dedup.stage:default_output",
        distributors=("local", "spark"),
        spark="every step whose cost grows with the input runs as Spark tasks (exact duplicates by sha256 "
        "through a shuffle, cluster assignment, within-cluster pairs, decisions and outputs per shard, materialize "
        "per tar); the k-means is fitted on the driver on dedup.kmeans_sample vectors",
    ),
    Command(
        name="query",
        fn="pipeline.query.search:query_cli",
        help="search an index by text, image or key",
        doc="""
Search an index folder (made by `clipline index`) with text, an image or an indexed key.
The model that embeds text and image queries is the one recorded with the index (clipline's
manifest, or model.* recorded by `clipline index` for embeddings clipline did not write), else model.*.

Example:
  clipline query input=/data/emb/index --text "a dog in the snow" -k 5
  clipline query input=/data/emb/index --image cat.jpg --format jsonl""",
        args=(
            arg("--text", action="append", help="text query (repeatable)", exclusive="what"),
            arg("--image", action="append", help="image path or URL (repeatable)", exclusive="what"),
            arg("--key", action="append", help="neighbours of an indexed sample key (repeatable)", exclusive="what"),
            arg("-k", type=int, default=None, help="results per query (query.k)"),
            arg("--format", choices=["table", "jsonl"], default=None, help="output format (query.format)"),
        ),
        overrides=_query_overrides,
        kwargs=lambda a: {"text": a.text, "image": a.image, "key": a.key},
        spark="a query searches one index in this process",
    ),
    Command(
        name="serve",
        fn="pipeline.query.serve:serve_cli",
        help="serve indices to clip-retrieval's ClipClient and front end (clip back's HTTP API)",
        doc="""
Answer clip-retrieval's `clip back` HTTP API over index folders made by `clipline index`, so
ClipClient scripts and clip-retrieval's front end search them: GET /indices-list, POST
/knn-service (text, image as base64 or image_url, embedding_input; num_images,
num_result_ids, modality, deduplicate) and POST /metadata, with clip back's JSON shapes
(docs/FORMAT.md, "Serving to clip-retrieval's tools"). Listens on 127.0.0.1:1234
(serve.host, serve.port) until SIGINT or SIGTERM, logs one line per request, writes nothing.
Bounded: serve.max_request_bytes, serve.max_results, serve.timeout_s per request; image_url
is fetched under the download stage's rules (http/https only, no loopback or private
address unless serve.allow_private_addresses=true).

Example:
  clipline serve input=/data/emb/index serve.name=laion
  python -c 'from clip_retrieval.clip_client import ClipClient;
    print(ClipClient("http://127.0.0.1:1234/knn-service", "laion").query(text="a cat"))'
  clipline serve serve.indices.laion=/data/laion/index serve.indices.coco=/data/coco/index""",
        writes_record=False,
        spark="a server answers queries in this process",
    ),
    Command(
        name="run",
        fn="pipeline.run.chain:run",
        help="download -> embed -> index -> dedup from one config",
        doc="""
Run the whole chain: input= is the URL list, output= the root; stages write to
OUTPUT/shards, OUTPUT/embeddings, OUTPUT/embeddings/index and OUTPUT/embeddings/dedup.
Each stage resumes, so re-running processes only what is new.

input= may be one URL list or a folder of them: files added later are downloaded on the next
run, only new shards are embedded and appended to the index, and dedup re-runs over the union.
A lock file stops two runs on the same output. --stage runs only the named stage(s).

Example:
  clipline run --config conf/dataset/example.yaml
  clipline run --config conf/dataset/example.yaml --stage embed --stage index""",
        args=(
            arg(
                "--stage",
                dest="stages",
                action="append",
                choices=list(STAGES),
                help="run only this stage (repeatable; default: all four in order)",
            ),
        ),
        kwargs=lambda a: {"stages": tuple(a.stages)} if a.stages else {},
        distributors=("local", "spark"),
        spark="passed to every stage run, each of which runs on Spark as its own command does; refused (exit 2 "
        "before any work) when one of the stages run cannot, which --stage can leave out",
        parts=lambda a: tuple(s for s in STAGES if not a.stages or s in a.stages),
    ),
    Command(
        name="report",
        fn="pipeline.report.page:report_cli",
        help="an HTML report of a run: counts, throughput, duplicates, queries, index quality",
        doc="""
Write one self-contained HTML page (plots and thumbnails embedded: it opens offline) about the output root of
`clipline run` or `clipline demo`: samples in, embedded and failed by reason; throughput over time and the embed
time split; the CLIP score distribution; the nearest-neighbour similarity histogram with the dedup threshold; the
largest duplicate groups and example text queries as thumbnails read from the shards; index type, size, recall and
latency; provenance (model, versions, config, summary.json). Stages that did not run are reported as missing.
Writes OUTPUT/report.html; output= defaults to the input root (`clipline demo` writes the same file). Example
queries: --query (repeatable), default three captions sampled from the data. Exits 1 if a section failed to
render (the rest is still written).

Example:
  clipline demo /tmp/clipline-demo
  clipline report /tmp/clipline-demo --query "a photo of a cat" --query "a cup of coffee"
  xdg-open /tmp/clipline-demo/report.html""",
        args=(
            arg("out_dir", nargs="?", default=None, help="output root of clipline run or demo (same as input=)"),
            arg(
                "--query",
                dest="queries",
                action="append",
                metavar="TEXT",
                help="example text query (repeatable; default: captions sampled from the data)",
            ),
        ),
        overrides=_folder("input", "out_dir"),
        kwargs=lambda a: {"queries": a.queries},
        writes_record=False,
        spark="the report reads summaries and samples of one output in this process",
    ),
    Command(
        name="models",
        fn="pipeline.models.catalog:list_models_cli",
        help="list the models available here and what each needs",
        doc="""
List model families and what each needs: the offline ConSE model (installed or not),
open_clip architectures and pretrained tags (and whether their weights are cached
locally), and Hugging Face CLIP/SigLIP directories.

Example:
  clipline models --family open_clip""",
        args=(arg("--family", choices=["offline", "open_clip", "hf"], default=None, help="only this family"),),
        kwargs=lambda a: {"family": a.family},
        spark="it lists what is installed on this machine",
    ),
    Command(
        name="classify",
        fn="pipeline.query.zeroshot:classify_cli",
        help="zero-shot labels for embedded images from class names",
        doc="""
Zero-shot classification of an embed output folder: class names are put in prompt templates,
embedded with the model recorded in the embed manifest (for embeddings clipline did not write:
model.*), averaged per class (as in the CLIP paper) and compared with the stored image embeddings. Writes OUTPUT/zeroshot/zeroshot_N.parquet
(key, label_1..k, score_1..k); output= defaults to the embed folder.

Example:
  clipline classify input=/data/emb --class cat --class dog --class car \\
      --template "a photo of a {}." -k 2""",
        args=(
            arg("--class", dest="classes", action="append", metavar="NAME", help="class name (repeatable)"),
            arg("--classes-file", help="text file, one class name per line (# comments ok)"),
            arg(
                "--template",
                dest="templates",
                action="append",
                metavar="TEXT",
                help="prompt with {} for the class (repeatable; default 'a photo of a {}.')",
            ),
            arg("--templates-file", help="text file, one template per line"),
            arg("-k", type=int, default=5, help="labels kept per image"),
        ),
        kwargs=lambda a: {
            "classes": a.classes,
            "templates": a.templates,
            "k": a.k,
            "classes_file": a.classes_file,
            "templates_file": a.templates_file,
        },
        spark="zero-shot labels are computed shard by shard in this process",
    ),
    Command(
        name="demo",
        fn="pipeline.run.demo:demo_cli",
        help="offline end-to-end demo on generated data, ending with an HTML report",
        doc="""
Build a small dataset offline (sample photos shipped with scikit-image plus variants and
planted near-duplicates and broken URLs), serve it on 127.0.0.1, download it with
img2dataset, then embed, index, dedup and query it, and write the report of
`clipline report` to OUTPUT/report.html; the last line printed is the path to open.
Needs no network. OUTPUT is the positional folder (same as output=; default ./clipline-demo).

Example:
  clipline demo /tmp/clipline-demo
  xdg-open /tmp/clipline-demo/report.html""",
        args=(
            arg(
                "out_dir",
                nargs="?",
                default=None,
                help="where the demo writes (same as output=; default ./clipline-demo)",
            ),
            arg("--n-images", type=int, default=None, help="size of the generated dataset"),
        ),
        overrides=_folder("output", "out_dir"),
        kwargs=lambda a: {"n_images": a.n_images},
        default_output="pipeline.run.demo:default_output",
        spark="the demo is a small local run on a loopback server",
    ),
)

COMMANDS: dict[str, Command] = {c.name: c for c in _COMMANDS}


def unsupported(command: Command, distributor: str, args: Parsed) -> list[Command]:
    """The commands (this one or the parts it runs) whose heavy work cannot run on `distributor`."""
    involved = [command, *(COMMANDS[name] for name in command.parts(args))]
    return [c for c in involved if distributor not in c.distributors]
