"""Extraction and the latent store, on real encoders (packaged MiniLM / EfficientNet-Lite0 / Whisper-tiny)."""

import json
import os
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omnimoe.data.manifest import write_manifest
from omnimoe.encoders import EncoderOptions, load_encoder
from omnimoe.latents import ExtractionError, LatentStore, StoreError, extract
from omnimoe.latents.store import shard_name

ROOT = Path(__file__).resolve().parents[1]
WORDS = "red blue green small big happy old new fast slow".split()
THINGS = "cat dog car tree house boat bird fish apple chair".split()


def captions(n):
    return [f"A {WORDS[i % 10]} {THINGS[(i // 10) % 10]} number {i}." for i in range(n)]


@pytest.fixture(scope="module")
def minilm():
    return load_encoder("minilm", EncoderOptions(batch_size=16))


@pytest.fixture(scope="module")
def minilm_f32():
    """MiniLM in float32 on every CPU ("auto" picks bf16 where the CPU has AVX512-BF16 or AMX)."""
    return load_encoder("minilm", EncoderOptions(batch_size=16, dtype="float32"))


def text_manifest(folder, n, extra=()):
    recs = [{"id": f"s{i}", "split": "train", "text": t} for i, t in enumerate(captions(n))] + list(extra)
    return write_manifest(folder / "manifest.jsonl", recs)


def test_text_store_matches_direct_encoding_and_skips_bad_items(tmp_path, minilm_f32):
    m = text_manifest(
        tmp_path,
        40,
        extra=[{"id": "empty", "split": "train", "text": "  "}, {"id": "s3", "split": "train", "text": "dup"}],
    )
    index = extract(m, minilm_f32, tmp_path / "store", shard_size=16, progress=False)
    expect = {"encoder": "minilm", "weights_hash": minilm_f32.weights_hash, "dtype": "float32"}
    store = LatentStore.open(tmp_path / "store", expect=expect)
    assert store.info() | {"shards": 3} == store.info()
    assert len(store) == 40 and store.ids == [f"s{i}" for i in range(40)]
    reasons = {s["id"]: s["reason"] for s in store.skipped()}
    assert reasons == {"s3": "duplicate id (line 42)", "empty": "empty caption"}
    # every row of the three shards is the encoder's own float32 vector for its id: not rounded, not another row's
    direct = minilm_f32.encode([minilm_f32.load_item(t) for t in captions(40)]).pooled
    assert direct.dtype == torch.float32 and store.pooled().shape == (40, 384) and index["complete"]
    torch.testing.assert_close(store.pooled(), direct, atol=1e-6, rtol=1e-5)
    # memory-mapped, not copied
    assert isinstance(store.shard_pooled(0), np.memmap)


def test_tokens_are_stored_with_lengths(tmp_path, minilm):
    texts = [
        "A koala.",
        "A big red fire truck.",
        "Two cats asleep on a warm sofa in the sun.",
        "Tea.",
        "A boat on a lake.",
    ]
    m = write_manifest(
        tmp_path / "m.jsonl", [{"id": f"t{i}", "split": "train", "text": t} for i, t in enumerate(texts)]
    )
    extract(m, minilm, tmp_path / "store", tokens=True, progress=False)
    store = LatentStore.open(tmp_path / "store")
    toks = [store.tokens(i) for i in range(5)]
    assert all(t.shape[1] == 384 for t in toks)
    assert len({t.shape[0] for t in toks}) > 1  # real lengths, not padding
    torch.testing.assert_close(toks[2].mean(0), store.pooled()[2], atol=1e-3, rtol=1e-3)


def test_wrong_encoder_or_changed_weights_are_refused(tmp_path, minilm):
    m = text_manifest(tmp_path, 4)
    extract(m, minilm, tmp_path / "store", progress=False)
    with pytest.raises(StoreError, match="weights_hash"):
        LatentStore.open(tmp_path / "store", expect={"encoder": "minilm", "weights_hash": "0123"})
    with pytest.raises(StoreError, match="encoder is 'minilm'"):
        LatentStore.open(tmp_path / "store", expect={"encoder": "efficientnet-lite0"})
    other = load_encoder("minilm", EncoderOptions(layers="last2"))  # different preprocessing
    with pytest.raises(StoreError, match="another encoder"):
        extract(m, other, tmp_path / "store", progress=False)
    with pytest.raises(StoreError, match="not a latent store"):
        LatentStore.open(tmp_path)


def test_fatal_policy_names_the_sample_and_keeps_finished_shards(tmp_path, minilm):
    recs = [{"id": f"s{i}", "split": "train", "text": t} for i, t in enumerate(captions(20))]
    recs[15]["text"] = ""
    m = write_manifest(tmp_path / "m.jsonl", recs)
    with pytest.raises(ExtractionError, match="sample 's15': empty caption"):
        extract(m, minilm, tmp_path / "store", shard_size=10, on_error="fatal", progress=False)
    assert (tmp_path / "store" / shard_name(0)).is_file() and not (tmp_path / "store" / shard_name(1)).exists()


def _count_shards(folder):
    return len(list(folder.glob("shard-*.safetensors")))


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_exactly_the_rows(tmp_path):
    n, shard = 3000, 100
    m = text_manifest(tmp_path, n)
    out = tmp_path / "store"
    cmd = [
        sys.executable,
        "-m",
        "omnimoe.cli",
        "extract",
        "--manifest",
        str(m),
        "--encoder",
        "minilm",
        "--out",
        str(out),
        "--shard-size",
        str(shard),
        "--batch-size",
        "50",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _count_shards(out) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name: p.stat().st_ino for p in out.glob("shard-*.safetensors")}
    assert 3 <= len(done_before) < n // shard, "the kill must land mid-run"
    assert not (out / "store.json").exists()

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    store = LatentStore.open(out)
    assert store.ids == [f"s{i}" for i in range(n)]  # none missing, none twice, manifest order
    assert store.info()["complete"] and store.info()["unique_ids"] == n
    assert not list(out.glob(".*.tmp"))
    for name, inode in done_before.items():  # finished shards were not recomputed
        assert (out / name).stat().st_ino == inode


def _image_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)).save(folder / "good.png")
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[10:30, 10:30] = (255, 0, 0, 255)
    Image.fromarray(rgba).save(folder / "transparent.png")
    (folder / "shape.svg").write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" width="40" height="40"><circle cx="20" cy="20" r="15" fill="blue"/></svg>'
    )
    data = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "notimage.png").write_text("hello")
    return ["good.png", "transparent.png", "shape.svg", "truncated.png", "notimage.png", "missing.png"]


@pytest.mark.slow
def test_images_with_corrupt_inputs(tmp_path):
    files = _image_files(tmp_path / "img")
    m = write_manifest(tmp_path / "m.jsonl", [{"id": f, "split": "train", "image": f"img/{f}"} for f in files])
    enc = load_encoder("efficientnet-lite0", EncoderOptions(batch_size=4))
    extract(m, enc, tmp_path / "store", tokens=True, progress=False)
    store = LatentStore.open(tmp_path / "store")
    assert store.ids == ["good.png", "transparent.png", "shape.svg"]
    reasons = {s["id"]: s["reason"] for s in store.skipped()}
    assert "corrupt or truncated" in reasons["truncated.png"]
    assert "not a readable image" in reasons["notimage.png"]
    assert "missing file" in reasons["missing.png"]
    assert store.tokens(0).shape == (49, 1280) and store.dim == 1280
    # transparency became white, not black: the composited image is mostly white
    img = enc.load_item(str(tmp_path / "img" / "transparent.png"))
    assert img.mean() > 0.5
    with pytest.raises(ExtractionError, match="'truncated.png'"):
        extract(m, enc, tmp_path / "store2", on_error="fatal", progress=False)


def _wav(path, seconds, freq=440.0, rate=16000):
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


@pytest.mark.slow
def test_audio_whisper_tiny_masks_real_length(tmp_path):
    _wav(tmp_path / "short.wav", 1.0)
    _wav(tmp_path / "long.wav", 4.0, freq=880)
    (tmp_path / "broken.ogg").write_bytes(b"OggS" + os.urandom(200))
    recs = [{"id": n, "split": "train", "audio": f"{n}"} for n in ("short.wav", "long.wav", "broken.ogg")]
    m = write_manifest(tmp_path / "m.jsonl", recs)
    enc = load_encoder("whisper-tiny", EncoderOptions(max_audio_seconds=5.0))
    extract(m, enc, tmp_path / "store", tokens=True, progress=False)
    store = LatentStore.open(tmp_path / "store")
    assert store.ids == ["short.wav", "long.wav"] and store.dim == 384
    assert "not readable audio" in store.skipped()[0]["reason"] or "no audio" in store.skipped()[0]["reason"]
    assert store.tokens(0).shape[0] == 50 and store.tokens(1).shape[0] == 200  # 20 ms per state
    assert not torch.allclose(store.pooled()[0], store.pooled()[1])


def test_store_info_cli(tmp_path, minilm):
    m = text_manifest(tmp_path, 6)
    extract(m, minilm, tmp_path / "store", shard_size=4, progress=False)
    out = subprocess.run(
        [sys.executable, "-m", "omnimoe.cli", "store", "info", str(tmp_path / "store"), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert {k: info[k] for k in ("rows", "unique_ids", "encoder", "weights_hash", "dim", "shards")} == {
        "rows": 6,
        "unique_ids": 6,
        "encoder": "minilm",
        "weights_hash": minilm.weights_hash,
        "dim": 384,
        "shards": 2,
    }
    bad = subprocess.run(
        [sys.executable, "-m", "omnimoe.cli", "store", "info", str(tmp_path)], capture_output=True, text=True, cwd=ROOT
    )
    assert bad.returncode == 2 and "not a latent store" in bad.stderr


@pytest.mark.slow
def test_torchrun_extraction_equals_single_process(tmp_path):

    m = text_manifest(tmp_path, 90)
    base = [
        sys.executable,
        "-m",
        "omnimoe.cli",
        "extract",
        "--manifest",
        str(m),
        "--encoder",
        "minilm",
        "--shard-size",
        "20",
        "--dtype",
        "float32",
    ]
    one = subprocess.run(base + ["--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "omnimoe.cli",
    ]
    two = subprocess.run(
        torchrun + base[3:] + ["--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert two.returncode == 0, two.stderr[-2000:]
    assert "outlived destroy_process_group" not in two.stderr  # every rank's gloo threads joined before exit
    a, b = LatentStore.open(tmp_path / "one"), LatentStore.open(tmp_path / "two")
    assert a.ids == b.ids and len(a) == 90
    torch.testing.assert_close(a.pooled(), b.pooled(), atol=1e-5, rtol=1e-5)


def test_resume_after_manifest_or_shard_size_change_gives_exactly_the_rows(tmp_path, minilm):
    """A shard on disk is trusted only if it still holds its chunk: growth, edits and a new shard size redo."""

    def ids_of(store):
        return LatentStore.open(store).ids

    m = text_manifest(tmp_path, 5)
    extract(m, minilm, tmp_path / "s", shard_size=4, progress=False)
    m = text_manifest(tmp_path, 7)  # the manifest grew
    extract(m, minilm, tmp_path / "s", shard_size=4, progress=False)
    assert ids_of(tmp_path / "s") == [f"s{i}" for i in range(7)]
    (tmp_path / "s" / shard_name(1)).unlink()
    extract(m, minilm, tmp_path / "s", shard_size=3, progress=False)  # and the shard size changed
    store = LatentStore.open(tmp_path / "s")
    assert store.ids == [f"s{i}" for i in range(7)] and store.info()["complete"]
    # a truncated shard (power loss before fsync existed) is refused on read and redone on resume
    path = tmp_path / "s" / shard_name(0)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(
        StoreError, match=r"shard-00000.safetensors has \d+ bytes, \d+ were written"
    ):  # the size written in store.json
        LatentStore.open(tmp_path / "s").pooled()
    extract(m, minilm, tmp_path / "s", shard_size=3, progress=False)
    assert ids_of(tmp_path / "s") == [f"s{i}" for i in range(7)]


def test_store_holds_no_file_per_shard_and_reads_bf16_input_right(tmp_path):
    from omnimoe.latents.store import write_store

    fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    vecs = torch.randn(600, 8)
    write_store(
        tmp_path / "many", [f"x{i}" for i in range(600)], vecs, {"encoder": "e", "modality": "m"}, shard_size=10
    )
    before = fds()
    store = LatentStore.open(tmp_path / "many")
    torch.testing.assert_close(store.pooled(), vecs)
    assert fds() <= before + 1 and store.info()["shards"] == 60
    bf = torch.tensor([[1.5, -2.0]], dtype=torch.bfloat16)
    assert write_store(tmp_path / "bf", ["a"], bf, {"encoder": "e", "modality": "m"}).pooled().tolist() == [[1.5, -2.0]]
