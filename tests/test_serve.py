"""`serve.py`: a real server on 127.0.0.1 answers a real HTTP client (search, thumbnails, health, bad uploads as
4xx), and its page, loaded in headless Chromium, shows a query's neighbours (skipped where Chromium is missing)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
import uuid

import pytest
from PIL import Image

from irlab.builders import build_datamodule
from irlab.gallery import item_image
from irlab.methods import method_named
from irlab.saved_index import SavedIndex
from irlab.serve import SearchService, make_server
from tests.helpers import compose_config
from tests.test_query import untrained_checkpoint
from tests.test_saved_index import build

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    ckpt, common = untrained_checkpoint("digits_baseline", tmp)
    build(tmp, common, ckpt, tmp / "index")
    cfg = compose_config([*common, f"index={tmp / 'index'}", f"ckpt_path={ckpt}"], config_name="serve",
                         output_dir=tmp / "run")
    dm = build_datamodule(cfg)
    model, _ = method_named(cfg.method.name).load(cfg, dm)
    index = SavedIndex.load(tmp / "index")
    service = SearchService(index, index.searcher(model), dm.eval_transform(),
                            lambda row: item_image(index.rows[row], dm), model.score_name, top_k=5, max_upload_mb=0.05)
    httpd = make_server(service, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", index, dm
    httpd.shutdown()
    httpd.server_close()


def request(url: str, data: bytes | None = None, kind: str | None = None) -> tuple[int, bytes, str]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": kind} if kind else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers["Content-Type"]


def multipart(fields: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}.bin\"\r\n"
                    f"Content-Type: application/octet-stream\r\n\r\n".encode() + value + b"\r\n"
                    for name, value in fields.items())
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_search_health_and_thumbnails(server):
    url, index, dm = server
    status, body, kind = request(f"{url}/healthz")
    assert status == 200 and json.loads(body)["rows"] == len(index.rows)
    query = item_image(index.rows[7], dm)
    status, body, kind = request(f"{url}/search", *multipart({"file": png(query), "top_k": b"4"}))
    assert status == 200 and kind == "application/json"
    answer = json.loads(body)
    assert [r["rank"] for r in answer["results"]] == [1, 2, 3, 4]
    assert answer["results"][0]["row"] == 7 and answer["results"][0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert answer["results"][0]["label"] == index.rows[7].label and answer["score"] == "cosine similarity"
    status, body, kind = request(f"{url}/image/7")
    assert status == 200 and kind == "image/jpeg" and Image.open(io.BytesIO(body)).size[0] <= 160
    status, body, kind = request(f"{url}/")
    assert status == 200 and b"<h1>irlab search</h1>" in body


@pytest.mark.parametrize(("fields", "status", "message"), [
    ({"file": b"this is not an image"}, 415, "not an image"),
    ({"other": b"x"}, 400, "field 'file'"),
    ({"file": b"x" * 60_000}, 413, "larger than"),
])
def test_bad_uploads_get_a_4xx_that_says_why(server, fields, status, message):
    url, _, _ = server
    got, body, kind = request(f"{url}/search", *multipart(fields))
    assert got == status and kind == "application/json" and message in json.loads(body)["error"]


def test_only_index_rows_are_ever_read(server):
    url, index, _ = server
    for path in ("/image/../../etc/passwd", "/image/%2e%2e%2fetc%2fpasswd", f"/image/{len(index.rows)}", "/etc/passwd"):
        status, body, _ = request(url + path)
        assert status == 404 and "error" in json.loads(body)
    status, body, _ = request(f"{url}/search", b"plain", "text/plain")
    assert status == 400


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_the_page_shows_a_querys_neighbours_in_a_real_browser(server):
    url, _, _ = server
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                           "--dump-dom", f"{url}/?row=3"], capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    assert "<h1>irlab search</h1>" in dom, proc.stderr[-2000:]
    assert dom.count('class="hit"') == 5  # top_k neighbours drawn by the page's script
    assert 'src="/image/3"' in dom and "cosine similarity" in dom
