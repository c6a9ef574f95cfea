"""`omnimoe serve` as a real process on a real socket: search by text / image / audio, items and media,
bad input, a bounded concurrent load, and the web page in headless Chromium."""

import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from omnimoe.data.manifest import media_path, read_manifest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def service(demo_run):
    """The service on a free port; yields (base url, run folder, a sample manifest record, the manifest)."""
    run = demo_run[0]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "omnimoe.cli", "serve", "--run", str(run), "--port", "0", "--max-upload-mb", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    url = None
    deadline = time.time() + 300
    while time.time() < deadline and url is None:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            pytest.fail(f"serve exited: {proc.stderr.read()[-3000:]}")
        if line.startswith("listening on "):
            url = line.split()[-1]
    assert url, "serve did not print its address"
    manifest = run / json.loads((run / "summary.json").read_text())["manifest"]
    sample = next(r for r in read_manifest(manifest) if r.get("image") and r.get("audio") and r["split"] == "test")
    yield url, run, sample, manifest
    proc.terminate()
    proc.wait(timeout=30)


def test_health_docs_and_text_search(service):
    url, run, sample, _ = service
    health = httpx.get(f"{url}/health").json()
    chosen = json.loads((run / "summary.json").read_text())["chosen"]  # served by default: validation's choice
    assert health["status"] == "ok" and health["method"] == chosen["method"] and health["chosen_on_validation"]
    assert health["head"] == chosen["heads"][chosen["method"]] == chosen["head"]
    assert health["modalities"]["text"] == "text" and health["items"]["image"] > 50
    spec = httpx.get(f"{url}/openapi.json").json()
    assert {"/search", "/health", "/items/{item_id}"} <= set(spec["paths"])
    assert set(spec["paths"]["/search"]["post"]["requestBody"]["content"]) == {
        "application/json",
        "multipart/form-data",
    }
    assert httpx.get(f"{url}/docs").status_code == 200
    r = httpx.post(f"{url}/search", json={"text": sample["text"], "target": "image", "k": 4})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["direction"] == "text->image" and [h["rank"] for h in data["results"]] == [1, 2, 3, 4]
    scores = [h["score"] for h in data["results"]]
    assert scores == sorted(scores, reverse=True)
    # the same answer as the CLI on the same run
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "omnimoe.cli",
            "search",
            sample["text"],
            "--target",
            "image",
            "-k",
            "4",
            "--run",
            str(run),
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert [h["id"] for h in json.loads(cli.stdout)["results"]] == [h["id"] for h in data["results"]]
    batch = httpx.post(f"{url}/search", json={"queries": [sample["text"], "a bird"], "target": "image", "k": 2}).json()
    assert len(batch["batch"]) == 2 and [h["id"] for h in batch["batch"][0]] == [h["id"] for h in data["results"][:2]]


def test_upload_search_items_and_media(service):
    url, _, sample, manifest = service
    image = media_path(manifest, sample["image"])
    with open(image, "rb") as f:
        r = httpx.post(f"{url}/search", files={"file": (image.name, f, "image/png")}, data={"target": "text", "k": "3"})
    assert r.status_code == 200, r.text
    assert r.json()["direction"] == "image->text" and r.json()["query"]["file"] == image.name
    audio = media_path(manifest, sample["audio"])
    with open(audio, "rb") as f:
        r = httpx.post(
            f"{url}/search",
            files={"file": (audio.name, f, "audio/wav")},
            data={"target": "image", "k": "3", "source": "speech"},
        )
    assert r.status_code == 200 and r.json()["direction"] == "speech->image", r.text
    hit = r.json()["results"][0]
    item = httpx.get(f"{url}{hit['url']}").json()
    assert item["id"] == hit["id"] and item["text"] == hit["text"] and "image" in item["media"]
    png = httpx.get(f"{url}{hit['thumbnail']}")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    original = httpx.get(f"{url}{item['media_urls']['image']}")
    assert original.status_code == 200 and "sandbox" in original.headers["content-security-policy"]
    assert (
        original.content
        == media_path(manifest, next(r for r in read_manifest(manifest) if r["id"] == hit["id"])["image"]).read_bytes()
    )


def raw_get(url: str, path: str) -> int:
    """A GET with the path sent exactly as written (no client-side normalisation of '..')."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", path)
    status = conn.getresponse().status
    conn.close()
    return status


def test_bad_input_gets_clear_4xx(service, tmp_path):
    url, _, sample, manifest = service

    def post(**kw):
        return httpx.post(f"{url}/search", **kw)

    cases = [
        (post(json={"text": "  ", "target": "image"}), 400, "empty text"),
        (post(json={"text": "a cat", "target": "video"}), 400, "unknown target 'video'"),
        (post(json={"target": "image"}), 422, "exactly one of"),
        (post(json={"text": "a cat", "target": "image", "k": 0}), 422, "k must be between"),
        (post(json={"text": ["a"], "target": "image"}), 422, "must be a string"),
        (post(content=b'{"text": "a', headers={"content-type": "application/json"}), 400, "not valid JSON"),
        (post(content=b"hello", headers={"content-type": "text/plain"}), 415, "application/json"),
        (post(files={"file": ("notes.txt", b"hello", "text/plain")}, data={"target": "text"}), 415, "text/plain"),
        (
            post(files={"file": ("broken.png", b"\x89PNG\r\n\x1a\ngarbage", "image/png")}, data={"target": "text"}),
            400,
            "broken.png",
        ),
        (post(files={"file": ("empty.png", b"", "image/png")}, data={"target": "text"}), 400, "empty"),
        (
            post(files={"file": ("big.png", b"\0" * (2 * 2**20), "image/png")}, data={"target": "text"}),
            413,
            "upload limit",
        ),
        (
            post(files={"file": ("x.png", open(media_path(manifest, sample["image"]), "rb"), "image/png")}),
            422,
            "target is required",
        ),
        (httpx.get(f"{url}/items/no/such/item"), 404, "no stored item"),
        (httpx.get(f"{url}/media/manifest/{sample['id']}"), 404, "no 'manifest' media"),
    ]
    for response, status, message in cases:
        assert response.status_code == status and message in response.json()["detail"], (
            status,
            response.status_code,
            response.text,
        )
    for path in (
        "/items/../../etc/passwd",
        "/media/image/../../../../etc/passwd",
        "/media/image/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/thumbs/..%2F..%2Fetc%2Fpasswd",
        "/media/image//etc/passwd",
    ):
        assert raw_get(url, path) == 404, path
    assert httpx.get(f"{url}/health").json()["status"] == "ok"  # still serving


def test_concurrent_answers_equal_the_answers_alone(service):
    """160 requests from 16 threads, which the service coalesces into shared encoder batches: each must get
    exactly the answer (ids and scores, in order) that the same request gets when sent alone."""
    url, _, sample, _ = service
    texts = [
        sample["text"],
        "a red fire truck",
        "a bird",
        "a musical instrument",
        "a small green frog on a leaf",
        "a guitar",
        "an old steam train crossing a bridge at night",
        "cat",
    ]
    bodies = [{"text": texts[i % 8], "target": ["image", "speech"][i // 8], "k": 3 + i % 5} for i in range(16)]

    def answer(body: dict) -> list[tuple[str, float]]:
        r = httpx.post(f"{url}/search", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return [(h["id"], h["score"]) for h in r.json()["results"]]

    alone = [answer(b) for b in bodies]  # one at a time: nothing to share a batch with
    assert len({tuple(a) for a in alone}) == 16  # every request has its own answer, so a mix-up shows
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda i: answer(bodies[i % 16]), range(160)))
    for i, got in enumerate(together):
        want = alone[i % 16]
        assert [h for h, _ in got] == [h for h, _ in want], (bodies[i % 16], got, want)
        assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-5), (bodies[i % 16], got, want)


def test_web_page_in_headless_chromium(service, tmp_path):
    """Type a caption and see thumbnails with scores and captions; then drop in an image file."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("OMNIMOE_REQUIRE_BROWSER"):
            pytest.fail(f"no Chromium at {CHROMIUM} (CI installs Debian's chromium)")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    url, _, sample, manifest = service
    args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_selector("#target option[value=image]", state="attached")
        page.fill("#query", sample["text"])
        page.fill("#k", "6")
        page.click("#search")
        page.wait_for_function("document.querySelectorAll('#results .result').length === 6")
        assert "text->image" in page.inner_text("#status")
        scores = [float(s) for s in page.locator("#results .score").all_inner_texts()]
        assert scores == sorted(scores, reverse=True)
        assert all(c.strip() for c in page.locator("#results .caption").all_inner_texts())
        page.wait_for_function(
            "[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
        )
        page.screenshot(path=str(tmp_path / "text-search.png"), full_page=True)
        page.select_option("#target", "text")
        page.set_input_files("#file", str(media_path(manifest, sample["image"])))
        page.wait_for_function("document.querySelector('#status').textContent.startsWith('image->text')")
        assert page.locator("#results .result").count() == 6
        page.fill("#query", "   ")
        page.click("#search")
        page.wait_for_function("document.querySelector('#status').classList.contains('error')")
        assert "empty text" in page.inner_text("#status")
        browser.close()
