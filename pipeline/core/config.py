"""Typed configuration: conf/*.yaml plus dotted command-line overrides, validated before any work starts."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.core.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# Groups: `model=NAME` loads conf/model/NAME.yaml, `distributor=spark` loads conf/distributor/spark.yaml.
GROUPS = ("model", "distributor")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_networks(v: list[str]) -> list[str]:
    import ipaddress

    for item in v:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError as e:
            raise ValueError(f"{item!r} is not an address or CIDR range ({e})") from None
    return v


class ModelConfig(_Section):
    """Which model embeds images and captions."""

    family: Literal["open_clip", "hf", "offline"] = Field(
        "open_clip", description="Model family: open_clip, hf (transformers CLIP/SigLIP directory) or offline (ConSE)."
    )
    arch: str = Field("ViT-B-32", description="open_clip architecture name, or an hf-hub:org/name id.")
    pretrained: str | None = Field(
        None, description="open_clip pretrained tag (e.g. laion2b_s34b_b79k) or weights file."
    )
    checkpoint: str | None = Field(None, description="Local checkpoint file (state dict); overrides `pretrained`.")
    model_config_file: str | None = Field(
        None, description="JSON file with a custom open_clip model config (registered under `arch`)."
    )
    path: str | None = Field(None, description="Directory of a Hugging Face CLIP/SigLIP model (family=hf).")
    precision: Literal["fp32", "fp16", "bf16", "int8"] = Field(
        "fp32", description="Compute precision: fp32; fp16/bf16 autocast (GPU); int8 dynamic quantization (CPU)."
    )
    device: str = Field("auto", description="auto (cuda when present, else cpu), cpu, cuda or cuda:N.")
    cache_dir: str | None = Field(None, description="Where named pretrained weights are cached.")


class LocalConfig(_Section):
    """The local process pool."""

    processes: int = Field(0, ge=0, description="Worker processes; 0 = one per GPU, or 1 on CPU.")
    threads: int = Field(0, ge=0, description="torch threads per worker process; 0 = cores / processes.")


class SparkConfig(_Section):
    """The Spark backend (used when distributor=spark)."""

    master: str | None = Field(None, description="Master URL; None reuses the active session or spark-submit's.")
    app_name: str = Field("clipline", description="Spark application name.")
    conf: dict[str, str] = Field(default_factory=dict, description="Extra Spark conf entries.")
    shards_per_task: int = Field(1, ge=1, description="Input shards handled by one Spark task.")


class DownloadConfig(_Section):
    """img2dataset options passed through for `clipline download`, and the rules of clipline's fetch step."""

    input_format: (
        Literal["csv", "tsv", "parquet", "json", "jsonl", "txt", "csv.gz", "tsv.gz", "txt.gz", "json.gz", "jsonl.gz"]
        | None
    ) = Field(None, description="URL list format; None = from the file extension.")
    url_col: str = Field("url", description="Column holding the image URL.")
    caption_col: str | None = Field("caption", description="Column holding the caption (None = no captions).")
    save_additional_columns: list[str] = Field(default_factory=list, description="Extra input columns kept.")
    image_size: int = Field(256, gt=0, description="Target image size in pixels.")
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = Field(
        "keep_ratio", description="img2dataset resize mode."
    )
    resize_only_if_bigger: bool = Field(True, description="Never upscale.")
    encode_format: Literal["jpg", "png", "webp"] = Field("jpg", description="Image encoding in the shards.")
    encode_quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality.")
    output_format: Literal["webdataset", "parquet", "files", "tfrecord"] = Field(
        "webdataset", description="Shard format written by img2dataset."
    )
    processes_count: int = Field(2, ge=1, description="Download processes.")
    thread_count: int = Field(32, ge=1, description="Download threads per process.")
    number_sample_per_shard: int = Field(10000, ge=1, description="Samples per output shard.")
    retries: int = Field(0, ge=0, description="Retries per URL.")
    timeout: int = Field(
        10,
        ge=1,
        description="Seconds one fetch of a URL may take in total (DNS, connect, headers, body, redirects); each "
        "retry gets it again.",
    )
    min_image_size: int = Field(0, ge=0, description="Drop images smaller than this.")
    max_aspect_ratio: float | None = Field(
        None, gt=0, description="Drop images more elongated than this (None = no limit)."
    )
    incremental: bool = Field(True, description="Skip shards already completed (img2dataset incremental mode).")
    user_agent_token: str | None = Field(None, description="Token added to the User-Agent.")
    max_bytes: int = Field(
        16 * 1024 * 1024,
        gt=0,
        description="Largest response body read, in bytes (16 MiB keeps photos of 40+ megapixels); a bigger one is "
        "refused from its Content-Length or stops being read at this size (reason `too large`). Bodies over 128 KiB "
        "being read share a budget of 2 x max_bytes per download process (a fetch waits for room within its timeout).",
    )
    max_pixels: int = Field(
        89_478_485,
        gt=0,
        description="Images whose header claims more pixels are rejected before decoding (reason `too many pixels`).",
    )
    max_redirects: int = Field(10, ge=0, description="Redirects followed per URL (imgproxy's default).")
    allow_private_addresses: bool = Field(
        False,
        description="Also fetch from loopback and private addresses (127.0.0.0/8, 10.0.0.0/8, 172.16.0.0/12, "
        "192.168.0.0/16, fc00::/7, ...). Link-local addresses and cloud metadata endpoints are always refused.",
    )
    allow_networks: list[str] = Field(
        default_factory=list,
        description="Addresses or CIDR ranges fetched even though private (for example an internal image server); "
        "never opens link-local or metadata addresses.",
    )
    shard_timeout: float | None = Field(
        None,
        gt=0,
        description="Seconds a shard may spend fetching; then its remaining URLs fail as `shard timeout`. None = "
        "timeout x (retries + 1) x ceil(number_sample_per_shard / thread_count) + 60, the longest the URLs can take.",
    )

    @field_validator("allow_networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        return _check_networks(v)


class EmbedConfig(_Section):
    """Options of `clipline embed`."""

    input_format: Literal["auto", "webdataset", "parquet", "folder"] = Field(
        "auto", description="Input kind; auto = from the file extension."
    )
    batch_size: int = Field(64, gt=0, description="Samples per model batch.")
    folder_shard_size: int = Field(10000, gt=0, description="Images per output shard for plain-folder inputs.")
    decode_threads: int = Field(0, ge=0, description="Decode/preprocess threads per worker; 0 = auto.")
    prefetch: int = Field(2, ge=1, description="Decoded batches buffered ahead of the model (bounds memory).")
    decode_priority: Literal["auto", "normal", "idle"] = Field(
        "auto",
        description="Scheduling of the decode threads: idle runs them only on cycles the model leaves free (Linux "
        "SCHED_IDLE), so they never preempt its compute threads; auto = idle when the model runs on the CPU, "
        "normal when it runs on a GPU (there decode is the CPU's main work).",
    )
    image: bool = Field(True, description="Embed images.")
    text: bool = Field(True, description="Embed captions.")
    output_dtype: Literal["float16", "float32"] = Field("float16", description="dtype of the stored embeddings.")
    write_parquet: bool = Field(False, description="Also write parquet/{shard}.parquet with an embedding column.")
    caption_keys: list[str] = Field(["txt", "caption"], description="Sample fields tried for the caption, in order.")
    image_keys: list[str] = Field(
        ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"], description="Sample fields tried for the image."
    )
    max_pixels: int = Field(89_478_485, gt=0, description="Images above this many pixels are rejected (bombs).")
    background: tuple[int, int, int] = Field((255, 255, 255), description="RGB behind transparent pixels.")
    draft: bool = Field(
        True,
        description="Decode big JPEGs at a reduced DCT scale: Pillow's draft (short side kept >= 2x the model "
        "input) on the model path, libjpeg-turbo's scaling per embed.draft_margin on the uint8 path.",
    )
    decode: Literal["cpu", "device"] = Field(
        "cpu",
        description="Where JPEGs are decoded and preprocessed: cpu (in the decode threads: libjpeg-turbo or Pillow, "
        "see embed.preprocess) or device (torchvision decode_jpeg and the uint8 resize on model.device, nvjpeg on "
        "a GPU; open_clip models only; other formats and unusual JPEGs still take the cpu path).",
    )
    preprocess: Literal["auto", "uint8", "model"] = Field(
        "auto",
        description="How decoded images become model input: uint8 (open_clip's preprocess config reproduced on "
        "uint8 pixels: plain JPEGs decoded by libjpeg-turbo at a reduced DCT scale, every other file by Pillow; "
        "resized and cropped as uint8, sent to model.device as uint8 (pinned memory on CUDA) and normalized "
        "there), model (the model's own preprocess on the CPU, float32 batches; every family), auto = uint8 for "
        "open_clip models, model for the others. embed.decode=device implies uint8.",
    )
    draft_margin: float = Field(
        1.5,
        ge=1.0,
        description="With embed.preprocess=uint8 and embed.draft: a JPEG is decoded at the smallest libjpeg-turbo "
        "DCT scale (1/2, 1/4, 1/8) that keeps at least this many pixels per resized pixel on each axis; the "
        "antialiased resize does the rest.",
    )
    trim_text: bool = Field(True, description="Cut caption padding for causal text towers (identical results).")
    reuse_memory: bool = Field(
        True,
        description="With a CPU model, keep freed memory in the worker (glibc: no mmap for large blocks, no trim) "
        "so each batch's activations reuse pages instead of faulting in fresh zeroed ones.",
    )
    max_shard_retries: int = Field(2, ge=0, description="Retries of a shard whose worker crashed or raised.")
    shard_timeout_s: float = Field(3600.0, gt=0, description="A shard running longer than this is failed.")
    read_timeout_s: float = Field(300.0, gt=0, description="A read that stalls longer than this fails the shard.")
    overwrite: bool = Field(False, description="Redo shards that are already committed.")


class IndexConfig(_Section):
    """Options of `clipline index` (passed to autofaiss)."""

    max_index_memory_usage: str = Field("4G", description="Upper bound on the index size in memory.")
    current_memory_available: str = Field("16G", description="Memory autofaiss may use while building.")
    index_key: str | None = Field(None, description="Force a faiss index factory string; None lets autofaiss choose.")
    max_index_query_time_ms: float = Field(10.0, gt=0, description="Search-time budget that tunes nprobe/efSearch.")
    modalities: list[Literal["image", "text"]] = Field(["image", "text"], description="Which indices to build.")
    recall_queries: int = Field(1000, ge=1, description="Queries used to measure recall and latency.")
    append: bool = Field(True, description="Add new shards to an existing index instead of rebuilding.")
    rebuild: bool = Field(False, description="Rebuild from scratch even if an index exists.")
    nb_cores: int | None = Field(None, description="faiss threads; None = all cores.")
    read_timeout_s: float = Field(
        300.0, gt=0, description="A read of one embed output file that stalls longer than this fails the stage."
    )


class DedupConfig(_Section):
    """Options of `clipline dedup`."""

    mode: Literal["auto", "exact", "ivf", "semdedup", "distributed"] = Field(
        "auto",
        description="Near-duplicate search method. distributed: the steps that run as tasks on either distributor "
        "(docs/SPARK.md, Dedup); auto: exact while small, else distributed (always distributed with "
        "distributor=spark).",
    )
    threshold: float = Field(
        0.95, gt=-1, le=1, description="Cosine similarity at or above which images are duplicates."
    )
    k: int = Field(16, ge=2, description="Neighbours searched per sample.")
    keep: Literal["first", "largest", "clip_score", "shortest_url"] = Field(
        "first", description="Which member survives."
    )
    memory_budget: str = Field("4G", description="Memory for the similarity search.")
    semdedup_clusters: int = Field(0, ge=0, description="k-means clusters for SemDeDup; 0 = sqrt(n).")
    exact: bool = Field(True, description="Also group identical image bytes (sha256).")
    kmeans_sample: int = Field(
        262144,
        ge=1,
        description="distributed: vectors sampled (deterministically, from every shard) to fit the k-means on; "
        "the driver holds them as float32, so its memory is kmeans_sample x dim x 4 bytes whatever the input size.",
    )
    max_cluster_rows: int = Field(
        200000,
        ge=2,
        description="distributed: rows one pairs task holds; a cluster above it is split into tiles of two blocks "
        "of max_cluster_rows/2. A task's memory is about max_cluster_rows x dim x 6 bytes + 128 MiB.",
    )
    spill: int = Field(
        0,
        ge=0,
        le=8,
        description="distributed: clusters each vector is compared in (its nearest first); 0 = the smallest "
        "reaching 0.99 recall on sampled exact queries.",
    )
    read_timeout_s: float = Field(
        300.0, gt=0, description="A read of one embed output file that stalls longer than this fails the stage."
    )
    min_clip_score: float | None = Field(None, description="Also drop samples under this image-caption similarity.")
    materialize: bool = Field(False, description="Write the deduplicated WebDataset shards and URL parquet.")
    shards: str | None = Field(None, description="Input WebDataset shards to materialize from.")
    reference: str | None = Field(None, description="Embed output of a dataset whose near-duplicates are removed.")


class EmbeddingsConfig(_Section):
    """How index, dedup, query, classify and report read embeddings: clipline's own embed output or vectors another
    tool wrote (docs/FORMAT.md, "Embeddings clipline did not write"). One section for every stage that reads them."""

    input_format: Literal["clipline", "clip-retrieval", "npy", "parquet"] = Field(
        "clipline",
        description="clipline: `clipline embed` output (found by its manifest.json); clip-retrieval: "
        "img_emb/img_emb_N.npy, text_emb/text_emb_N.npy and metadata/metadata_N.parquet paired by N, rows aligned by "
        "position (clip-retrieval inference, LAION releases); npy: .npy arrays only; parquet: .parquet files with an "
        "embedding column. input= is the folder (or, for npy and parquet, also one file); any fsspec URL.",
    )
    key_column: str | None = Field(
        None,
        description="clip-retrieval and parquet: the metadata column that identifies a row (key, uid, image_path, "
        "...), copied as `key` into id maps, keep/drop lists and query results. None: the row's number in its file, "
        "so a row is identified by (shard = the file's name, key = row).",
    )
    embedding_column: str = Field(
        "embedding",
        description="parquet: the column holding the vectors, a list or fixed_size_list of float16 or float32.",
    )
    modality: Literal["image", "text"] = Field(
        "image",
        description="npy and parquet: whether the vectors are image or text embeddings (clip-retrieval: image from "
        "img_emb/, text from text_emb/).",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="clip-retrieval and parquet: the source's names of the metadata columns stages use, by clipline "
        "name (caption, url, sha256, width, height, clip_score), e.g. embeddings.columns.caption=TEXT; a column not "
        "named here is taken under its clipline name when the source has it, else left empty.",
    )
    chunk_rows: int = Field(
        16384,
        ge=1,
        description="Rows read from one vector file at a time (memory-mapped where local, one ranged read or one "
        "Parquet row group at a time on object stores): what bounds a stage's memory for the vectors it streams.",
    )
    record_model: bool = Field(
        True,
        description="Formats other than clipline (no manifest): `clipline index` records model.* as the model that "
        "made the vectors, after checking its embedding width against theirs where the model's config tells it "
        "(exit 2 on mismatch), so text and image queries work later; false records none and queries take model.*.",
    )


class QueryConfig(_Section):
    """Options of `clipline query`."""

    k: int = Field(10, ge=1, description="Results per query.")
    modality: Literal["image", "text"] = Field("image", description="Index searched.")
    format: Literal["table", "jsonl"] = Field("table", description="Output format.")


class ServeConfig(_Section):
    """Options of `clipline serve`: clip-retrieval's clip back API over index folders (docs/FORMAT.md, "Serving")."""

    host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address to listen on. Loopback unless set here: any other address (0.0.0.0 = every interface) "
        "lets other machines query the indices and make this one fetch image URLs, with no authentication.",
    )
    port: int = Field(1234, ge=0, le=65535, description="TCP port (clip back's 1234); 0 = any free port (logged).")
    name: str | None = Field(
        None,
        min_length=1,
        description="The name input= is served under (requests' indice_name); None = its folder name.",
    )
    indices: dict[str, str] = Field(
        default_factory=dict,
        description="More index folders by name, served after input= (serve.indices.laion=/data/laion/index); "
        "/indices-list lists the names in this order and the first answers requests that name none.",
    )
    columns: list[Literal["url", "caption", "key", "shard", "row"]] = Field(
        ["url", "caption"],
        description="Metadata given with each result and by /metadata (clip back's columns_to_return), from the "
        "index's id map.",
    )
    max_request_bytes: int = Field(
        16 * 1024 * 1024, gt=0, description="Largest request body (a base64 image counts 4/3 of its size); more: 413."
    )
    max_results: int = Field(
        10_000,
        ge=1,
        description="Largest num_images and num_result_ids of a /knn-service request, and most ids of a /metadata "
        "request; more is refused (400). clip-retrieval's front asks for 3,000 result ids, 10,000 to download.",
    )
    timeout_s: float = Field(
        30.0,
        gt=0,
        description="Seconds one request may take in all: reading it, waiting for a worker, fetching its image URL, "
        "embedding and searching; past it the answer is 503 (a stalled client's connection is closed).",
    )
    workers: int = Field(2, ge=1, description="Requests embedded and searched at once; the others wait their turn.")
    max_connections: int = Field(64, ge=1, description="Connections handled at once; more are answered 503 at once.")
    max_pixels: int = Field(
        89_478_485, gt=0, description="Query images whose header claims more pixels are refused before decoding."
    )
    max_image_bytes: int = Field(
        16 * 1024 * 1024, gt=0, description="Largest image read from an image_url (stops reading there: 400)."
    )
    allow_private_addresses: bool = Field(
        False,
        description="Also fetch image_url from loopback and private addresses (as download.allow_private_addresses; "
        "link-local and cloud metadata addresses are always refused).",
    )
    allow_networks: list[str] = Field(
        default_factory=list,
        description="Addresses or CIDR ranges image_url may point to even though private (as download.allow_networks).",
    )
    cors_origin: str | None = Field(
        "*",
        description="Access-Control-Allow-Origin of every answer, so that clip-retrieval's front on another origin "
        "can read them ('*', as clip back sends); None sends none (browsers then keep other origins' pages out).",
    )
    require_model: bool = Field(
        True,
        description="Exit 2 when an index's model cannot be loaded; false serves it anyway, for embedding_input "
        "queries only (text and image queries are answered 400 with the reason).",
    )

    @field_validator("allow_networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        return _check_networks(v)


STORAGE_HELP = (
    "fsspec options per protocol, given to every filesystem any stage, worker or library opens "
    "(storage.s3.endpoint_url=http://127.0.0.1:9000, storage.s3.anon=true, storage.s3.profile=NAME, "
    "storage.s3.client_kwargs.region_name=eu-west-1, storage.gcs.project=P, storage.abfs.account_name=A): whatever "
    "the protocol's filesystem accepts (s3fs, gcsfs, adlfs). A value may name an environment variable, "
    "${ENV:NAME}, read only when the command runs; secrets are never written or logged (docs/STORAGE.md)."
)


class Config(_Section):
    """The whole resolved configuration; each stage reads only its own section."""

    input: str | list[str] | None = Field(
        None, description="Stage input: path, folder, brace pattern, glob, list or fsspec URL."
    )
    output: str | None = Field(None, description="Stage output folder (path or fsspec URL).")
    distributor: Literal["local", "spark"] = Field("local", description="Where the work runs.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Logging level.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    local: LocalConfig = Field(default_factory=LocalConfig)
    spark: SparkConfig = Field(default_factory=SparkConfig)
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    query: QueryConfig = Field(default_factory=QueryConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    embeddings: EmbeddingsConfig = Field(default_factory=EmbeddingsConfig)
    storage: dict[str, dict[str, Any]] = Field(default_factory=dict, description=STORAGE_HELP)

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from pipeline.core.storage import check

        return check(v)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for i, p in enumerate(parts[:-1]):
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, cannot set {dotted}")
        node = child
    node[parts[-1]] = value


def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        return raw


def _group_file(group: str, name: str, conf_dir: Path) -> Path | None:
    path = conf_dir / group / f"{name}.yaml"
    return path if path.is_file() else None


def load_config(
    overrides: list[str] | None = None,
    config_file: str | Path | None = None,
    conf_dir: Path = CONF_DIR,
) -> Config:
    """Resolve conf/base.yaml, group files, an optional config file and `key=value` overrides into a Config."""
    data: dict[str, Any] = _read_yaml(conf_dir / "base.yaml") if (conf_dir / "base.yaml").is_file() else {}
    if config_file is not None:
        data = _merge(data, _read_yaml(Path(config_file)))
    parsed: list[tuple[str, Any]] = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (for example embed.batch_size=128)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("+")
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        parsed.append((key, raw))
    # Group selections apply before dotted keys, so `model=x model.precision=int8` works in any order.
    for key, raw in parsed:
        if key in GROUPS:
            data = _apply_group(data, key, raw, conf_dir)
    for key, raw in parsed:
        if key not in GROUPS:
            _set_dotted(data, key, _parse_value(raw))
    return validate(data)


def _apply_group(data: dict[str, Any], group: str, name: str, conf_dir: Path) -> dict[str, Any]:
    path = _group_file(group, name, conf_dir)
    if path is not None:
        return _merge(data, _read_yaml(path))
    if group == "model":
        data = copy.deepcopy(data)
        data["model"] = _merge(data.get("model") or {}, parse_model_string(name))
        return data
    if group == "distributor":
        data = copy.deepcopy(data)
        data["distributor"] = name
        return data
    raise ConfigError(f"{group}={name}: no conf/{group}/{name}.yaml")


def validate(data: dict[str, Any]) -> Config:
    """Validate a plain dict into a Config, turning pydantic errors into one ConfigError naming each key path."""
    from pipeline.core.storage import redact_value

    try:
        return Config.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            path = ".".join(str(p) for p in err["loc"]) or "<root>"
            if err["type"] == "extra_forbidden":
                lines.append(f"{path}: unknown key")
            else:
                lines.append(f"{path}: {err['msg']} (got {redact_value(err.get('input'), path)!r})")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def require(cfg: Config, *keys: str) -> None:
    """Fail with ConfigError when a required top-level value (input, output) is missing."""
    missing = [k for k in keys if getattr(cfg, k) in (None, "")]
    if missing:
        raise ConfigError("missing required value: " + ", ".join(f"{k}= (for example {k}=/data/...)" for k in missing))


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as clipline writes and logs it: secrets redacted (core/storage.py)."""
    from pipeline.core.storage import redact

    return redact(cfg.model_dump(mode="json"))


def parse_model_string(spec: str) -> dict[str, Any]:
    """`open_clip:ViT-B-32/laion2b_s34b_b79k` (clip-retrieval style), `ViT-B-32/tag`, `hf:/dir`, `offline`."""
    if spec in ("offline", "conse", "offline:conse"):
        return {"family": "offline"}
    if spec.startswith("hf:"):
        return {"family": "hf", "path": spec[3:]}
    if spec.startswith("open_clip:"):
        spec = spec[len("open_clip:") :]
    if spec.startswith("hf-hub:"):
        return {"family": "open_clip", "arch": spec, "pretrained": None}
    arch, _, tag = spec.partition("/")
    if not arch:
        raise ConfigError(f"model={spec!r}: expected ARCH[/PRETRAINED], open_clip:ARCH/TAG, hf:DIR or offline")
    return {"family": "open_clip", "arch": arch, "pretrained": tag or None}
