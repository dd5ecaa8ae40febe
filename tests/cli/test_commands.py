"""The command records: the parser, the kwargs and the docs follow them, a new command is one record, and
distributor=spark means the same for every command (runs on Spark, or exit 2 before any work)."""

from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest

import pipeline.dedup.stage
import pipeline.download.stage
import pipeline.embed.stage
import pipeline.index.stage
from pipeline.cli import docgen
from pipeline.cli.commands import COMMANDS, Command, arg
from pipeline.cli.main import _parser, main
from pipeline.core.config import Config
from tests.support.helpers import random_unit, write_fake_embed_output

pytestmark = pytest.mark.usefixtures("restore_logging")
CALLS: list[tuple[Config, dict[str, Any]]] = []


def recorder(cfg: Config, **kwargs: Any) -> dict[str, Any]:
    """Stands in for a command's function: remembers how it was called."""
    CALLS.append((cfg, kwargs))
    return {"called": True, "output": cfg.output}


def must_not_run(cfg: Config, **kwargs: Any) -> None:
    raise AssertionError("the command's function ran although the command should have been refused")


@pytest.fixture(autouse=True)
def _clear_calls() -> None:
    CALLS.clear()


def _replace(monkeypatch: pytest.MonkeyPatch, name: str, **changes: Any) -> Command:
    command = dataclasses.replace(COMMANDS[name], **changes)
    monkeypatch.setitem(COMMANDS, name, command)
    return command


def test_the_parser_is_built_from_the_records() -> None:
    subs = docgen._subparsers(_parser())
    assert list(subs) == list(COMMANDS)
    for name, command in COMMANDS.items():
        flags = {f for a in subs[name]._actions for f in (a.option_strings or [a.dest])}
        declared = {f for a in command.args for f in a.flags}
        assert flags == declared | {"-h", "--help", "overrides", "-c", "--config"}, name


def test_a_new_command_is_one_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Argument, kwargs, help, docs and run.json all follow from the record alone."""
    echo = Command(
        name="echo",
        fn="tests.cli.test_commands:recorder",
        help="say a word",
        doc="Say a word.\n\nExample:\n  clipline echo --word hello output=/tmp/x",
        args=(arg("--word", help="the word to say"),),
        kwargs=lambda a: {"word": a.word},
    )
    monkeypatch.setitem(COMMANDS, "echo", echo)
    assert main(["echo", "--help"]) == 0
    text = capsys.readouterr().out
    assert "the word to say" in text and "clipline echo --word hello" in text and "refused, exit 2" in text
    out = tmp_path / "out"
    out.mkdir()
    assert main(["echo", "--word", "hello", f"output={out}", "log_level=WARNING"]) == 0
    [(cfg, kwargs)] = CALLS
    assert kwargs == {"word": "hello"} and cfg.output == str(out)
    assert "called: True" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["command"] == "echo"
    reference = docgen.cli_reference()
    assert "## clipline echo\n" in reference and "| `--word WORD` | the word to say |" in reference


def test_positional_folders_are_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _replace(monkeypatch, "demo", fn="tests.cli.test_commands:recorder")
    _replace(monkeypatch, "report", fn="tests.cli.test_commands:recorder")
    assert main(["demo", str(tmp_path / "d"), "--n-images", "7", "log_level=WARNING"]) == 0
    assert main(["demo", "log_level=WARNING"]) == 0  # a first KEY=VALUE is an override, not a folder name
    assert main(["report", str(tmp_path), "--query", "a cat", "log_level=WARNING"]) == 0
    (demo, demo_kw), (plain, _), (report, report_kw) = CALLS
    assert demo.output == str(tmp_path / "d") and demo_kw == {"n_images": 7}
    assert plain.output is None and plain.log_level == "WARNING"
    assert report.input == str(tmp_path) and report_kw == {"queries": ["a cat"]}
    assert not (tmp_path / "run.json").exists()  # a report never replaces the run.json of what it reports on


def test_query_options_are_config_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    _replace(monkeypatch, "query", fn="tests.cli.test_commands:recorder")
    assert main(["query", "input=/nowhere", "--text", "a", "--text", "b", "query.k=3", "-k", "4"]) == 0
    [(cfg, kwargs)] = CALLS
    assert cfg.query.k == 4 and kwargs == {"text": ["a", "b"], "image": None, "key": None}


def test_index_and_dedup_records_use_the_stages_own_default_output() -> None:
    cfg = Config(input="/data/emb/")
    assert pipeline.index.stage.default_output(cfg) == "/data/emb/index"
    assert pipeline.dedup.stage.default_output(cfg) == "/data/emb/dedup"
    assert pipeline.dedup.stage.plan(cfg)[1] == "/data/emb/dedup"
    assert COMMANDS["index"].default_output == "pipeline.index.stage:default_output"
    assert COMMANDS["dedup"].default_output == "pipeline.dedup.stage:default_output"


# ---- one switch: distributor=spark ---------------------------------------------------------------------------

REFUSED = [name for name, c in COMMANDS.items() if "spark" not in c.distributors]
ON_SPARK = [name for name, c in COMMANDS.items() if "spark" in c.distributors]


def test_the_commands_that_run_on_spark() -> None:
    assert ON_SPARK == ["download", "embed", "index", "dedup", "run"]


@pytest.mark.parametrize("name", REFUSED)
def test_refused_on_spark_with_exit_2_before_any_work(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _replace(monkeypatch, name, fn="tests.cli.test_commands:must_not_run")
    out = tmp_path / "out"
    assert main([name, f"input={tmp_path}", f"output={out}", "distributor=spark"]) == 2
    err = capsys.readouterr().err
    assert f"clipline {name}: distributor=spark is not supported by {name} ({name}: {COMMANDS[name].spark})" in err
    assert "nothing was run" in err and not out.exists()


@pytest.mark.parametrize("name", ON_SPARK)
def test_accepted_on_spark_and_passed_on(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _replace(monkeypatch, name, fn="tests.cli.test_commands:recorder")
    stages = ["--stage", "embed", "--stage", "index"] if name == "run" else []
    assert main([name, f"input={tmp_path}", f"output={tmp_path}", "distributor=spark", *stages]) == 0
    [(cfg, _)] = CALLS
    assert cfg.distributor == "spark"


def _fake_stage(name: str) -> Any:
    def stage(cfg: Config) -> dict[str, Any]:
        CALLS.append((cfg, {"stage": name}))
        return {"stage": name}

    return stage


def test_run_passes_spark_to_its_stages_and_refuses_a_stage_that_cannot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for module, fn in [
        (pipeline.download.stage, "download"),
        (pipeline.embed.stage, "embed"),
        (pipeline.index.stage, "build"),
        (pipeline.dedup.stage, "dedup"),
    ]:
        monkeypatch.setattr(module, fn, _fake_stage(fn))
    out = tmp_path / "out"
    args = ["run", f"input={tmp_path}/urls.csv", f"output={out}", "distributor=spark", "log_level=ERROR"]
    (tmp_path / "urls.csv").write_text("url\nhttp://127.0.0.1/a.jpg\n")
    assert main(args) == 0  # every stage runs on Spark now
    assert [(kw["stage"], cfg.distributor) for cfg, kw in CALLS] == [
        (s, "spark") for s in ("download", "embed", "build", "dedup")
    ]
    CALLS.clear()
    _replace(monkeypatch, "dedup", distributors=("local",), spark="a stage that cannot")  # were one to refuse:
    out2 = tmp_path / "out2"
    args = ["run", f"input={tmp_path}/urls.csv", f"output={out2}", "distributor=spark", "log_level=ERROR"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "not supported by dedup" in err and "--stage to leave it out" in err
    assert not CALLS and not out2.exists()  # refused before the lock, the staging and the first stage
    assert main([*args, "--stage", "embed", "--stage", "index"]) == 0
    assert [(kw["stage"], cfg.distributor) for cfg, kw in CALLS] == [("embed", "spark"), ("build", "spark")]


def test_index_on_spark_is_autofaiss_pyspark_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """distributor=spark alone puts autofaiss in its pyspark mode, in a session of ours; local does not."""
    import autofaiss

    root = write_fake_embed_output(tmp_path / "emb", {"00000": random_unit(40, 16, seed=1)})
    seen: list[dict[str, Any]] = []

    def fake_build_index(**kwargs: Any) -> tuple[None, None]:
        seen.append(kwargs)
        return None, None  # as autofaiss does when it gives up: the stage fails the job (exit 1)

    sessions: list[str] = []

    def fake_session(cfg: Config) -> Any:
        sessions.append(cfg.distributor)
        return nullcontext()

    monkeypatch.setattr(autofaiss, "build_index", fake_build_index)
    monkeypatch.setattr(pipeline.index.stage, "pyspark_session", fake_session)
    base = ["index", f"input={root}", "index.index_key=IVF4,Flat", "index.modalities=[image]", "log_level=ERROR"]
    assert main([*base, "distributor=spark"]) == 1
    assert main([*base, "distributor=local"]) == 1
    assert [kw["distributed"] for kw in seen] == ["pyspark", None] and sessions == ["spark", "local"]


def test_the_old_index_switch_is_gone(capsys: pytest.CaptureFixture[str]) -> None:
    """index.distributed could contradict distributor; now it is an unknown key (exit 2, named)."""
    assert main(["index", "input=/nowhere", "index.distributed=true"]) == 2
    assert "index.distributed" in capsys.readouterr().err
