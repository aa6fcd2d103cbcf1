"""`geo serve` as users meet it: a real server process on a loopback port, every route and every limit.

The main server runs with a token and small limits (1 MB uploads, 2 MP images,
4 images a request) so each limit can be crossed with small files. The queue,
timeout and micro-batching tests run uvicorn in this process over an index
whose model work waits on an event, so "busy" and "slow" are states the test
sets, not timings it hopes for.
"""
from __future__ import annotations

import base64
import io
import json
import os
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from geo.cli import app
from geo.query.index import open_index
from geo.store.bundle import open_bundle
from geo.store.embeddings import EmbeddingReader
from serving import geo_serve, uvicorn_thread

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
QUERIES = sorted((Path(__file__).resolve().parents[1] / "examples" / "osv5m" / "queries").glob("*.jpg"))[:3]


@pytest.fixture(scope="module")
def bundle(cli_bundle) -> Path:
    return cli_bundle[1]


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    limits = tmp_path_factory.mktemp("limits") / "limits.toml"
    limits.write_text("max_upload_mb = 1\nmax_pixels = 2_000_000\nmax_images = 4\nqueue_size = 8\n")
    with geo_serve(bundle, "--token", TOKEN, "--config", str(limits)) as url:
        yield url


def _files(*items: tuple[str, bytes, str]) -> list:
    return [("images", item) for item in items]


def _photo(path: Path) -> tuple[str, bytes, str]:
    return path.name, path.read_bytes(), "image/jpeg"


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 200)).save(buf, "PNG")
    return buf.getvalue()


def assert_same(a, b, path="answer"):
    """Equal JSON values, floats to 1e-5 relative: the server's forward pass runs on one core per batch, a local
    query's on all of them, so convolutions sum in another order (~1e-7), and a value rounded to six decimals
    can move by one in its last place."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


# ---------------------------------------------------------------- routes and answers
def test_healthz_needs_no_token_and_everything_else_does(server):
    assert httpx.get(server + "/healthz").json()["status"] == "ok"
    for method, route in (("GET", "/info"), ("GET", "/metrics"), ("GET", "/docs"), ("GET", "/openapi.json"),
                          ("GET", "/gallery/x/thumbnail"), ("GET", "/static/app.js"), ("POST", "/locate")):
        r = httpx.request(method, server + route)
        assert r.status_code == 401, route
        r = httpx.request(method, server + route, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401, route
    page = httpx.get(server + "/")
    assert page.status_code == 401 and page.headers["www-authenticate"].startswith("Basic")  # the browser asks
    basic = base64.b64encode(f"me:{TOKEN}".encode()).decode()
    assert httpx.get(server + "/", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    assert httpx.get(server + "/info", headers=AUTH).status_code == 200


def test_answers_equal_geo_query_json_and_a_bad_image_keeps_its_error(server, bundle, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"these are not pixels")
    r = httpx.post(server + "/locate", headers=AUTH, timeout=60,
                   files=_files(_photo(QUERIES[0]), ("notes.jpg", bad.read_bytes(), "image/jpeg"),
                                *map(_photo, QUERIES[1:])))
    assert r.status_code == 200, r.text
    got = r.json()
    assert [a["image"] for a in got] == [QUERIES[0].name, "notes.jpg", *(q.name for q in QUERIES[1:])]
    assert got[1]["error"] and got[1]["lat"] is None and got[1]["lon"] is None
    assert all(a["error"] is None and isinstance(a["lat"], float) for i, a in enumerate(got) if i != 1)

    cli = CliRunner().invoke(app, ["query", str(QUERIES[0]), str(bad), *map(str, QUERIES[1:]), "--index", str(bundle),
                                   "--json"], catch_exceptions=False)
    local = [json.loads(line) for line in cli.stdout.splitlines()]
    for served, here in zip(got, local):
        assert Path(here.pop("image")).name == served.pop("image")
        assert_same(served, here)


def test_query_server_prints_what_a_local_query_prints(server, bundle):
    args = [*map(str, QUERIES[:2]), "missing.jpg", "--json"]
    remote = CliRunner().invoke(app, ["query", *args, "--server", server, "--token", TOKEN])
    local = CliRunner().invoke(app, ["query", *args, "--index", str(bundle)])
    assert remote.exit_code == local.exit_code == 3, remote.output  # missing.jpg failed, the others answered
    for a, b in zip(remote.stdout.splitlines(), local.stdout.splitlines(), strict=True):
        assert_same(json.loads(a), json.loads(b))
    denied = CliRunner().invoke(app, ["query", str(QUERIES[0]), "--server", server], env={"GEO_TOKEN": ""})
    assert denied.exit_code == 2 and "token" in denied.output


def test_precomputed_embeddings_as_json(server, bundle):
    _, emb = EmbeddingReader(open_bundle(bundle)).take(np.array([0, 5, 9]))
    rows = emb.tolist()
    r = httpx.post(server + "/locate?mode=knn&k=10", headers=AUTH, timeout=60,
                   json={"embeddings": [rows[0], rows[1][:-1], rows[2]], "ids": ["a", "short", "c"]})
    assert r.status_code == 200, r.text
    got = r.json()
    assert [a["id"] for a in got] == ["a", "short", "c"]
    assert "d embeddings" in got[1]["error"] and got[1]["lat"] is None
    want = open_index(bundle).locate_embeddings(emb[[0, 2]], mode="knn", k=10, ids=["a", "c"])
    for served, here in zip([got[0], got[2]], want):
        assert_same(served, json.loads(json.dumps(here.to_dict())))
    assert got[0]["neighbors"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)  # a gallery photo finds itself


def test_the_region_takes_the_stated_coverage_over_http(server, bundle):
    _, emb = EmbeddingReader(open_bundle(bundle)).take(np.array([0, 5]))
    regions = {}
    for coverage in (0.5, 0.95):
        r = httpx.post(server + f"/locate?mode=knn&coverage={coverage}", headers=AUTH, timeout=60,
                       json={"embeddings": emb.tolist()})
        assert r.status_code == 200, r.text
        regions[coverage] = [a["region"] for a in r.json()]
    for small, big in zip(regions[0.5], regions[0.95]):
        assert (small["coverage"], big["coverage"]) == (0.5, 0.95) and small["area_km2"] <= big["area_km2"]
        assert big["geometry"]["type"] == "MultiPolygon"
    want = open_index(bundle).locate_embeddings(emb, mode="knn", coverage=0.5)
    assert [a.region["cells"] for a in want] == [a["cells"] for a in regions[0.5]]
    r = httpx.post(server + "/locate?coverage=0", headers=AUTH, timeout=60, json={"embeddings": emb.tolist()})
    assert r.status_code == 422


def test_info_metrics_docs_and_thumbnails(server, bundle):
    info = httpx.get(server + "/info", headers=AUTH).json()
    cli = json.loads(CliRunner().invoke(app, ["info", str(bundle), "--json"]).stdout)
    assert {k: info[k] for k in cli if k != "backbone"} == {k: v for k, v in cli.items() if k != "backbone"}
    assert info["backbone"]["weights"]["sha256"] == cli["backbone"]["weights"]["sha256"]
    assert info["backbone"]["weights"]["path"] == Path(cli["backbone"]["weights"]["path"]).name  # no server paths
    assert os.sep + "site-packages" not in json.dumps(info) and str(bundle) not in json.dumps(info)
    assert info["modes"] == ["fused", "knn", "gallery", "cells", "regression"] and info["default_mode"] == "fused"

    httpx.post(server + "/locate", headers=AUTH, files=_files(_photo(QUERIES[0])), timeout=60)
    text = httpx.get(server + "/metrics", headers=AUTH).text
    for series in ('geo_requests_total{route="/locate",status="200"}', "geo_request_seconds_bucket",
                   "geo_batch_size_count", "geo_queue_depth", "geo_images_total", "geo_image_errors_total",
                   "geo_body_bytes_in_flight"):
        assert series in text, series
    spent = {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
             if line.startswith("geo_model_seconds_total{")}
    assert set(spent) == {"decode", "forward", "answer"} and all(v > 0 for v in spent.values())  # where its time went

    assert "/locate" in httpx.get(server + "/openapi.json", headers=AUTH).json()["paths"]
    for page in ("/docs", "/redoc"):  # FastAPI's pages load from a CDN: none is served (issue 27, finding 15)
        assert httpx.get(server + page, headers=AUTH).status_code == 404
    for page in ("/", "/static/app.js", "/static/style.css"):  # everything the browser loads comes from here
        text = httpx.get(server + page, headers=AUTH).text
        assert "https:" not in text and 'src="//' not in text and "url(//" not in text, page

    some_id = EmbeddingReader(open_bundle(bundle)).read_meta(["id"])["id"].iloc[0]
    r = httpx.get(f"{server}/gallery/{some_id}/thumbnail", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(r.content)).size) <= 256
    for bad in ("nope", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd"):  # ids only, never a path
        assert httpx.get(f"{server}/gallery/{bad}/thumbnail", headers=AUTH).status_code == 404


def test_thumbnail_of_a_photo_whose_file_is_gone_is_404(bundle, tmp_path):
    from geo.serve.thumbnails import Thumbnails

    gone = Thumbnails(np.array(["a", "b"]), np.array([str(QUERIES[0]), str(tmp_path / "deleted.jpg")]))
    assert gone.get("a")[:2] == b"\xff\xd8" and gone.get("b") is None and gone.get("c") is None


# ---------------------------------------------------------------- limits
def test_upload_limits(server):
    big = ("big.jpg", b"\xff\xd8" + bytes(1_200_000), "image/jpeg")
    r = httpx.post(server + "/locate", headers=AUTH, files=_files(big))
    assert r.status_code == 413 and "big.jpg" in r.json()["detail"]

    r = httpx.post(server + "/locate", headers={**AUTH, "Content-Type": "multipart/form-data; boundary=x"},
                   content=b"--x\r\n" + bytes(6 << 20))
    assert r.status_code == 413  # the whole body, before parsing

    r = httpx.post(server + "/locate", headers=AUTH, files=_files(*[_photo(QUERIES[0])] * 5))
    assert r.status_code == 413 and "max_images" in r.json()["detail"]

    r = httpx.post(server + "/locate", headers=AUTH, files=_files(("notes.txt", b"hello", "text/plain")))
    assert r.status_code == 415 and "notes.txt" in r.json()["detail"]
    r = httpx.post(server + "/locate", headers={**AUTH, "Content-Type": "text/plain"}, content=b"hello")
    assert r.status_code == 415

    r = httpx.post(server + "/locate", headers=AUTH, files=_files(("wide.png", _png(3000, 1000), "image/png")))
    assert r.status_code == 422 and "wide.png" in r.json()["detail"] and "pixels" in r.json()["detail"]

    for query in ("mode=nope", "k=0", "crops=2"):
        assert httpx.post(f"{server}/locate?{query}", headers=AUTH, files=_files(_photo(QUERIES[0]))).status_code == 422

    ok = httpx.post(server + "/locate", headers=AUTH, files=_files(("small.png", _png(1500, 1000), "image/png")),
                    timeout=60)
    assert ok.status_code == 200 and ok.json()[0]["error"] is None  # 1.5 MP is under the limit


class _Gated:
    """A GeoIndex whose forward pass waits for ``gate``; records the size of every forward pass."""

    def __init__(self, index):
        self._index = index
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.batches: list[int] = []

    def __getattr__(self, name):
        return getattr(self._index, name)

    def embed_tensors(self, tensors):
        self.batches.append(len(tensors))
        self.entered.set()
        self.gate.wait(30)
        return self._index.embed_tensors(tensors)


def _post_async(url: str, path: Path, results: list, i: int) -> threading.Thread:
    def go():
        results[i] = httpx.post(url + "/locate", files=_files(_photo(path)), timeout=60)

    t = threading.Thread(target=go)
    t.start()
    return t


def test_full_queue_is_503_and_a_slow_answer_is_504(bundle):
    from geo.serve.app import create_app
    from geo.serve.limits import ServeLimits

    gated = _Gated(open_index(bundle))
    limits = ServeLimits(queue_size=2, max_images=2, max_batch=2, max_wait_ms=0, timeout_s=3, model_threads=1)
    with uvicorn_thread(create_app(gated, limits)) as url:
        results: list = [None] * 3
        first = _post_async(url, QUERIES[0], results, 0)
        assert gated.entered.wait(20)  # the model thread holds the first request
        waiting = [_post_async(url, QUERIES[i], results, i) for i in (1, 2)]  # these fill the queue
        for _ in range(100):
            if httpx.get(url + "/metrics").text.count("geo_queue_depth 2.0"):
                break
            threading.Event().wait(0.05)
        r = httpx.post(url + "/locate", files=_files(_photo(QUERIES[0])))
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        for t in (first, *waiting):
            t.join(30)
        assert [x.status_code for x in results] == [504, 504, 504]  # nobody released the gate within 3 s
        gated.gate.set()
        again = httpx.post(url + "/locate", files=_files(_photo(QUERIES[0])), timeout=60)
        assert again.status_code == 200 and again.json()[0]["lat"] is not None  # the server recovered


def test_model_threads_run_batches_side_by_side_with_the_same_answers(bundle):
    """Two model threads: while the first batch's forward pass is held, the second thread takes the next
    request into a batch of its own; both answer as one thread does."""
    from geo.serve.app import create_app
    from geo.serve.limits import ServeLimits

    gated = _Gated(open_index(bundle))
    with uvicorn_thread(create_app(gated, ServeLimits(max_batch=8, max_wait_ms=0, model_threads=2))) as url:
        results: list = [None] * 2
        first = _post_async(url, QUERIES[0], results, 0)
        assert gated.entered.wait(20)
        second = _post_async(url, QUERIES[1], results, 1)
        for _ in range(200):  # the second request reaches a forward pass while the first is still held
            if len(gated.batches) == 2:
                break
            threading.Event().wait(0.05)
        assert gated.batches == [1, 1]
        gated.gate.set()
        for t in (first, second):
            t.join(60)
    local = open_index(bundle).locate([str(QUERIES[0]), str(QUERIES[1])])
    for r, here in zip(results, local):
        assert r.status_code == 200
        served = r.json()[0]
        here = here.to_dict()
        assert Path(here.pop("image")).name == served.pop("image")
        assert_same(served, here)


def test_concurrent_requests_share_one_forward_pass(bundle):
    from geo.serve.app import create_app
    from geo.serve.limits import ServeLimits

    gated = _Gated(open_index(bundle))
    with uvicorn_thread(create_app(gated, ServeLimits(max_batch=8, max_wait_ms=0, model_threads=1))) as url:
        results: list = [None] * 5
        first = _post_async(url, QUERIES[0], results, 0)
        assert gated.entered.wait(20)
        rest = [_post_async(url, QUERIES[i % 3], results, i) for i in range(1, 5)]
        for _ in range(100):
            if "geo_queue_depth 4.0" in httpx.get(url + "/metrics").text:
                break
            threading.Event().wait(0.05)
        gated.gate.set()
        for t in (first, *rest):
            t.join(60)
        assert [r.status_code for r in results] == [200] * 5
        assert gated.batches == [1, 4]  # the four requests that waited were answered by one forward pass
        alone = open_index(bundle).locate_one(str(QUERIES[1]))
        batched = results[1].json()[0]
        assert batched["lat"] == pytest.approx(alone.lat, abs=1e-6) and batched["lon"] == pytest.approx(alone.lon, abs=1e-6)
