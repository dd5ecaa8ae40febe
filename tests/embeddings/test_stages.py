"""The same vectors in every input format give the same stage results as clipline's own format, keyed by the source's
keys: dedup groups and keep/drop lists, index recall, id maps and query results, key queries, zero-shot labels; and
the model given for folders that record none is width-checked before any work (exit 2)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pipeline.cli.main import main
from pipeline.core.config import Config, ModelConfig, load_config
from pipeline.core.errors import ConfigError
from pipeline.dedup.stage import dedup
from pipeline.index.stage import build
from pipeline.query.search import Searcher, query_cli
from pipeline.query.zeroshot import classify_cli, zero_shot
from tests.support.foreign import (
    Samples,
    clip_retrieval_names,
    make_samples,
    write_clip_retrieval,
    write_clipline,
    write_npy,
    write_parquet,
)


@dataclass
class Folder:
    """One format's copy of the samples: where, its embeddings.* options, and how clipline's (shard, key) reads there."""

    path: str
    options: list[str]
    ident: dict[tuple[str, str], tuple[str, str]]
    has_sha: bool = True
    has_text: bool = False

    def cfg(self, *extra: str) -> Config:
        return load_config([f"input={self.path}", *self.options, "log_level=WARNING", *extra])


def _ident(data: Samples, shard_name: dict[str, str], keyed: bool) -> dict[tuple[str, str], tuple[str, str]]:
    return {(s, k): (shard_name[s], k if keyed else str(i)) for s in data.shards for i, k in enumerate(data.keys[s])}


FORMATS = ["clip-retrieval", "npy", "parquet-list-f16", "parquet-fixed-f32"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("formats")
    data = make_samples(n_shards=3, per_shard=60, dim=32)
    same = {s: s for s in data.shards}
    return {
        "data": data,
        "clipline": Folder(write_clipline(str(tmp / "clipline"), data), [], _ident(data, same, True), has_text=True),
        "clip-retrieval": Folder(
            write_clip_retrieval(str(tmp / "cr"), data),
            ["embeddings.input_format=clip-retrieval", "embeddings.key_column=image_path"],
            _ident(data, clip_retrieval_names(data), True),
            has_text=True,
        ),
        "npy": Folder(
            write_npy(str(tmp / "npy"), data), ["embeddings.input_format=npy"], _ident(data, same, False), False
        ),
        "parquet-list-f16": Folder(
            write_parquet(str(tmp / "pl"), data, "list", np.float16, row_group_size=25),
            ["embeddings.input_format=parquet", "embeddings.key_column=uid", "embeddings.chunk_rows=16"],
            _ident(data, same, True),
        ),
        "parquet-fixed-f32": Folder(
            write_parquet(str(tmp / "pf"), data, "fixed_size_list", np.float32, column="vec"),
            ["embeddings.input_format=parquet", "embeddings.key_column=uid", "embeddings.embedding_column=vec"],
            _ident(data, same, True),
        ),
    }


def translated(
    df: pd.DataFrame, ident: dict[tuple[str, str], tuple[str, str]], key_cols: dict[str, str]
) -> pd.DataFrame:
    """clipline's table with each (shard column, key column) pair rewritten as the other format names it."""
    out = df.copy()
    for key_col, shard_col in key_cols.items():
        pairs = [ident[(str(s), str(k))] for s, k in zip(df[shard_col], df[key_col])]
        out[shard_col] = [p[0] for p in pairs]
        out[key_col] = [p[1] for p in pairs]
    return out


def same_table(mine: pd.DataFrame, ref: pd.DataFrame, sort: list[str]) -> None:
    a = mine.sort_values(sort).reset_index(drop=True)
    b = ref.sort_values(sort).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_dtype=False)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dedup_groups_and_lists_equal_clipline_keyed_by_the_source(
    folders: dict[str, Any], fmt: str, tmp_path: Path
) -> None:
    f, ref_folder = folders[fmt], folders["clipline"]
    exact = f"dedup.exact={str(f.has_sha).lower()}"  # plain npy has no hashes: compare near groups only
    ref = dedup(ref_folder.cfg(f"output={tmp_path / 'ref'}", "dedup.mode=exact", exact))
    mine = dedup(f.cfg(f"output={tmp_path / 'mine'}", "dedup.mode=exact", exact))
    assert mine["input"] == {
        "input_format": fmt if fmt == "clip-retrieval" else fmt.split("-")[0],
        "skipped_zero_vectors": 0,
        "skipped_nonfinite_vectors": 0,
        "normalized_vectors": 0,
    }
    for k in ("samples", "samples_embedded", "groups", "samples_in_groups", "near_pairs", "exact_pairs", "dropped"):
        assert mine[k] == ref[k], k
    assert ref["groups"] == (2 if f.has_sha else 1) and ref["dropped"] == (3 if f.has_sha else 2)
    cols = {"duplicates": {"key": "shard"}, "keep": {"key": "shard"}, "drop": {"key": "shard"}}
    for name, keys in cols.items():
        theirs = pd.read_parquet(tmp_path / "ref" / f"{name}.parquet")
        if name == "duplicates":
            # matched_key names the group's keeper, maybe in another shard (clipline's keys are unique here)
            keeper = {k: fk for (_, k), (_, fk) in f.ident.items()}
            theirs = theirs.assign(matched_key=theirs["matched_key"].map(keeper))
        want = translated(theirs, f.ident, keys)
        got = pd.read_parquet(tmp_path / "mine" / f"{name}.parquet")
        same_table(got, want, ["shard", "key"])


def test_semdedup_on_a_foreign_folder_finds_the_planted_groups(folders: dict[str, Any], tmp_path: Path) -> None:
    f = folders["parquet-list-f16"]
    s = dedup(f.cfg(f"output={tmp_path}", "dedup.mode=semdedup", "dedup.semdedup_clusters=4"))
    dup = pd.read_parquet(tmp_path / "duplicates.parquet")
    data = folders["data"]
    trio = {data.keys["00000"][7], data.keys["00001"][5], data.keys["00002"][3]}
    assert s["method"] == "semdedup" and trio <= set(dup["key"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_index_recall_id_map_and_queries_equal_clipline(folders: dict[str, Any], fmt: str, tmp_path: Path) -> None:
    f, ref_folder, data = folders[fmt], folders["clipline"], folders["data"]
    modalities = "index.modalities=[image,text]" if f.has_text else "index.modalities=[image]"
    common = ["index.recall_queries=50", "index.nb_cores=1", "embeddings.record_model=false", modalities]
    ref = build(ref_folder.cfg(f"output={tmp_path / 'ref'}", *common))
    mine = build(f.cfg(f"output={tmp_path / 'mine'}", *common))
    for m in ("image", "text") if f.has_text else ("image",):
        for k in ("vectors", "index_key", "recall@10", "recall@100", "shards"):
            assert mine[m][k] == ref[m][k], (m, k)
        want = translated(pd.read_parquet(tmp_path / "ref" / f"{m}_ids.parquet"), f.ident, {"key": "shard"})
        got = pd.read_parquet(tmp_path / "mine" / f"{m}_ids.parquet")
        if fmt == "npy":  # no metadata: no captions or urls
            want = want.assign(caption=None, url=None)
        pd.testing.assert_frame_equal(got, want, check_dtype=False)
    queries = np.concatenate([data.img["00001"][:5], data.img["00002"][10:12]])
    theirs = Searcher(str(tmp_path / "ref")).search_vectors(queries, k=5)
    hits = Searcher(str(tmp_path / "mine")).search_vectors(queries, k=5)
    want = translated(theirs, f.ident, {"key": "shard"})
    cols = ["query", "rank", "key", "shard", "id", "score"]
    pd.testing.assert_frame_equal(hits[cols], want[cols], check_dtype=False)
    if fmt != "npy":  # row-number keys repeat in every file: a key query on them is refused (below)
        key = f.ident[("00001", data.keys["00001"][5])][1]
        by_key = query_cli(load_config([f"input={tmp_path / 'mine'}", "query.format=jsonl"]), key=[key])
        assert f'"key": "{key}"' in by_key.splitlines()[0]
        assert data.keys["00000"][7] in by_key  # its planted near copy comes next
    else:
        with pytest.raises(ConfigError, match="keys in several shards"):
            query_cli(load_config([f"input={tmp_path / 'mine'}"]), key=["5"])


# ---- the model of folders that record none ---------------------------------------------------------------


def _model(tiny_model: dict[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in tiny_model.items()] + ["model.pretrained=null", "model.device=cpu"]


@pytest.fixture(scope="module")
def narrow(tmp_path_factory: pytest.TempPathFactory) -> str:
    """16-d vectors: the tiny test model makes 32-d ones."""
    return write_clip_retrieval(str(tmp_path_factory.mktemp("narrow") / "cr"), make_samples(2, 40, 16))


def test_index_refuses_a_model_of_another_width_before_any_work(
    narrow: str, tiny_model: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["index", f"input={narrow}", f"output={tmp_path / 'ix'}", "embeddings.input_format=clip-retrieval"]
    assert main([*args, *_model(tiny_model)]) == 2
    err = capsys.readouterr().err
    assert "makes 32-d embeddings but" in err and "holds 16-d vectors" in err and "tiny-test" in err
    assert not (tmp_path / "ix").exists()


def test_classify_and_text_query_refuse_a_model_of_another_width(
    narrow: str, tiny_model: dict[str, str], tmp_path: Path
) -> None:
    options = ["embeddings.input_format=clip-retrieval", *_model(tiny_model)]
    cfg = load_config([f"input={narrow}", f"output={tmp_path / 'zs'}", *options])
    with pytest.raises(ConfigError, match="makes 32-d embeddings but input=.* holds 16-d vectors"):
        classify_cli(cfg, classes=["cat", "dog"])
    assert not (tmp_path / "zs").exists()
    build(load_config([f"input={narrow}", f"output={tmp_path / 'ix'}", *options[:1], "embeddings.record_model=false"]))
    qcfg = load_config([f"input={tmp_path / 'ix'}", *_model(tiny_model)])
    with pytest.raises(ConfigError, match="makes 32-d embeddings but .*image.json holds 16-d vectors"):
        query_cli(qcfg, text=["a cat"])
    with pytest.raises(ConfigError, match="records no model"):
        Searcher(str(tmp_path / "ix")).model  # noqa: B018


@pytest.mark.slow
def test_text_query_and_classify_with_the_model_given_for_a_foreign_folder(
    folders: dict[str, Any], tiny_model: dict[str, str], tmp_path: Path
) -> None:
    from pipeline.models import load_model

    f, ref_folder = folders["clip-retrieval"], folders["clipline"]
    model_args = _model(tiny_model)
    build(f.cfg(f"output={tmp_path / 'mine'}", "index.modalities=[image]", "index.recall_queries=20", *model_args))
    build(ref_folder.cfg(f"output={tmp_path / 'ref'}", "index.modalities=[image]", "index.recall_queries=20"))
    # recorded at index time: the query needs no model arguments
    got = Searcher(str(tmp_path / "mine")).search_text(["a photo"], k=5)
    model = load_model(ModelConfig.model_validate(load_config(model_args).model.model_dump()))
    vec = model.encode_text(model.tokenize(["a photo"])).numpy()
    want = translated(Searcher(str(tmp_path / "ref")).search_vectors(vec, 5, ["a photo"]), f.ident, {"key": "shard"})
    assert got["key"].tolist() == want["key"].tolist() and np.allclose(got["score"], want["score"], atol=1e-6)
    # zero-shot: the model given on the command line; labels per key as on clipline's own format with that model
    classify_cli(f.cfg(f"output={tmp_path / 'zs'}", *model_args), classes=["cat", "dog", "car"], k=2)
    zero_shot(ref_folder.path, ["cat", "dog", "car"], k=2, output=str(tmp_path / "zref"), model=model)
    mine = pd.concat(pd.read_parquet(p) for p in sorted((tmp_path / "zs" / "zeroshot").glob("*.parquet")))
    ref = pd.concat(pd.read_parquet(p) for p in sorted((tmp_path / "zref" / "zeroshot").glob("*.parquet")))
    assert mine["key"].tolist() == ref["key"].tolist() and mine["label_1"].tolist() == ref["label_1"].tolist()
    np.testing.assert_allclose(mine["score_1"], ref["score_1"], atol=1e-6)


def test_report_on_a_foreign_folder(folders: dict[str, Any], tmp_path: Path) -> None:
    from pipeline.report.page import report_cli

    f = folders["parquet-list-f16"]
    text = report_cli(f.cfg(f"output={tmp_path / 'rep'}"))
    assert (tmp_path / "rep" / "report.html").exists() and "error" not in text, text


def test_report_samples_rows_by_the_formats_own_rule(folders: dict[str, Any]) -> None:
    """clipline's status columns decide which rows have both embeddings; a clip-retrieval folder keeps none, so all
    its rows count (the report's sampled caption queries and CLIP scores come from these rows)."""
    from pipeline.core.config import EmbeddingsConfig
    from pipeline.report.runoutput import RunOutput

    data = folders["data"]
    n = sum(len(data.keys[s]) for s in data.shards)
    f = folders["clip-retrieval"]
    options = EmbeddingsConfig(input_format="clip-retrieval", key_column="image_path")
    rows = RunOutput(f.path, options).embedded_both(["caption"])
    assert rows is not None and len(rows) == n and rows["caption"].notna().all()
    own = RunOutput(folders["clipline"].path).embedded_both(["caption"])
    assert own is not None and len(own) == n


@pytest.mark.slow
@pytest.mark.spark
def test_spark_index_build_of_a_clip_retrieval_folder(
    folders: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """autofaiss's pyspark mode reads the vectors the stage staged from the foreign folder, chunk by chunk."""
    import logging

    caplog.set_level(logging.INFO, logger="autofaiss")
    f, ref_folder = folders["clip-retrieval"], folders["clipline"]
    common = ["index.modalities=[image]", "index.index_key=IVF4,Flat", "index.recall_queries=50", "index.nb_cores=1"]
    spark = ["distributor=spark", "spark.master=local[2]", "embeddings.chunk_rows=25"]
    mine = build(f.cfg(f"output={tmp_path / 'mine'}", *common, *spark, "embeddings.record_model=false"))
    ref = build(ref_folder.cfg(f"output={tmp_path / 'ref'}", *common))
    assert mine["image"]["vectors"] == ref["image"]["vectors"] == 180
    assert mine["image"]["recall@10"] >= 0.9
    assert any("Merging indices" in r.getMessage() for r in caplog.records)  # built in Spark tasks
    want = translated(pd.read_parquet(tmp_path / "ref" / "image_ids.parquet"), f.ident, {"key": "shard"})
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "mine" / "image_ids.parquet"), want, check_dtype=False)
    top = Searcher(str(tmp_path / "mine")).search_vectors(folders["data"].img["00002"][:10], k=1)
    assert top["key"].tolist() == folders["data"].keys["00002"][:10]
