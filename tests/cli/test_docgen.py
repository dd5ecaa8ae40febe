"""Docs that cannot drift: the generated references equal a fresh generation and cover every key and command; the
hand-written format page names every file, column, status, stats and manifest key the code actually writes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pytest
from pydantic import BaseModel, Field

from pipeline.cli import docgen
from pipeline.cli.commands import COMMANDS
from pipeline.cli.main import _parser
from pipeline.core.config import Config
from pipeline.embeddings.layout import METADATA_SCHEMA, manifest_identity, shard_files

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
REGENERATE = "stale: run `python -m pipeline.cli.docgen` and commit docs/"


def _format_md() -> str:
    return (DOCS / "FORMAT.md").read_text(encoding="utf-8")


def _leaf_paths(data: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in data.items():
        if isinstance(v, dict) and v and prefix + k != "spark.conf":
            out |= _leaf_paths(v, f"{prefix}{k}.")
        else:
            out.add(prefix + k)
    return out


# ---- generated references ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["CONFIG.md", "CLI.md"])
def test_committed_reference_equals_fresh_generation(name: str) -> None:
    path = DOCS / name
    assert path.is_file(), f"docs/{name} missing: {REGENERATE}"
    assert path.read_text(encoding="utf-8") == docgen.generated()[name], f"docs/{name} {REGENERATE}"


def test_every_config_key_is_documented_with_a_description() -> None:
    text = (DOCS / "CONFIG.md").read_text(encoding="utf-8")
    keys = list(docgen.config_keys())
    # An independent walk of the config (its dumped defaults) finds the same leaves the generator documents.
    assert {k.path for k in keys} == _leaf_paths(Config().model_dump())
    for k in keys:
        assert f"| `{k.path}` |" in text, k.path
        assert k.field.description, f"{k.path} has no Field(description=...) in pipeline/core/config.py"


def test_config_defaults_follow_base_yaml() -> None:
    text = docgen.config_reference()
    row = next(line for line in text.splitlines() if line.startswith("| `model.pretrained` |"))
    assert "`laion2b_s34b_b79k` (conf/base.yaml; built-in `null`)" in row
    row = next(line for line in text.splitlines() if line.startswith("| `embed.batch_size` |"))
    assert "`int` (> 0)" in row and "| `64` |" in row


def test_every_subcommand_and_argument_is_documented() -> None:
    text = (DOCS / "CLI.md").read_text(encoding="utf-8")
    subs = docgen._subparsers(_parser())
    assert set(subs) == set(COMMANDS)
    for name, command in COMMANDS.items():
        assert f"## clipline {name}\n" in text, name
        assert f"distributor=spark: {command.on_spark()}" in " ".join(text.split()), name
        example = command.doc.split("Example:", 1)[1]
        for line in filter(None, (x.rstrip() for x in example.splitlines())):
            assert line in text, f"{name}: example line {line!r} missing"
        for action in docgen._documented(subs[name]):
            assert f"`{docgen._argument(action)}`" in text, (name, action.dest)


def test_generation_ignores_terminal_width(monkeypatch: pytest.MonkeyPatch) -> None:
    first = docgen.generated()
    monkeypatch.setenv("COLUMNS", "37")
    assert docgen.generated() == first


def test_check_mode_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert docgen.main(["--check", "--docs-dir", str(tmp_path)]) == 1
    assert docgen.main(["--docs-dir", str(tmp_path)]) == 0
    assert docgen.main(["--check", "--docs-dir", str(tmp_path)]) == 0
    cfg = tmp_path / "CONFIG.md"
    cfg.write_text(cfg.read_text().replace("`embed.batch_size`", "`embed.batchsize`"))
    capsys.readouterr()
    assert docgen.main(["--check", "--docs-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "CONFIG.md is stale" in err and "CLI.md" not in err


def test_module_entry_point_checks_the_repository_docs() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.cli.docgen", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr


def test_rendering_of_types_and_values() -> None:
    class Section(BaseModel):
        """A test section."""

        mode: Literal["a", "b"] | None = Field(None, description="The mode.")
        sizes: list[int] = Field(default_factory=lambda: [1, 2], description="Sizes.")
        ratio: float = Field(0.5, gt=0, le=1, description="A | ratio.")

    keys = {k.path: k for k in docgen.config_keys(Section, "s.", Section())}
    assert docgen.render_type(keys["s.mode"].field.annotation) == '"a" | "b" | None'
    assert docgen.render_type(keys["s.sizes"].field.annotation) == "list[int]"
    assert docgen.render_constraints(keys["s.ratio"].field) == "> 0, <= 1"
    assert docgen._key_row(keys["s.ratio"]) == "| `s.ratio` | `float` (> 0, <= 1) | `0.5` | A \\| ratio. |"
    assert [docgen.render_value(v) for v in (None, True, "4G", "4", "null", [1, "x"], {"b": 1, "a": "on"})] == [
        "null",
        "true",
        "4G",
        '"4"',
        '"null"',
        "[1, x]",
        '{a: "on", b: 1}',
    ]


# ---- FORMAT.md against the code ---------------------------------------------------------------------------


def test_format_names_every_embed_file() -> None:
    text = _format_md()
    files = shard_files("OUTPUT", "{shard}")
    for path in vars(files).values():
        assert path.removeprefix("OUTPUT/") in text, path


ARROW_NAMES = {"float": "float32"}


def test_format_documents_every_metadata_column_with_its_type() -> None:
    rows = [line for line in _format_md().splitlines() if line.startswith("| `")]
    for field in METADATA_SCHEMA:
        row = next((r for r in rows if f"`{field.name}`" in r.split("|")[1]), None)
        assert row is not None, f"metadata column {field.name} not documented"
        arrow = ARROW_NAMES.get(str(field.type), str(field.type))
        assert f"| {arrow} |" in row, (field.name, arrow, row)


def test_format_documents_every_status_value() -> None:
    source = "".join(
        (ROOT / "pipeline" / p).read_text() for p in ("core/images.py", "embed/decode.py", "embed/reader.py")
    )
    statuses = set(re.findall(r'SampleError\("(\w+)"', source)) | set(
        re.findall(r'row\.status, row\.error = "(\w+)"', source)
    )
    assert {"no_image", "empty_image", "decode_error", "too_large", "read_error", "preprocess_error"} <= statuses
    from pipeline.embed.decode import decode_caption

    caption_statuses = {decode_caption(x)[1] for x in (None, "text", b"\xff\xfe")}
    assert caption_statuses == {"ok", "missing", "invalid_utf8"}
    text = _format_md()
    for s in statuses | {"ok"}:
        assert f"| `{s}` |" in text, f"status {s} missing from the status table"
    for s in caption_statuses:
        assert f"`{s}`" in text


def test_format_documents_every_manifest_key(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.embed.stage as embed

    monkeypatch.setattr(embed, "model_fingerprint", lambda cfg: {"family": "open_clip"})
    manifest = embed.build_manifest(Config())
    text = _format_md()
    section = text.split("### `manifest.json`", 1)[1].split("\n### ", 1)[0]
    first_cells = " ".join(line.split("|")[1] for line in section.splitlines() if line.startswith("| `"))
    for key in [*manifest, "dim"]:
        assert f"`{key}`" in first_cells, key
    identity = next(line for line in section.splitlines() if line.startswith("**Identity**"))
    for key in manifest_identity(manifest):
        assert f"`{key}`" in identity, key


class _FakeModel:
    """Just enough of the model interface for the per-shard loop: constant unit vectors."""

    dim = 4

    def __init__(self) -> None:
        import torch

        self.device = torch.device("cpu")

    def preprocess(self, image: Any) -> Any:
        import torch

        return torch.zeros(3, 2, 2)

    def preprocess_info(self) -> dict[str, Any]:
        return {}

    def tokenize(self, texts: list[str]) -> list[str]:
        return texts

    def _unit(self, n: int) -> Any:
        import torch

        return torch.full((n, self.dim), 0.5)

    def encode_image(self, pixels: Any) -> Any:
        return self._unit(len(pixels))

    def encode_text(self, tokens: Any) -> Any:
        return self._unit(len(tokens))


def test_format_documents_every_stats_key(tmp_path: Path) -> None:
    from pipeline.core.config import EmbedConfig
    from pipeline.core.tasks import ShardTask
    from pipeline.embed.runner import run_shard
    from tests.support.helpers import make_shards

    tar = make_shards(tmp_path / "in", 1, 3)[0]
    out = str(tmp_path / "out")
    stats = run_shard(ShardTask("00000", str(tar), out, "webdataset"), _FakeModel(), EmbedConfig(batch_size=2))  # type: ignore[arg-type]
    assert json.loads(Path(shard_files(out, "00000").stats).read_text()) == json.loads(json.dumps(stats))
    section = _format_md().split("### `stats/stats_{shard}.json`", 1)[1].split("\n### ", 1)[0]
    documented = set(re.findall(r"`(\w+)`", section))
    assert set(stats) <= documented, set(stats) - documented
    assert set(stats["timings"]) <= documented, set(stats["timings"]) - documented
    assert np.load(shard_files(out, "00000").img_emb).shape == (3, 4)


def test_format_documents_dedup_outputs(tmp_path: Path) -> None:
    from pipeline.core.config import load_config
    from pipeline.dedup.stage import dedup
    from tests.support.helpers import random_unit, write_fake_embed_output

    vecs = random_unit(12, 8, seed=3)
    vecs[5] = vecs[2]
    emb = write_fake_embed_output(tmp_path / "emb", {"00000": vecs})
    out = tmp_path / "dedup"
    summary = dedup(load_config([f"input={emb}", f"output={out}", "dedup.mode=exact"]))
    section = _format_md().split("## Dedup output", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`(\w+)`", section))
    produced = {p.name for p in out.iterdir()}
    assert {"duplicates.parquet", "keep.parquet", "drop.parquet", "summary.json", "similarity_hist.png"} <= produced
    for name in produced:
        assert name in section, f"dedup file {name} not documented"
    import pyarrow.parquet as pq

    for name in ("duplicates", "keep", "drop"):
        columns = set(pq.read_schema(out / f"{name}.parquet").names)
        assert columns <= documented, (name, columns - documented)
    assert set(summary) <= documented, set(summary) - documented
    assert pa.types.is_boolean(pq.read_schema(out / "duplicates.parquet").field("kept").type)


def test_format_documents_index_outputs(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from pipeline.core.config import load_config
    from pipeline.index.stage import build
    from tests.support.helpers import random_unit, write_fake_embed_output

    emb = write_fake_embed_output(tmp_path / "emb", {"00000": random_unit(30, 8, 1), "00001": random_unit(20, 8, 2)})
    overrides = ["index.max_index_memory_usage=10M", "index.current_memory_available=500M", "index.recall_queries=10"]
    build(load_config([f"input={emb}", *overrides]))
    out = tmp_path / "emb" / "index"
    section = _format_md().split("## Index output", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`([\w@ ]+)`", section))
    for name in {p.name for p in out.iterdir()}:
        generic = re.sub(r"^(image|text)", "M", name)
        assert generic in section, f"index file {name} not documented"
    for modality in ("image", "text"):
        columns = set(pq.read_schema(out / f"{modality}_ids.parquet").names)
        assert columns <= documented, columns - documented
        info = json.loads((out / f"{modality}.json").read_text())
        for part in (info, info["embed"], info["quality"], *info["history"]):
            assert set(part) <= documented, set(part) - documented
