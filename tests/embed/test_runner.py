"""The per-shard loop in-process: equality with open_clip, alignment, every bad-data kind, memory:// I/O."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from pipeline.core.config import load_config
from pipeline.core.tasks import ShardTask
from pipeline.embed.runner import get_model, run_shard
from pipeline.embeddings.layout import committed_shards, read_stats
from tests.support.helpers import hostile_samples, jpeg_bytes, load_shard, overrides, write_tar


@pytest.fixture(scope="module")
def cfg(tiny_model: dict[str, str]):
    return load_config(overrides(tiny_model) + ["embed.batch_size=4", "embed.output_dtype=float32"])


_load = load_shard


def test_embeddings_equal_open_clip_reference(tmp_path: Path, cfg, tiny_model: dict[str, str]) -> None:
    samples = [
        (f"{i:04d}", {"jpg": jpeg_bytes(i, (40 + i, 30 + 2 * i)), "txt": f"a photo of thing {i}".encode()})
        for i in range(10)
    ]
    tar = write_tar(tmp_path / "00000.tar", samples)
    model = get_model(cfg)
    stats = run_shard(ShardTask("00000", str(tar), str(tmp_path / "out"), "webdataset"), model, cfg.embed)
    assert stats["samples"] == 10 and stats["ok"] == 10
    img, txt, meta = _load(str(tmp_path / "out"), "00000")
    assert meta["key"].tolist() == [k for k, _ in samples]
    assert meta["caption"].tolist() == [f["txt"].decode() for _, f in samples]
    assert np.allclose(np.linalg.norm(img, axis=1), 1, atol=1e-4)
    assert np.allclose(np.linalg.norm(txt, axis=1), 1, atol=1e-4)

    ref, _, pre = open_clip.create_model_and_transforms(
        tiny_model["model.arch"], pretrained=tiny_model["model.checkpoint"]
    )
    ref.eval()
    tok = open_clip.get_tokenizer(tiny_model["model.arch"])
    with torch.no_grad():
        pix = torch.stack([pre(Image.open(io.BytesIO(f["jpg"])).convert("RGB")) for _, f in samples])
        ref_img = torch.nn.functional.normalize(ref.encode_image(pix), dim=-1).numpy()
        ref_txt = torch.nn.functional.normalize(
            ref.encode_text(tok([f["txt"].decode() for _, f in samples])), dim=-1
        ).numpy()
    assert (np.sum(img * ref_img, axis=1) >= 0.999).all()
    assert (np.sum(txt * ref_txt, axis=1) >= 0.999).all()
    assert np.allclose(meta["clip_score"].to_numpy(), np.sum(img * txt, axis=1), atol=1e-5)


def test_every_bad_data_kind_is_accounted_for(tmp_path: Path, cfg) -> None:
    samples = hostile_samples()
    tar = write_tar(tmp_path / "00000.tar", samples)
    cfg2 = cfg.model_copy(deep=True)
    cfg2.embed.max_pixels = 50_000_000
    run_shard(ShardTask("00000", str(tar), str(tmp_path / "out"), "webdataset"), get_model(cfg), cfg2.embed)
    img, txt, meta = _load(str(tmp_path / "out"), "00000")
    assert len(meta) == len(samples) == len(img) == len(txt)
    by_key = {}
    for k, st, cs in zip(meta["key"], meta["status"], meta["caption_status"]):
        by_key.setdefault(k, []).append((st, cs))
    assert by_key["ok"] == [("ok", "ok"), ("ok", "ok")]
    assert by_key["corrupt"][0][0] == "decode_error"
    assert by_key["zero"][0][0] == "empty_image"
    assert by_key["html"][0][0] == "decode_error"
    assert by_key["noimage"][0] == ("no_image", "ok")
    assert by_key["nocaption"][0] == ("ok", "missing")
    assert by_key["badutf8"][0] == ("ok", "invalid_utf8")
    assert by_key["bomb"][0][0] == "too_large"
    assert by_key["cmyk"][0][0] == "ok" and by_key["palette"][0][0] == "ok" and by_key["bigcaption"][0][0] == "ok"
    failed = (meta["status"] != "ok").to_numpy()
    assert np.all(img[failed] == 0) and np.allclose(np.linalg.norm(img[~failed], axis=1), 1, atol=1e-3)
    no_cap = (meta["caption_status"] == "missing").to_numpy()
    assert np.all(txt[no_cap] == 0) and np.isnan(meta["clip_score"][no_cap | failed]).all()
    stats = read_stats(str(tmp_path / "out"), "00000")
    assert stats["samples"] == len(samples)
    assert stats["status_counts"] == {"ok": 7, "decode_error": 2, "empty_image": 1, "no_image": 1, "too_large": 1}


def test_truncated_tar_commits_what_came_before(tmp_path: Path, cfg) -> None:
    samples = [(f"{i:04d}", {"jpg": jpeg_bytes(i, (64, 64)), "txt": b"c"}) for i in range(12)]
    tar = write_tar(tmp_path / "00000.tar", samples)
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    stats = run_shard(ShardTask("00000", str(tar), str(tmp_path / "out"), "webdataset"), get_model(cfg), cfg.embed)
    assert stats["read_error"] and 4 <= stats["samples"] <= 7
    _, _, meta = _load(str(tmp_path / "out"), "00000")
    assert meta["key"].tolist() == [f"{i:04d}" for i in range(len(meta))]
    assert meta["status"].iloc[-1] == "read_error"


def test_memory_filesystem_in_and_out(cfg) -> None:
    fs = fsspec.filesystem("memory")
    buf = io.BytesIO()
    import tarfile

    with tarfile.open(fileobj=buf, mode="w") as t:
        for i in range(5):
            for ext, data in (("jpg", jpeg_bytes(i)), ("json", json.dumps({"url": f"u{i}"}).encode())):
                ti = tarfile.TarInfo(f"{i:03d}.{ext}")
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
    fs.pipe("/runner-in/00003.tar", buf.getvalue())
    out = "memory://runner-out"
    run_shard(ShardTask("00003", "memory://runner-in/00003.tar", out, "webdataset"), get_model(cfg), cfg.embed)
    assert committed_shards(out) == ["00003"]
    img, txt, meta = _load(out, "00003")
    assert meta["url"].tolist() == [f"u{i}" for i in range(5)] and (meta["caption_status"] == "missing").all()
    assert np.all(txt == 0) and img.shape == (5, 32)


def test_draft_decode_of_large_jpeg_stays_within_tolerance(cfg) -> None:
    """Pillow's reduced-scale JPEG decode gives (nearly) the same embedding as a full decode."""
    from pipeline.core.images import decode_image

    model = get_model(cfg)
    y, x = np.mgrid[0:1536, 0:2048].astype(np.float32)
    arr = np.stack([np.sin(x / 90 + c) * np.cos(y / 70 - c) for c in (0, 1, 2)], -1) * 100 + 128
    b = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(b, "JPEG", quality=92)
    size = model.preprocess_info()["size"]
    size = max(size) if isinstance(size, (list, tuple)) else size
    full = decode_image(b.getvalue(), 10**9)
    draft = decode_image(b.getvalue(), 10**9, draft_size=int(size))
    assert draft.size[0] < full.size[0]
    emb = model.encode_image(torch.stack([model.preprocess(full), model.preprocess(draft)])).numpy()
    assert float(emb[0] @ emb[1]) >= 0.99


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")
@pytest.mark.parametrize("priority", ["auto", "normal", "idle"])
def test_decode_threads_take_idle_priority_beside_a_cpu_model(
    tmp_path: Path, tiny_model: dict[str, str], priority: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(overrides(tiny_model) + ["embed.batch_size=4", f"embed.decode_priority={priority}"])
    model = get_model(cfg)
    assert model.device.type == "cpu"
    policies: set[int] = set()
    import pipeline.embed.hostdecode as hostdecode

    decode = hostdecode.decode_reduced  # what each plain JPEG goes through with embed.preprocess=auto

    def spy(*args: object) -> object:
        policies.add(os.sched_getscheduler(0))  # the calling decode thread's own policy
        return decode(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(hostdecode, "decode_reduced", spy)
    tar = write_tar(tmp_path / "00000.tar", [(f"{i:04d}", {"jpg": jpeg_bytes(i), "txt": b"a"}) for i in range(12)])
    stats = run_shard(ShardTask("00000", str(tar), str(tmp_path / "out"), "webdataset"), model, cfg.embed)
    assert stats["ok"] == 12
    assert policies == ({os.SCHED_OTHER} if priority == "normal" else {os.SCHED_IDLE})
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the model's own thread is untouched


def test_reused_memory_ends_page_faults_of_repeated_large_allocations(repo_root: Path) -> None:
    """keep_freed_memory (embed.reuse_memory): a freed 64 MB block comes back without faulting in fresh pages."""
    code = (
        "import resource, torch\n"
        "from pipeline.embed.runner import keep_freed_memory\n"
        "def faults():\n"
        "    torch.ones(16 << 20)\n"  # 64 MB of float32: above glibc's 32 MB mmap ceiling
        "    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    for _ in range(5):\n"
        "        torch.ones(16 << 20)\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0\n"
        "before = faults()\n"
        "applied = keep_freed_memory()\n"
        "settled = [faults() for _ in range(3)]\n"  # aligned blocks leave holes that merge over a few rounds
        "print(applied, before, faults())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo_root)
    applied, before, after = out.stdout.split()
    if applied != "True":
        pytest.skip("not glibc")
    assert int(before) > 5 * 10_000  # 16,384 fresh 4 KiB pages per allocation
    assert int(after) < 1_000
