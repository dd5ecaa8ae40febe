"""The clipline command: --help for each subcommand, exit codes, nothing written on config errors."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline
from pipeline.cli.commands import COMMANDS
from pipeline.cli.main import main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_explains_with_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Example" in out and f"clipline {command}" in out and "Exit codes" in out


def test_top_level_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for c in COMMANDS:
        assert c in out


def test_unknown_key_exits_2_and_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "out"
    assert main(["embed", "foo=1", f"output={out_dir}"]) == 2
    assert "foo" in capsys.readouterr().err
    assert not out_dir.exists()


def test_missing_input_exits_2_without_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "out"
    assert main(["embed", f"output={out_dir}"]) == 2
    assert "input=" in capsys.readouterr().err
    assert main(["embed", f"input={tmp_path}/nope.tar", f"output={out_dir}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out_dir.exists()


def test_bad_usage_exits_2() -> None:
    assert main(["nonsense"]) == 2
    assert main([]) == 2


def test_console_script_and_job_entry_point(repo_root: Path) -> None:
    r = subprocess.run([sys.executable, str(repo_root / "jobs" / "embed.py"), "foo=1"], capture_output=True, text=True)
    assert r.returncode == 2 and "foo: unknown key" in r.stderr
    r = subprocess.run([str(Path(sys.executable).parent / "clipline"), "--version"], capture_output=True, text=True)
    installed = importlib.metadata.version("clipline")  # the distribution pip installed the console script with
    assert r.returncode == 0 and r.stdout == f"{installed}\n" and installed == pipeline.__version__


def test_overrides_after_options_are_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["query", "--text", "x", "foo=1"]) == 2  # parsed as an override, then refused by name
    assert "foo: unknown key" in capsys.readouterr().err
    assert main(["query", "--text", "x", "--bogus"]) == 2


def test_run_record_is_replaced_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run.json goes through a temporary name: a write that dies midway leaves the previous record readable."""
    import fsspec.implementations.local as local_fs

    from pipeline.core.config import load_config
    from pipeline.core.runinfo import RunRecord, read_record

    out = tmp_path / "out"
    out.mkdir()
    RunRecord("embed", load_config([]), str(out)).finish(0, {"samples": 1})
    before = (out / "run.json").read_bytes()

    def dying_write(self: object, data: bytes) -> int:
        raise OSError("injected: disk died mid-write")

    monkeypatch.setattr(local_fs.LocalFileOpener, "write", dying_write)
    RunRecord("embed", load_config([]), str(out)).finish(1, {"samples": 2})  # logs a warning, never raises
    monkeypatch.undo()
    assert (out / "run.json").read_bytes() == before
    assert read_record(str(out)) is not None and read_record(str(out))["summary"] == {"samples": 1}  # type: ignore[index]
    assert [p.name for p in out.iterdir()] == ["run.json"]  # no temporary file left


def _clipline(repo_root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it, in its own process: imports, logging set-up and spawned workers included."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=repo_root, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_console_of_embed_shows_only_clipline_log_lines(
    repo_root: Path, tmp_path: Path, tiny_model: dict[str, str]
) -> None:
    """open_clip logs INFO lines through the root logger while the spawned workers load it: none reach stderr.
    (download, index, dedup, query and the leaked-semaphore warning: the demo's console, tests/run/test_demo.py;
    the filter itself and log_level=DEBUG: tests/core/test_logs.py.)"""
    from tests.support.console import foreign_lines
    from tests.support.helpers import make_shards, overrides

    make_shards(tmp_path / "shards", n_shards=2, per_shard=6)
    args = ["embed", f"input={tmp_path / 'shards'}", f"output={tmp_path / 'emb'}", *overrides(tiny_model)]
    embed = _clipline(repo_root, *args)
    assert embed.returncode == 0, embed.stderr[-3000:]
    assert "[clipline-worker-0] pipeline.embed.runner: loaded open_clip model" in embed.stderr
    assert foreign_lines(embed.stderr) == []
