"""The notebooks run top to bottom against a demo output (parameters via CLIPLINE_OUTPUT) and are committed clean.
The demo output is the session's shared one (tests/conftest.py), which the notebooks only read."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ("explore_embeddings", "dedup_review", "run_health")
ECHO = "clipline-test: the notebook read OUTPUT="


@pytest.mark.parametrize("name", NAMES)
def test_committed_clean_with_a_parameters_cell(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit notebooks without outputs"
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "CLIPLINE_OUTPUT" in params[0].source and "OUTPUT" in params[0].source


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_against_the_demo(name: str, demo: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CLIPLINE_OUTPUT", str(demo))  # the kernel inherits the environment
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend turns figures into outputs
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    # Appended, so the test sees what the parameters cell resolved in the kernel, not what the test set.
    nb.cells.append(nbformat.v4.new_code_cell(f"print({ECHO!r} + str(OUTPUT))"))
    client = nbclient.NotebookClient(
        nb, timeout=120, startup_timeout=60, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, "every notebook draws at least one figure"
    if name == "explore_embeddings":
        meta = pd.concat(pd.read_parquet(p) for p in (demo / "embeddings" / "metadata").glob("*.parquet"))
        assert f"{int((meta['status'] == 'ok').sum())} embedded images" in text
        assert len(images) == 3  # projection, neighbours, text hits
    if name == "dedup_review":
        assert "thumbnails read from the shards" in text and "best F1" in text
    if name == "run_health":
        assert str(demo) in text
    # The kernel ran in tmp_path, where the parameters cell's default (./clipline-demo) does not exist.
    assert f"{ECHO}{demo}\n" in text
