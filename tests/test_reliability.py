"""Bad input of every kind, against a finished run: each case must fail loudly (exit code or HTTP status),
with a message naming the culprit, and leave everything already written as it was.

Rerun: ``pytest tests/test_reliability.py``. The cases are counted in docs/reliability.md.
"""

import http.client
import json
import math
import os
import shutil
import subprocess
import sys
import time
import wave
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from omnimoe.cli import app
from omnimoe.data.manifest import write_manifest
from omnimoe.io import write_json
from omnimoe.latents.store import LatentStore, StoreError, rebuild_index, shard_name, write_shard
from omnimoe.retrieval.index import IndexMismatch, VectorIndex
from omnimoe.retrieval.retriever import Retriever
from omnimoe.runtime import NonFiniteLoss, require_finite

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under ``folder`` with its size, modification time and inode: a write, a replace, a new or a
    deleted file all change it."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            st = path.stat()
            out[str(path.relative_to(folder))] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def run(demo_run, tmp_path_factory):
    """A private copy of the quick demo's run (stores, connectors, checkpoints, manifest)."""
    dst = tmp_path_factory.mktemp("reliability") / "run"
    shutil.copytree(demo_run[0], dst)
    return dst


def align_args(run: Path, **change: str) -> list[str]:
    summary = json.loads((run / "summary.json").read_text())
    args = {
        "--manifest": str(run / summary["manifest"]),
        "--out": str(run),
        "--seeds": "0",
        "--encoders": ",".join(f"{m}={e}" for m, e in summary["encoders"].items()),
        "--methods": ",".join(summary["methods"]),
    }
    args.update(change)
    return ["align", *[x for kv in args.items() for x in kv]]


# (case id, what changes in the align command, the exit code, what the message must name)
ALIGN_CASES = [
    ("steps-zero", ["--set", "steps=0"], 2, "steps: 0 is outside"),
    ("steps-negative", ["--set", "steps=-5"], 2, "steps: -5 is outside"),
    ("eval-every-zero", ["--set", "eval_every=0"], 2, "eval_every: 0"),
    ("batch-size-zero", ["--set", "batch_size=0"], 2, "batch_size: 0"),
    ("batch-size-negative", ["--set", "batch_size=-3"], 2, "batch_size: -3"),
    ("batch-size-one", ["--set", "batch_size=1"], 2, "batch_size: 1"),
    ("lr-zero", ["--set", "lr=0"], 2, "lr: 0"),
    ("lr-nan", ["--set", "lr=nan"], 2, "lr: nan"),
    ("lr-inf", ["--set", "lr=.inf"], 2, "lr: inf"),
    ("lr-word", ["--set", "lr=fast"], 2, "lr: expected a number"),
    ("dropout-above-one", ["--set", "dropout=1.5"], 2, "dropout: 1.5"),
    ("temperature-zero", ["--set", "temperature=0"], 2, "temperature: 0"),
    ("patience-zero", ["--set", "patience=0"], 2, "patience: 0"),
    ("mixup-negative", ["--set", "mixup_alpha=-1"], 2, "mixup_alpha: -1"),
    ("experts-zero", ["--set", "num_experts=0"], 2, "num_experts: 0"),
    ("top-k-above-experts", ["--set", "num_experts_per_tok=99"], 2, "num_experts_per_tok: 99"),
    ("hidden-zero", ["--set", "hidden_size=0"], 2, "hidden_size: 0"),
    ("weight-decay-negative", ["--set", "weight_decay=-0.1"], 2, "weight_decay: -0.1"),
    ("warmup-negative", ["--set", "warmup_steps=-1"], 2, "warmup_steps: -1"),
    ("steps-a-list", ["--set", "steps=[1, 2]"], 2, "steps: expected an integer"),
    ("steps-a-float", ["--set", "steps=2.5"], 2, "steps: expected an integer"),
    ("unknown-method-value", ["--set", "method=foo"], 2, "method: 'foo'"),
    ("unknown-key", ["--set", "stepz=3"], 2, "stepz"),
    ("override-without-value", ["--set", "steps"], 2, "'steps' is not of the form"),
    ("override-empty-key", ["--set", "=3"], 2, "empty key"),
    (
        "no-loss-weights",
        ["--set", "regression_weight=0", "--set", "contrastive_weight=0"],
        2,
        "regression_weight + contrastive_weight",
    ),
    ("seeds-word", ["--seeds", "x"], 2, "--seeds 'x'"),
    ("seeds-twice", ["--seeds", "1,1"], 2, "listed twice"),
    ("seeds-empty", ["--seeds", ","], 2, "--seeds ','"),
    ("seeds-negative", ["--seeds", "-1"], 2, "--seeds '-1'"),
    ("unknown-method", ["--methods", "nope"], 2, "unknown method(s) ['nope']"),
    ("one-modality", ["--encoders", "text=minilm"], 2, "at least two modalities"),
    ("encoder-item-malformed", ["--encoders", "text=minilm,image"], 2, "'image' is not of the form"),
    (
        "encoder-reads-other-modality",
        ["--encoders", "text=minilm,image=whisper-tiny"],
        2,
        "whisper-tiny reads audio, but the field 'image' holds image",
    ),
    ("encoder-field-missing", ["--encoders", "text=minilm,image=efficientnet-lite0@picture"], 2, "no field 'picture'"),
    (
        "changed-encoder-into-run",
        ["--encoders", "CHANGE:image=efficientnet-lite1"],
        2,
        "holds a run of other inputs (encoders",
    ),
    ("renamed-modality-into-run", ["--encoders", "RENAME:image=picture"], 2, "holds a run of other inputs"),
    ("token-inputs-into-run", ["--set", "token_inputs=true"], 2, "token_inputs: False"),
    ("manifest-missing", ["--manifest", "MISSING"], 2, "does not exist"),
    ("manifest-bad-line", ["--manifest", "BADLINE"], 2, "line 2"),
    ("config-not-yaml", ["--config", "NOTYAML"], 2, "not valid YAML"),
    ("config-a-list", ["--config", "LIST"], 2, "top level must be a mapping"),
    ("config-missing", ["--config", "NOCONFIG"], 2, "does not exist"),
]


def _resolve_case(run: Path, tmp: Path, change: list[str]) -> list[str]:
    """Placeholders in a case: files written for it, encoder specs derived from the run's own."""
    summary = json.loads((run / "summary.json").read_text())
    out = []
    for item in change:
        if item == "MISSING":
            item = str(tmp / "missing.jsonl")
        elif item == "BADLINE":
            (tmp / "bad.jsonl").write_text('{"id": "a", "split": "train", "text": "A cat."}\n{"id": "b", "split": \n')
            item = str(tmp / "bad.jsonl")
        elif item in ("NOTYAML", "LIST", "NOCONFIG"):
            path = tmp / f"{item.lower()}.yaml"
            if item != "NOCONFIG":
                path.write_text({"NOTYAML": "steps: [1, 2\n", "LIST": "- steps: 3\n"}[item])
            item = str(path)
        elif item.startswith("CHANGE:"):
            name, enc = item[len("CHANGE:") :].split("=")
            item = ",".join(f"{m}={enc if m == name else e}" for m, e in summary["encoders"].items())
        elif item.startswith("RENAME:"):
            old, new = item[len("RENAME:") :].split("=")
            item = ",".join(f"{new if m == old else m}={e}" for m, e in summary["encoders"].items())
        out.append(item)
    return out


@pytest.mark.parametrize("case,change,code,message", ALIGN_CASES, ids=[c[0] for c in ALIGN_CASES])
def test_bad_align_input_is_refused_and_changes_nothing(run, tmp_path, case, change, code, message):
    change = _resolve_case(run, tmp_path, change)
    args = align_args(run)
    for flag in [c for c in change if c.startswith("--") and c != "--set"]:  # replace a flag's value
        i = args.index(flag) if flag in args else None
        value = change[change.index(flag) + 1]
        if i is None:
            args += [flag, value]
        else:
            args[i + 1] = value
    args += [x for i, x in enumerate(change) if x == "--set" or (i > 0 and change[i - 1] == "--set")]
    before = snapshot(run)
    exit_code, output = cli(*args)
    assert exit_code == code and message in output, (case, exit_code, output[-2000:])
    assert "Traceback" not in output
    assert snapshot(run) == before, f"{case}: the run folder changed"


MLLM_CASES = [
    ("mllm-steps-zero", ["--stage", "1", "--set", "steps=0"], "steps: 0"),
    ("mllm-stage-four", ["--stage", "4"], "stage: 4"),
    ("mllm-lora-rank-zero", ["--stage", "3", "--set", "lora.r=0"], "lora.r: 0"),
    ("mllm-top-p-two", ["--stage", "3", "--set", "moe.top_p=2"], "moe.top_p: 2.0"),
    ("mllm-experts-zero", ["--stage", "3", "--set", "moe.num_experts=0"], "moe.num_experts: 0"),
    ("mllm-prealign-batch-one", ["--stage", "1", "--set", "prealign.batch_size=1"], "prealign.batch_size: 1"),
    ("mllm-prealign-unknown-key", ["--stage", "1", "--set", "prealign.stepz=1"], "prealign.stepz"),
    ("mllm-min-lr-ratio-two", ["--stage", "1", "--set", "min_lr_ratio=2"], "min_lr_ratio: 2"),
    ("mllm-grad-accum-zero", ["--stage", "1", "--set", "grad_accum=0"], "grad_accum: 0"),
    ("mllm-eval-limit-negative", ["--stage", "1", "--set", "eval_limit=-1"], "eval_limit: -1"),
]


@pytest.mark.parametrize("case,args,message", MLLM_CASES, ids=[c[0] for c in MLLM_CASES])
def test_bad_mllm_recipe_is_refused_before_anything_is_written(tmp_path, case, args, message):
    out = tmp_path / "stage"
    exit_code, output = cli("mllm", "train", "--out", str(out), *args)
    assert exit_code == 2 and message in output and "Traceback" not in output, (case, exit_code, output[-2000:])
    assert not out.exists()


# -- stores -----------------------------------------------------------------------------------------------
def _store_copy(run: Path, tmp: Path) -> Path:
    summary = json.loads((run / "summary.json").read_text())
    src = run / summary["stores"]["text"]
    dst = tmp / "store"
    shutil.copytree(src, dst)
    return dst


def _flip_byte(path: Path, at: float = 0.7) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _damage(store: Path, how: str) -> str:
    """Damage a copy of a store; returns what the error must name."""
    shard = store / shard_name(0)
    if how == "flipped-byte":
        _flip_byte(shard)
        return "does not match its checksum"
    if how == "truncated-shard":
        shard.write_bytes(shard.read_bytes()[:-64])
        return f"{shard_name(0)} has"
    if how == "shard-missing":
        shard.unlink()
        return f"shard {shard_name(0)} listed in store.json is missing"
    if how == "index-not-json":
        (store / "store.json").write_text("{not json")
        return "store.json is not valid JSON"
    if how == "index-missing":
        (store / "store.json").unlink()
        return "is not a latent store"
    if how == "header-damaged":
        data = bytearray(shard.read_bytes())
        data[8:24] = b"\x00" * 16
        shard.write_bytes(bytes(data))
        return shard_name(0)
    if how == "nan-rows":  # a shard whose bytes match its checksum but hold NaN (written by a faulty tool)
        opened = LatentStore.open(store)
        vectors = opened.pooled().clone()
        vectors[3] = math.nan
        shutil.rmtree(store)
        store.mkdir()
        write_shard(
            store / shard_name(0),
            0,
            {k: v for k, v in opened.index.items() if k not in ("shards", "format")},
            opened.ids,
            [],
            {"pooled": vectors},
        )
        rebuild_index(store, extra={"complete": True})
        return f"row(s) hold NaN or inf, e.g. ['{opened.ids[3]}']"
    raise AssertionError(how)


STORE_CASES = [
    "flipped-byte",
    "truncated-shard",
    "shard-missing",
    "index-not-json",
    "index-missing",
    "header-damaged",
    "nan-rows",
]


@pytest.mark.parametrize("how", STORE_CASES)
def test_a_damaged_store_is_named_by_verify_and_never_read(run, tmp_path, how):
    store = _store_copy(run, tmp_path)
    message = _damage(store, how)
    before = snapshot(store)
    exit_code, output = cli("store", "verify", str(store))
    assert exit_code in (1, 2) and message in output.replace("\n", " "), (how, exit_code, output)
    if how == "flipped-byte":  # same size, other bytes: `store info` reports it too
        assert json.loads(cli("store", "info", str(store), "--json")[1])["damaged"] != []
    with pytest.raises(StoreError) as caught:
        LatentStore.open(store).pooled()  # what training and index building read
    assert message in str(caught.value), (how, str(caught.value))
    assert snapshot(store) == before


def test_store_info_names_skipped_items(run, tmp_path):
    store = _store_copy(run, tmp_path)
    exit_code, output = cli("store", "info", str(store), "--json")
    info = json.loads(output)
    assert exit_code == 0 and info["skipped"] == len(info["skipped_items"]) and info["damaged"] == []
    assert cli("store", "verify", str(store))[0] == 0


# -- indexes ----------------------------------------------------------------------------------------------
INDEX_CASES = ["flipped-byte", "truncated", "ids-dropped", "meta-not-json", "data-missing"]


@pytest.mark.parametrize("how", INDEX_CASES)
def test_a_damaged_index_is_refused(tmp_path, how):
    rng = np.random.default_rng(0)
    VectorIndex.build(rng.standard_normal((300, 16)).astype(np.float32), [f"i{n}" for n in range(300)]).save(
        tmp_path / "ix"
    )
    data, meta = tmp_path / "ix" / "index.faiss", tmp_path / "ix" / "index.json"
    expect = {
        "flipped-byte": "does not match its checksum",
        "truncated": "bytes",
        "ids-dropped": "300 vectors but 299 ids",
        "meta-not-json": "index.json is not valid JSON",
        "data-missing": "index.faiss is missing",
    }[how]
    if how == "flipped-byte":
        _flip_byte(data, 0.5)
    elif how == "truncated":
        data.write_bytes(data.read_bytes()[:-16])
    elif how == "ids-dropped":
        m = json.loads(meta.read_text())
        m["ids"] = m["ids"][:-1]
        meta.write_text(json.dumps(m))
    elif how == "meta-not-json":
        meta.write_text("{")
    else:
        data.unlink()
    with pytest.raises((IndexMismatch, ValueError, FileNotFoundError), match=expect):
        VectorIndex.load(tmp_path / "ix")


# -- manifests --------------------------------------------------------------------------------------------
def _media_folder(tmp: Path) -> Path:
    Image.new("RGB", (32, 32), (200, 20, 20)).save(tmp / "good.png")
    (tmp / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (tmp / "empty.png").write_bytes(b"")
    with wave.open(str(tmp / "good.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.sin(np.arange(8000) / 5) * 3000).astype(np.int16).tobytes())
    (tmp / "noise.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    return tmp


MANIFEST_CASES = [
    ("duplicate-id", {"id": "ok", "split": "train", "text": "A dog."}, "duplicate id"),
    ("missing-file", {"id": "m", "split": "train", "image": "nowhere.png"}, "missing file nowhere.png"),
    ("corrupt-image", {"id": "c", "split": "train", "image": "corrupt.png"}, "corrupt.png"),
    ("empty-image", {"id": "e", "split": "train", "image": "empty.png"}, "empty file"),
    ("corrupt-audio", {"id": "n", "split": "train", "audio": "noise.wav"}, "noise.wav is not readable audio"),
    ("empty-caption", {"id": "t", "split": "train", "text": "   "}, "empty caption"),
    ("caption-not-text", {"id": "t2", "split": "train", "text": 7}, "not a string"),
    ("no-split", {"id": "s", "text": "A cat."}, "split"),
    ("no-content", {"id": "x", "split": "train"}, "no content field"),
    ("media-not-a-path", {"id": "p", "split": "train", "image": 5}, "expected a relative path string"),
]


@pytest.mark.parametrize("case,record,message", MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_data_validate_names_each_bad_record(tmp_path, case, record, message):
    folder = _media_folder(tmp_path)
    good = [{"id": "ok", "split": "train", "text": "A red square.", "image": "good.png", "audio": "good.wav"}]
    manifest = write_manifest(folder / "manifest.jsonl", good + [record])
    assert (
        cli("data", "validate", str(write_manifest(folder / "good.jsonl", good)))[0] == 0
    )  # the good record alone passes
    exit_code, output = cli("data", "validate", str(manifest))
    assert exit_code == 1 and message in output and f"line 2 (id {record['id']!r})" in output, (case, exit_code, output)


def test_a_malformed_manifest_line_is_named(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"id": "a", "split": "train", "text": "A."}\nnot json\n')
    exit_code, output = cli("data", "validate", str(tmp_path / "m.jsonl"))
    assert exit_code == 2 and "line 2" in output


# -- values that must never be kept -----------------------------------------------------------------------
def test_non_finite_values_are_never_written_or_trained_on(tmp_path):
    with pytest.raises(ValueError, match=r"rows\.1\.loss = nan is not a finite number"):
        write_json(tmp_path / "x.json", {"rows": [{"loss": 1.0}, {"loss": float("nan")}]})
    with pytest.raises(ValueError, match=r"0 = inf is not"):
        write_json(tmp_path / "y.json", [float("inf")])
    assert not (tmp_path / "x.json").exists() and not list(tmp_path.glob(".*.tmp"))
    import torch

    with pytest.raises(NonFiniteLoss, match="step 7: the training loss is nan"):
        require_finite(torch.tensor(float("nan")), "step 7")
    require_finite(torch.tensor(1.5), "step 8")


# -- a copied run -----------------------------------------------------------------------------------------
def test_a_copied_run_reads_its_own_files_and_says_what_is_missing(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("runs", "index"))
    retriever = Retriever(copy, method="linear")
    assert all(str(s.manifest.resolve()).startswith(str(copy.resolve())) for s in retriever.stores.values())
    assert retriever.problems() == []
    sid = retriever.stores["text"].ids[0]
    assert retriever.item(sid)["text"]
    for manifest in {s.manifest.resolve() for s in retriever.stores.values()}:
        manifest.unlink()
    gone = Retriever(copy, method="linear")
    assert any("manifest" in p and "is missing" in p for p in gone.problems())


# -- the service ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(run, tmp_path_factory):
    """``omnimoe serve`` on its own copy of the run, its log in a file: (url, log path, run copy)."""
    copy = tmp_path_factory.mktemp("served") / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("runs"))
    log = copy.parent / "serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "omnimoe.cli", "serve", "--run", str(copy), "--port", "0", "--max-upload-mb", "1"],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=ROOT,
            env=env,
        )
        url, deadline = None, time.time() + 300
        while time.time() < deadline and url is None:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"serve exited: {log.read_text()[-3000:]}")
            if line.startswith("listening on "):
                url = line.split()[-1]
        assert url
        yield url, log, copy
        proc.terminate()
        proc.wait(timeout=30)


HTTP_CASES = [
    ("k-fraction", {"text": "a cat", "target": "image", "k": 2.5}, 422, "k must be an integer, got 2.5"),
    ("k-true", {"text": "a cat", "target": "image", "k": True}, 422, "k must be an integer, got True"),
    ("k-word", {"text": "a cat", "target": "image", "k": "many"}, 422, "k must be an integer"),
    ("k-float-string", {"text": "a cat", "target": "image", "k": "2.0"}, 422, "k must be an integer"),
    ("k-zero", {"text": "a cat", "target": "image", "k": 0}, 422, "k must be between 1 and 100"),
    ("k-too-large", {"text": "a cat", "target": "image", "k": 101}, 422, "k must be between 1 and 100"),
    ("text-and-queries", {"text": "a", "queries": ["b"], "target": "image"}, 422, "exactly one of"),
    ("queries-not-a-list", {"queries": "a cat", "target": "image"}, 422, "queries"),
    ("queries-empty", {"queries": [], "target": "image"}, 422, "queries"),
    ("too-many-queries", {"queries": ["a cat"] * 65, "target": "image"}, 422, "64"),
    ("text-too-long", {"text": "a" * 2001, "target": "image"}, 422, "2000"),
    ("target-missing", {"text": "a cat"}, 422, "target"),
    ("body-a-list", [1, 2], 422, "must be an object"),
]


@pytest.mark.parametrize("case,body,status,message", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_bad_requests_get_a_named_4xx(served, case, body, status, message):
    url, _, copy = served
    before = snapshot(copy)
    r = httpx.post(f"{url}/search", json=body, timeout=60)
    assert r.status_code == status and message in r.json()["detail"], (case, r.status_code, r.text)
    assert snapshot(copy) == before


def test_chunked_upload_over_the_limit_is_413_and_logged(served):
    url, log, _ = served
    parsed = urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    boundary = "xyz"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()

    def body():
        yield head
        for _ in range(40):  # 40 x 64 KiB: past the 1 MiB limit, with no Content-Length
            yield b"\0" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    conn.request(
        "POST",
        "/search",
        body=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        encode_chunked=True,
    )
    response = conn.getresponse()
    assert response.status == 413 and b"upload limit" in response.read()
    conn.close()
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    time.sleep(0.5)
    text = log.read_text()
    assert "POST /search -> 413" in text and "GET /health -> 200" in text


def test_docs_work_offline(served):
    url, log, _ = served
    page = httpx.get(f"{url}/docs")
    assert (
        page.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in page.text and "cdn" not in page.text.lower()
    )
    js = httpx.get(f"{url}/docs-assets/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000
    assert httpx.get(f"{url}/docs-assets/swagger-ui.css").status_code == 200
    assert httpx.get(f"{url}/docs-assets/..%2F..%2Fsetup.py").status_code == 404
    assert httpx.get(f"{url}/docs-assets/index.html").status_code == 404  # only the listed files


def test_case_count():
    """The reliability section of the docs quotes this count."""
    cases = (
        len(ALIGN_CASES)
        + len(MLLM_CASES)
        + len(STORE_CASES)
        + len(INDEX_CASES)
        + len(MANIFEST_CASES)
        + len(HTTP_CASES)
        + 9
    )  # malformed line, chunked 413, non-finite values, copied run, 3 damaged shards redone, 2 connector keys
    assert cases == 97, cases  # docs/reliability.md quotes 97


@pytest.mark.parametrize("how", ["flipped-byte", "header-damaged", "index-not-json"])
def test_extraction_redoes_a_damaged_shard(tmp_path, how):
    """After damage, rerunning the same extraction leaves a store that verifies, with the same vectors."""
    import torch

    from omnimoe.latents.extract import extract

    records = [{"id": f"s{i}", "split": "train", "text": f"A drawing number {i}."} for i in range(6)]
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    extract(manifest, "minilm", tmp_path / "s", shard_size=3, progress=False)
    clean = LatentStore.open(tmp_path / "s").pooled().clone()
    _damage(tmp_path / "s", how)
    extract(manifest, "minilm", tmp_path / "s", shard_size=3, progress=False)
    store = LatentStore.open(tmp_path / "s")
    assert store.verify() == [] and torch.allclose(store.pooled(), clean, atol=1e-6)


def test_a_bad_connector_key_fails_when_the_recipe_is_read(tmp_path):
    exit_code, output = cli(
        "mllm", "train", "--stage", "1", "--out", str(tmp_path / "s"), "--set", "connectors.image.hiden_dim=64"
    )
    assert exit_code == 2 and "connectors.image.hiden_dim" in output and not (tmp_path / "s").exists()
    exit_code, output = cli(
        "mllm", "train", "--stage", "1", "--out", str(tmp_path / "s"), "--set", "connectors.audio.dropout=1.5"
    )
    assert exit_code == 2 and "connectors.audio.dropout: 1.5" in output
