"""Zero-shot classification over embed outputs: prompt ensembling, top-k files, skipped failures, the CLI text."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.core.config import load_config
from pipeline.core.errors import ConfigError
from pipeline.models import EmbeddingModel, ModelLoadError
from pipeline.query.zeroshot import class_embeddings, classify_cli, top_k, zero_shot, zeroshot_path
from tests.support.helpers import overrides, random_unit, write_fake_embed_output, write_tar

DIM = 16


class TableModel(EmbeddingModel):
    """Text side only: each known sentence maps to a fixed vector, so expected scores can be computed by hand."""

    def __init__(self, table: dict[str, np.ndarray]):
        self.table = table
        self.dim = DIM
        self.device = torch.device("cpu")
        self.calls = 0

    def preprocess(self, image: Any) -> torch.Tensor:
        raise NotImplementedError

    def tokenize(self, texts: list[str]) -> list[str]:
        return texts

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, tokens: list[str]) -> torch.Tensor:
        self.calls += 1
        return torch.from_numpy(np.stack([self.table[t] for t in tokens]))


CLASSES = ["cat", "dog", "car", "boat"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


@pytest.fixture
def table_model() -> TableModel:
    vecs = random_unit(len(CLASSES) * len(TEMPLATES), DIM, seed=3)
    texts = [t.replace("{}", c) for c in CLASSES for t in TEMPLATES]
    return TableModel(dict(zip(texts, vecs)))


def expected_class_emb(m: TableModel) -> np.ndarray:
    out = np.stack([np.mean([m.table[t.replace("{}", c)] for t in TEMPLATES], axis=0) for c in CLASSES])
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_top_k_matches_full_sort() -> None:
    scores = np.random.default_rng(0).standard_normal((50, 30)).astype(np.float32)
    idx, val = top_k(scores, 5)
    assert np.array_equal(idx, np.argsort(-scores, axis=1)[:, :5])
    assert np.allclose(val, -np.sort(-scores, axis=1)[:, :5])
    assert top_k(scores, 100)[0].shape == (50, 30)


def test_class_embeddings_average_templates_then_renormalize(table_model: TableModel) -> None:
    emb = class_embeddings(table_model, CLASSES, TEMPLATES, batch_size=3)
    assert emb.shape == (len(CLASSES), DIM) and table_model.calls == 3  # 8 sentences in batches of 3
    assert np.allclose(emb, expected_class_emb(table_model), atol=1e-6)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-6)


def test_zero_shot_writes_topk_per_shard_and_skips_failed(table_model: TableModel, tmp_path: Path) -> None:
    cls = expected_class_emb(table_model)
    rng = np.random.default_rng(1)
    truth = {"00000": rng.integers(0, 4, 12), "00001": rng.integers(0, 4, 7)}
    shards = {}
    for sid, labels in truth.items():
        x = cls[labels] + 0.3 * random_unit(len(labels), DIM, seed=int(sid) + 5)
        shards[sid] = x / np.linalg.norm(x, axis=1, keepdims=True)
    shards["00001"][2] = 0  # a failed image is stored as zeros
    status = ["ok"] * 7
    status[2] = status[4] = "decode_error"
    root = write_fake_embed_output(tmp_path / "emb", shards, extra_meta={"00001": {"status": status}})
    summary = zero_shot(root, CLASSES, TEMPLATES, k=3, model=table_model)
    assert summary["samples"] == 12 + 5 and summary["skipped_failed_images"] == 2 and summary["shards"] == 2
    for sid, labels in truth.items():
        t = pq.read_table(zeroshot_path(root, sid)).to_pandas()
        assert list(t.columns) == ["key", "label_1", "label_2", "label_3", "score_1", "score_2", "score_3"]
        keep = [i for i in range(len(labels)) if not (sid == "00001" and i in (2, 4))]
        assert t["key"].tolist() == [f"{sid}{i:04d}" for i in keep]
        emb = shards[sid][keep].astype(np.float16).astype(np.float32) @ cls.T
        assert t["label_1"].tolist() == [CLASSES[j] for j in emb.argmax(1)]
        assert np.allclose(t["score_1"], emb.max(1), atol=1e-5)
        assert (t["score_1"] >= t["score_2"]).all() and (t["score_2"] >= t["score_3"]).all()
        assert (t["label_1"] == [CLASSES[j] for j in labels[keep]]).mean() > 0.8  # the planted class wins
    info = json.loads((Path(root) / "zeroshot" / "zeroshot.json").read_text())
    assert info["classes"] == CLASSES and info["templates"] == TEMPLATES and info["k"] == 3
    assert sum(summary["top1_counts"].values()) == 17


def test_bad_inputs_are_config_errors(table_model: TableModel, tmp_path: Path) -> None:
    root = write_fake_embed_output(tmp_path / "emb", {"00000": random_unit(3, DIM)})
    with pytest.raises(ConfigError, match="no class names"):
        zero_shot(root, [], model=table_model)
    with pytest.raises(ConfigError, match="duplicate"):
        zero_shot(root, ["cat", "cat"], model=table_model)
    with pytest.raises(ConfigError, match="'\\{\\}'"):
        zero_shot(root, ["cat"], ["a photo"], model=table_model)
    with pytest.raises(ConfigError, match="manifest"):
        zero_shot(str(tmp_path / "nothing"), ["cat"], model=table_model)


def test_recorded_model_is_refused_when_its_weights_changed(tmp_path: Path, tiny_model: dict[str, str]) -> None:
    from pipeline.embed.stage import build_manifest
    from pipeline.models import load_recorded

    cfg = load_config([*overrides(tiny_model), f"output={tmp_path / 'emb'}", "model.device=cpu"])
    manifest = build_manifest(cfg)
    m = load_recorded(manifest["model_config"], manifest["model"], "manifest.json")
    assert m.dim == 32
    manifest["model"]["checkpoint_sha256"] = "0" * 64  # the checkpoint changed since the embed run
    with pytest.raises(ModelLoadError, match="now has other weights"):
        load_recorded(manifest["model_config"], manifest["model"], "manifest.json")
    with pytest.raises(ConfigError, match="records no model_config"):
        load_recorded(None, manifest["model"], "manifest.json")


@pytest.mark.slow
def test_classify_cli_with_offline_model_on_photos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real weights end to end: embed scikit-image photos with the offline model, then classify them."""
    import skimage.data
    from PIL import Image

    import pipeline.models as models
    from pipeline.core.tasks import ShardTask
    from pipeline.embed.runner import run_shard
    from pipeline.embed.stage import build_manifest
    from pipeline.embed.writer import check_or_write_manifest

    names = ["chelsea", "coffee", "rocket"]
    samples = []
    for i, name in enumerate(names):
        buf = io.BytesIO()
        Image.fromarray(getattr(skimage.data, name)()).save(buf, "JPEG", quality=92)
        samples.append((f"00000{i:04d}", {"jpg": buf.getvalue(), "txt": name.encode()}))
    tar = write_tar(tmp_path / "in" / "00000.tar", samples)
    out = str(tmp_path / "emb")
    cfg = load_config(["model=offline", "model.device=cpu", f"input={out}"])
    check_or_write_manifest(out, build_manifest(cfg))
    model = models.load_model(cfg.model)
    run_shard(ShardTask("00000", str(tar), out, "webdataset"), model, cfg.embed)
    loaded: list[Any] = []

    def reuse(model_cfg: Any) -> EmbeddingModel:  # one load of the real model is enough for this test
        loaded.append(model_cfg)
        return model

    monkeypatch.setattr(models, "load_model", reuse)
    text = classify_cli(cfg, ["cat", "dog", "car", "cup of coffee", "rocket"], None, k=2)
    assert loaded and loaded[0].family == "offline"
    t = pq.read_table(zeroshot_path(out, "00000")).to_pandas()
    assert t["label_1"].tolist() == ["cat", "cup of coffee", "rocket"]
    assert "top-1 label counts" in text and "cat" in text


def test_cli_exit_codes_through_run_command(
    tmp_path: Path, table_model: TableModel, capsys: pytest.CaptureFixture[str]
) -> None:
    """As `clipline classify` will call it: bad input and an unavailable model are usage errors (exit 2)."""
    from pipeline.cli.commands import COMMANDS
    from pipeline.cli.main import run_command

    root = write_fake_embed_output(tmp_path / "emb", {"00000": random_unit(3, DIM)})
    cfg = load_config([f"input={root}"])
    classify = COMMANDS["classify"]
    assert run_command(classify, cfg, {"classes": []}) == 2
    assert "no class names" in capsys.readouterr().err
    # The fake manifest's model_config names no weights, so its fingerprint cannot match the recorded one.
    assert run_command(classify, cfg, {"classes": ["cat", "dog"]}) == 2
    assert "now has other weights" in capsys.readouterr().err
    (tmp_path / "classes.txt").write_text("# animals\ncat\n\ndog\n")
    assert (
        run_command(
            classify,
            load_config([f"input={tmp_path / 'nothing'}"]),
            {"classes_file": str(tmp_path / "classes.txt")},
        )
        == 2
    )
