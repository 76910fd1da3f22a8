"""``finetune serve``: a real server process on a free port, real HTTP requests, and its page
in a real headless browser (Debian's Chromium through Playwright)."""

import base64
import io
import json
import os
import shutil
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from conftest import serving
from PIL import Image

import finetune
from finetune.batching import Batcher
from finetune.cli import main as cli_main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("FINETUNE_TEST_ARTIFACTS",
                                Path(__file__).parents[1] / "test-artifacts"))


def png_header(side: int) -> bytes:
    """A PNG that claims ``side`` x ``side`` pixels and holds none (PIL's bomb check fires on
    its header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grey
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def images(trained, tmp_path_factory) -> list[Path]:
    """Eight test images as PNG files, and a larger JPEG (resized by the server as by predict).
    """
    _, test = trained
    folder = tmp_path_factory.mktemp("serve-images")
    files = []
    for i in range(8):
        files.append(folder / f"{i}.png")
        Image.fromarray(test.images[i, 0].numpy()).save(files[-1])
    Image.fromarray(test.images[8, 0].numpy()).resize((60, 60)).save(folder / "8.jpg")
    return [*files, folder / "8.jpg"]


@pytest.fixture(scope="module")
def server(trained):
    """``finetune serve`` as its own process, with small limits to test them against."""
    with serving(trained[0], "--max-images", "12", "--max-pixels", "250000",
                 "--max-request-mb", "1", "--batch-wait-ms", "50") as url:
        yield url


def post_files(url: str, files: list[Path], **params) -> httpx.Response:
    return httpx.post(f"{url}/predict", params=params, timeout=60,
                      files=[("files", (f.name, f.read_bytes())) for f in files])


def as_pairs(response: httpx.Response) -> list[list[tuple[str, float]]]:
    assert response.status_code == 200, response.text
    return [[(c["class"], c["probability"]) for c in p["top_k"]]
            for p in response.json()["predictions"]]


def assert_same(served, predicted) -> None:
    assert [[c for c, _ in r] for r in served] == [[c for c, _ in r] for r in predicted]
    for s, p in zip(served, predicted, strict=True):
        assert [v for _, v in s] == pytest.approx([v for _, v in p], abs=2e-6)


def test_one_image_and_a_batch_equal_predict(server, trained, images):
    run, _ = trained
    predictor = finetune.load(run)
    assert_same(as_pairs(post_files(server, images[:1], top_k=3)),
                predictor.predict(images[:1], top_k=3))
    assert_same(as_pairs(post_files(server, images, top_k=4)),
                predictor.predict(images, top_k=4))
    assert_same(as_pairs(post_files(server, images[:3], top_k=2, tta="true")),
                predictor.predict(images[:3], top_k=2, tta=True))
    body = {"images": [base64.b64encode(f.read_bytes()).decode() for f in images[:2]],
            "names": ["a", "b"], "top_k": 2}
    response = httpx.post(f"{server}/predict", json=body, timeout=60)
    assert [p["file"] for p in response.json()["predictions"]] == ["a", "b"]
    assert_same(as_pairs(response), predictor.predict(images[:2], top_k=2))


def test_concurrent_requests_share_model_calls(server, trained, images):
    expected = finetune.load(trained[0]).predict(images, top_k=2)
    before = httpx.get(f"{server}/health").json()["model_calls"]
    barrier = threading.Barrier(16)

    def one(i: int):
        barrier.wait()
        return as_pairs(post_files(server, [images[i % len(images)]], top_k=2))[0]

    with ThreadPoolExecutor(16) as pool:
        served = list(pool.map(one, range(16)))
    assert_same(served, [expected[i % len(images)] for i in range(16)])
    calls = httpx.get(f"{server}/health").json()["model_calls"] - before
    assert 1 <= calls < 16  # requests waited for each other (--batch-wait-ms 50)


@pytest.mark.parametrize("case", ["not-an-image", "body-too-large", "chunked-too-large",
                                  "too-many-pixels", "too-many-images", "content-type",
                                  "unknown-route", "bad-base64", "bad-top-k", "bool-top-k",
                                  "no-images", "bomb", "nested-json", "huge-top-k",
                                  "no-filename", "form-tta"])
def test_bad_requests_are_a_4xx_with_a_json_error(server, images, case):
    png = images[0].read_bytes()
    big = io.BytesIO()
    Image.new("L", (600, 600)).save(big, format="PNG")
    request = {
        "not-an-image": ("POST", "/predict", {"files": [("files", ("x.png", b"GIF89a no"))]}),
        "body-too-large": ("POST", "/predict",
                           {"files": [("files", ("x.png", png + b"\0" * 2**21))]}),
        "chunked-too-large": ("POST", "/predict", {
            # a valid part header, then a file that never ends: the limit, not the parser
            "content": iter([b'--x\r\nContent-Disposition: form-data; name="files"; '
                             b'filename="a.png"\r\nContent-Type: image/png\r\n\r\n']
                            + [b"\0" * 2**19] * 4),
            "headers": {"content-type": "multipart/form-data; boundary=x"}}),
        "too-many-pixels": ("POST", "/predict", {"files": [("files", ("big.png",
                                                                      big.getvalue()))]}),
        "too-many-images": ("POST", "/predict", {"files": [("files", ("x.png", png))] * 13}),
        "content-type": ("POST", "/predict", {"content": png,
                                              "headers": {"content-type": "image/png"}}),
        "unknown-route": ("GET", "/predictions", {}),
        "bad-base64": ("POST", "/predict", {"json": {"images": ["%%%"]}}),
        "bad-top-k": ("POST", "/predict?top_k=zero", {"files": [("files", ("x.png", png))]}),
        "bool-top-k": ("POST", "/predict", {"json": {"images": [base64.b64encode(png).decode()],
                                                     "top_k": True}}),
        "no-images": ("POST", "/predict", {"json": {"images": []}}),
        "bomb": ("POST", "/predict", {"files": [("files", ("bomb.png", png_header(10**5)))]}),
        "nested-json": ("POST", "/predict", {
            "content": b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b', "images": []}',
            "headers": {"content-type": "application/json"}}),
        "huge-top-k": ("POST", "/predict?top_k=" + "9" * 5000,
                       {"files": [("files", ("x.png", png))]}),
        "no-filename": ("POST", "/predict", {"files": [("files", (None, png))]}),
        "form-tta": ("POST", "/predict", {"files": [("files", ("x.png", png))],
                                          "data": {"tta": "banana"}}),
    }[case]
    method, path, kwargs = request
    response = httpx.request(method, server + path, timeout=60, **kwargs)
    status, needle = {
        "not-an-image": (400, "x.png: cannot decode image"),
        "body-too-large": (413, "--max-request-mb"),
        "chunked-too-large": (413, "--max-request-mb"),
        "too-many-pixels": (413, "360,000 pixels, over this server's limit of 250,000"),
        "too-many-images": (413, "more than 12 images"),
        "content-type": (415, "multipart/form-data"),
        "unknown-route": (404, "no route GET /predictions"),
        "bad-base64": (400, "not valid base64"),
        "bad-top-k": (422, "top_k must be a positive integer"),
        "bool-top-k": (422, "top_k must be a positive integer, got True"),
        "no-images": (400, "no images"),
        "bomb": (413, "bomb.png: over 178,956,970 pixels, which PIL itself refuses"),
        "nested-json": (400, 'the JSON body must be {"images"'),
        "huge-top-k": (422, "top_k must be a positive integer, got '99999"),
        "no-filename": (400, "the part 'files' has no filename"),
        "form-tta": (422, "tta must be true or false, got 'banana'"),
    }[case]
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]
    assert httpx.get(f"{server}/health").status_code == 200  # and the server goes on


def test_metadata_and_openapi(server, trained):
    run, _ = trained
    meta = httpx.get(f"{server}/metadata").json()
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert meta["class_names"] == json.loads((run / "model.json").read_text())["class_names"]
    assert meta["metrics"]["test_acc"] == record["test_acc"] and meta["image_size"] == 28
    assert meta["card"] == (run / "README.md").read_text()
    schema = httpx.get(f"{server}/openapi.json").json()
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    assert {"/health", "/metadata"} <= set(schema["paths"])
    assert all(httpx.head(f"{server}{path}").status_code == 200
               for path in ("/", "/health", "/metadata"))
    page = httpx.get(server).text
    assert "<script" in page and "http:" not in page and "https:" not in page  # all local


def test_the_schema_has_one_id_per_operation(trained):
    import warnings

    from finetune.serving import Settings, create_app

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FastAPI warns of a duplicate operation id
        schema = create_app(Settings(run=str(trained[0]))).openapi()
    ids = [op["operationId"] for path in schema["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids)) and {"/health", "/metadata", "/predict"} <= set(
        schema["paths"])


def test_tta_on_a_model_without_views_is_a_422(trained, images, tmp_path):
    from conftest import without_views

    with serving(without_views(trained[0], tmp_path / "plain")) as url:
        response = post_files(url, images[:1], tta="true")
        assert response.status_code == 422 and "no views to add" in response.json()["error"]
        assert post_files(url, images[:1]).status_code == 200


def test_a_port_in_use_is_a_one_line_error(server, trained, capsys):
    port = server.rsplit(":", 1)[1]
    assert cli_main(["serve", str(trained[0]), "--port", port]) == 2
    assert f"127.0.0.1:{port} is already in use" in capsys.readouterr().err


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)")
def test_the_page_in_a_real_browser(server, trained, images):
    playwright = pytest.importorskip("playwright.sync_api")
    expected = finetune.load(trained[0]).predict(images[:2], top_k=5)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server)
        page.set_input_files("#files", [str(f) for f in images[:2]])
        page.wait_for_selector(".result", timeout=30_000)
        rows = page.locator(".result")
        assert rows.count() == 2
        for k in range(2):
            labels = rows.nth(k).locator(".label").all_inner_texts()
            assert labels == [c for c, _ in expected[k]]
            assert rows.nth(k).locator(".name").inner_text() == images[k].name
        assert "test accuracy" in page.locator("#facts").inner_text()
        page.screenshot(path=str(ARTIFACTS / "serve-page.png"), full_page=True)
        browser.close()
    assert (ARTIFACTS / "serve-page.png").stat().st_size > 1000


def test_the_batcher_groups_requests_without_splitting_them():
    calls = []

    def forward(views: list[torch.Tensor]) -> torch.Tensor:
        calls.append([len(v) for v in views])
        return views[0].flatten(1).sum(1, keepdim=True)

    batcher = Batcher(forward, max_batch=4, max_wait=0.2)
    futures = [batcher.submit(torch.full((n, 1, 1, 1, 1), float(i)))
               for i, n in enumerate([1, 2, 3, 1])]
    futures.append(batcher.submit(torch.full((1, 2, 1, 1, 1), 9.0)))  # two views: its own
    batcher.start()
    results = [f.result(timeout=10) for f in futures]
    batcher.close()
    assert calls == [[3], [4], [1, 1]]  # 1+2 (3 would not fit), 3+1, the two-view request
    assert [r.flatten().tolist() for r in results] == [[0.0], [1.0, 1.0], [2.0] * 3, [3.0],
                                                       [9.0]]
    off = Batcher(forward, max_batch=1, max_wait=0.2)
    calls.clear()
    futures = [off.submit(torch.zeros(1, 1, 1, 1, 1)) for _ in range(3)]
    off.start()
    [f.result(timeout=10) for f in futures]
    off.close()
    assert calls == [[1], [1], [1]]


def test_the_batcher_waits_only_for_requests_on_their_way():
    calls = []

    def forward(views: list[torch.Tensor]) -> torch.Tensor:
        calls.append(len(views[0]))
        return views[0].flatten(1)

    batcher = Batcher(forward, max_batch=8, max_wait=30.0)
    batcher.start()
    one = torch.zeros(1, 1, 1, 1, 1)
    batcher.submit(one).result(timeout=10)  # nothing else on its way: no 30 s wait
    with batcher.arriving():  # another request is decoding its images
        with batcher.arriving():
            first = batcher.submit(one)
        time.sleep(0.2)
        assert not first.done()  # it waits for the announced one...
        second = batcher.submit(one)
    first.result(timeout=10), second.result(timeout=10)
    batcher.close()
    assert calls == [1, 2]  # ...and they share a call
