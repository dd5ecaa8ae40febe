"""The storage section: nested options from the command line and YAML, `${ENV:NAME}` resolved only when applied, the
options reaching fsspec in this process and in spawned ones, and secrets kept out of what is written or logged."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest

from pipeline.cli.main import main
from pipeline.core import storage
from pipeline.core.config import load_config, to_dict
from pipeline.core.errors import ConfigError
from pipeline.core.fsio import put_json

SECRET = "s3cr3t-value-91"


@pytest.fixture(autouse=True)
def forget_secrets() -> Iterator[None]:
    saved = set(storage._SECRETS)
    yield
    storage._SECRETS.clear()
    storage._SECRETS.update(saved)


def test_dotted_keys_and_yaml_give_nested_options_per_protocol(tmp_path: Path) -> None:
    cfg = load_config(
        [
            "storage.s3.endpoint_url=http://127.0.0.1:9000",
            "storage.s3.anon=false",
            "storage.s3.client_kwargs.region_name=eu-west-1",
            "storage.s3.secret=${ENV:MY_SECRET}",
        ]
    )
    assert cfg.storage == {
        "s3": {
            "endpoint_url": "http://127.0.0.1:9000",
            "anon": False,
            "client_kwargs": {"region_name": "eu-west-1"},
            "secret": "${ENV:MY_SECRET}",  # kept as written: resolved only when applied
        }
    }
    conf = tmp_path / "c.yaml"
    conf.write_text("storage:\n  gcs:\n    project: p1\n  s3:\n    config_kwargs: {max_pool_connections: 50}\n")
    cfg = load_config(["storage.s3.profile=dev"], conf)
    assert cfg.storage == {
        "gcs": {"project": "p1"},
        "s3": {"config_kwargs": {"max_pool_connections": 50}, "profile": "dev"},
    }


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("storage.nope.x=1", "'nope' is not an fsspec protocol"),
        ("storage.s3=3", "storage.s3: Input should be a valid dictionary"),
        ("storage.s3.key=${ENV:1bad}", "${ENV:1bad} does not name an environment variable"),
    ],
)
def test_bad_storage_config_fails_before_any_work(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match="invalid configuration") as e:
        load_config([override])
    assert message in str(e.value)


def test_a_literal_secret_is_not_echoed_by_a_validation_error() -> None:
    with pytest.raises(ConfigError) as e:
        load_config([f"storage.nope.secret={SECRET}"])
    assert SECRET not in str(e.value) and "'secret': '***'" in str(e.value)


def test_resolve_reads_the_environment_and_names_a_missing_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    section = {"s3": {"secret": "${ENV:MY_SECRET}", "client_kwargs": {"endpoint_url": "http://${ENV:HOST}:9"}}}
    monkeypatch.setenv("MY_SECRET", SECRET)
    monkeypatch.delenv("HOST", raising=False)
    with pytest.raises(ConfigError, match=r"storage.s3.client_kwargs.endpoint_url: environment variable HOST"):
        storage.resolve(section)
    monkeypatch.setenv("HOST", "h")
    assert storage.resolve(section) == {"s3": {"secret": SECRET, "client_kwargs": {"endpoint_url": "http://h:9"}}}


def test_unset_variable_exits_2_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CLIPLINE_UNSET_VAR", raising=False)
    code = main(["dedup", f"input={tmp_path}", "storage.s3.secret=${ENV:CLIPLINE_UNSET_VAR}"])
    assert code == 2 and "environment variable CLIPLINE_UNSET_VAR is not set" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_redacted_config_keeps_references_and_hides_literal_secrets() -> None:
    cfg = load_config(
        [
            "storage.s3.key=AKIALITERAL",
            "storage.s3.secret=${ENV:MY_SECRET}",
            "storage.s3.endpoint_url=http://127.0.0.1:9000",
            "storage.abfs.account_key=xyzxyz",
            "storage.abfs.account_name=acct",
        ]
    )
    cfg.spark.conf = {"spark.hadoop.fs.s3a.secret.key": "hadoopsecret", "spark.executor.memory": "2g"}
    written = to_dict(cfg)
    assert written["storage"] == {
        "s3": {"key": "***", "secret": "${ENV:MY_SECRET}", "endpoint_url": "http://127.0.0.1:9000"},
        "abfs": {"account_key": "***", "account_name": "acct"},
    }
    assert written["spark"]["conf"] == {"spark.hadoop.fs.s3a.secret.key": "***", "spark.executor.memory": "2g"}
    assert cfg.storage["s3"]["key"] == "AKIALITERAL"  # the Config itself still holds what the user gave


def test_redact_arg_hides_secret_overrides_only() -> None:
    assert storage.redact_arg("storage.s3.secret=abcdef") == "storage.s3.secret=***"
    assert storage.redact_arg("storage.s3.secret=${ENV:X}") == "storage.s3.secret=${ENV:X}"
    assert storage.redact_arg("storage.s3.endpoint_url=http://h") == "storage.s3.endpoint_url=http://h"
    assert storage.redact_arg("embed.batch_size=8") == "embed.batch_size=8"


def test_resolved_secrets_are_masked_in_logs_and_json_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MY_SECRET", SECRET)
    storage.resolve({"s3": {"secret": "${ENV:MY_SECRET}", "token": "literal-token"}})
    assert storage.mask(f"x {SECRET} y literal-token") == "x *** y ***"
    handler = logging.StreamHandler(stream := __import__("io").StringIO())
    handler.addFilter(storage.MaskSecrets())
    log = logging.getLogger("tests.storage")
    log.addHandler(handler)
    try:
        log.warning("denied for %s", SECRET)
        try:
            raise RuntimeError(f"bad key {SECRET}")
        except RuntimeError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    assert SECRET not in stream.getvalue() and stream.getvalue().count("***") == 2
    put_json(str(tmp_path / "s.json"), {"error": f"boom {SECRET}"})
    assert json.loads((tmp_path / "s.json").read_text()) == {"error": "boom ***"}


def _child_conf(queue: Any) -> None:
    import fsspec as child_fsspec

    queue.put(child_fsspec.config.conf.get("s3"))


def test_applied_reaches_fsspec_here_and_in_spawned_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("s3fs")
    monkeypatch.setenv("MY_SECRET", SECRET)
    monkeypatch.delitem(fsspec.config.conf, "s3", raising=False)
    monkeypatch.delenv("FSSPEC_S3", raising=False)
    section = {"s3": {"endpoint_url": "http://127.0.0.1:1", "secret": "${ENV:MY_SECRET}", "key": "k"}}
    want = {"endpoint_url": "http://127.0.0.1:1", "secret": SECRET, "key": "k"}
    with storage.applied(section) as resolved:
        assert resolved == {"s3": want}
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        assert (fs.endpoint_url, fs.secret, fs.key) == ("http://127.0.0.1:1", SECRET, "k")
        ctx = multiprocessing.get_context("spawn")  # as the local pool and img2dataset start their workers
        queue = ctx.Queue()
        child = ctx.Process(target=_child_conf, args=(queue,))
        child.start()
        got = queue.get(timeout=60)
        child.join(timeout=30)
        assert got == want
    assert "s3" not in fsspec.config.conf and "FSSPEC_S3" not in os.environ  # restored


def test_a_worker_learns_the_secrets_it_must_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    # a Spark executor: the values came as FSSPEC_S3, the variable the config names is not set there
    monkeypatch.delenv("MY_SECRET", raising=False)
    monkeypatch.setenv("FSSPEC_S3", json.dumps({"secret": SECRET, "endpoint_url": "http://h:1"}))
    storage.remember({"s3": {"secret": "${ENV:MY_SECRET}", "endpoint_url": "http://h:1"}})
    assert storage.mask(f"a {SECRET} http://h:1") == "a *** http://h:1"
