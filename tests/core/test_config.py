"""Config loading, overrides, groups and every error path."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.config import Config, load_config, require, to_dict
from pipeline.core.errors import ConfigError


def test_defaults_from_base_yaml() -> None:
    cfg = load_config([])
    assert isinstance(cfg, Config)
    assert cfg.model.arch == "ViT-B-32" and cfg.model.pretrained == "laion2b_s34b_b79k"
    assert cfg.embed.batch_size == 64 and cfg.distributor == "local"


def test_dotted_overrides_are_typed() -> None:
    cfg = load_config(
        [
            "embed.batch_size=128",
            "embed.write_parquet=true",
            "index.max_index_memory_usage=2G",
            "dedup.threshold=0.9",
            "input=/a/{00000..00002}.tar",
            "spark.conf={spark.x: '1'}",
        ]
    )
    assert cfg.embed.batch_size == 128 and cfg.embed.write_parquet is True
    assert cfg.index.max_index_memory_usage == "2G" and cfg.dedup.threshold == 0.9
    assert cfg.input == "/a/{00000..00002}.tar"
    assert cfg.spark.conf == {"spark.x": "1"}


def test_unknown_key_names_its_path() -> None:
    with pytest.raises(ConfigError, match=r"foo: unknown key"):
        load_config(["foo=1"])
    with pytest.raises(ConfigError, match=r"embed\.batchsize: unknown key"):
        load_config(["embed.batchsize=1"])


def test_wrong_type_names_path_and_expectation() -> None:
    with pytest.raises(ConfigError, match=r"embed\.batch_size: .*integer.*'abc'"):
        load_config(["embed.batch_size=abc"])
    with pytest.raises(ConfigError, match=r"embed\.batch_size: .*greater than 0"):
        load_config(["embed.batch_size=0"])
    with pytest.raises(ConfigError, match=r"distributor: .*'local' or 'spark'"):
        load_config(["distributor=ray"])
    with pytest.raises(ConfigError, match=r"model\.precision"):
        load_config(["model.precision=fp8"])


def test_setting_a_key_below_a_value_fails() -> None:
    with pytest.raises(ConfigError, match=r"embed\.batch_size: is a value"):
        load_config(["embed.batch_size.x=1"])


def test_override_without_equals_fails() -> None:
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(["embed.batch_size"])


def test_groups_model_and_distributor() -> None:
    cfg = load_config(["distributor=spark", "model=vit-l-14"])
    assert cfg.distributor == "spark" and cfg.spark.conf["spark.task.maxFailures"] == "4"
    assert cfg.model.arch == "ViT-L-14"
    cfg = load_config(["model=open_clip:ViT-B-16/openai", "model.precision=int8"])
    assert (cfg.model.family, cfg.model.arch, cfg.model.pretrained, cfg.model.precision) == (
        "open_clip",
        "ViT-B-16",
        "openai",
        "int8",
    )
    cfg = load_config(["model.precision=int8", "model=ViT-B-32"])  # group applies first whatever the order
    assert cfg.model.precision == "int8" and cfg.model.pretrained is None
    assert load_config(["model=hf:/models/clip"]).model.path == "/models/clip"
    assert load_config(["model=offline"]).model.family == "offline"


def test_config_file_merges(tmp_path: Path) -> None:
    f = tmp_path / "job.yaml"
    f.write_text("input: /x\nembed:\n  batch_size: 7\n")
    cfg = load_config(["embed.prefetch=3"], config_file=f)
    assert cfg.input == "/x" and cfg.embed.batch_size == 7 and cfg.embed.prefetch == 3 and cfg.embed.image is True
    bad = tmp_path / "bad.yaml"
    bad.write_text("embed: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config([], config_file=bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config([], config_file=tmp_path / "missing.yaml")
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config([], config_file=lst)


def test_require_and_roundtrip() -> None:
    cfg = load_config([])
    with pytest.raises(ConfigError, match="missing required value: input=.*output="):
        require(cfg, "input", "output")
    again = Config.model_validate_json(cfg.model_dump_json())
    assert to_dict(again) == to_dict(cfg)
