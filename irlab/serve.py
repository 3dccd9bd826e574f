"""`python serve.py index=<dir> [port=8000]`: a small HTTP service to look at retrieval with a saved index.

* ``GET /`` -- a plain HTML page: pick or drop an image, see it and its neighbours as thumbnails with scores
  (``/?row=<n>`` searches with gallery row n);
* ``POST /search`` -- multipart form field ``file`` (an image; ``top_k`` optional) -> JSON
  ``{"score": ..., "results": [{"rank", "row", "name", "score", "label"}]}``;
* ``GET /image/<row>`` -- a gallery row's image as a JPEG thumbnail: only rows of the index are ever read, so no
  request can reach another file;
* ``GET /healthz`` -- ``{"status": "ok", "rows": N, ...}``.

Bad requests get a 4xx and a JSON ``{"error": ...}`` naming the problem (not an image, larger than
``max_upload_mb``, missing field, unknown row), never a 500. Python's standard library serves it
(``http.server.ThreadingHTTPServer``; multipart read with the ``email`` parser): no web framework to install, and
one model in one process answers requests one at a time (a lock), which is what a look at results needs. It
binds to 127.0.0.1 by default.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from email.parser import BytesParser
from email.policy import HTTP
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import torch
from PIL import Image, UnidentifiedImageError

from irlab.query import Search
from irlab.saved_index import SavedIndex

log = logging.getLogger(__name__)
THUMBNAIL = 160
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>irlab search</title>
<style>
body { font-family: sans-serif; margin: 2em; }
#drop { border: 2px dashed #888; padding: 2em; text-align: center; margin-bottom: 1em; }
#results { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; width: 170px; font-size: 12px; word-break: break-all; }
figure img { width: 160px; height: 160px; object-fit: contain; background: #eee; }
#error { color: #b00; }
</style></head>
<body>
<h1>irlab search</h1>
<p id="about">__ABOUT__</p>
<div id="drop">Drop an image here, or <input type="file" id="file" accept="image/*"></div>
<p id="error"></p>
<div id="query"></div>
<div id="results"></div>
<script>
async function search(file) {
  const error = document.getElementById("error");
  error.textContent = "";
  document.getElementById("query").innerHTML =
    '<figure><img id="query-image" src="' + URL.createObjectURL(file) + '"><figcaption>query</figcaption></figure>';
  const form = new FormData();
  form.append("file", file);
  const response = await fetch("/search", { method: "POST", body: form });
  const body = await response.json();
  const results = document.getElementById("results");
  results.innerHTML = "";
  if (!response.ok) { error.textContent = body.error; return; }
  for (const hit of body.results) {
    const figure = document.createElement("figure");
    figure.className = "hit";
    const label = hit.label === null ? "" : " label " + hit.label;
    figure.innerHTML = '<img src="/image/' + hit.row + '"><figcaption>#' + hit.rank + " " + body.score + " " +
      hit.score.toFixed(4) + label + "<br>" + hit.name + "</figcaption>";
    results.appendChild(figure);
  }
}
document.getElementById("file").addEventListener("change", (e) => search(e.target.files[0]));
const drop = document.getElementById("drop");
drop.addEventListener("dragover", (e) => e.preventDefault());
drop.addEventListener("drop", (e) => { e.preventDefault(); search(e.dataTransfer.files[0]); });
// /?row=<n>: search with gallery row n as the query (a link to share, and how the page is tested headless)
const row = new URLSearchParams(window.location.search).get("row");
if (row !== null) {
  fetch("/image/" + row).then((r) => r.blob()).then((blob) => search(new File([blob], "row-" + row + ".jpg")));
}
</script>
</body></html>
"""


class BadRequest(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class SearchService:
    """What the handlers share: the index, the model's search function, the transform and the limits."""

    def __init__(self, index: SavedIndex, search: Search, transform, image_of, score_name: str, top_k: int,
                 max_upload_mb: float) -> None:
        self.index, self.search, self.transform, self.image_of = index, search, transform, image_of
        self.score_name, self.top_k, self.max_upload = score_name, top_k, int(max_upload_mb * 2**20)
        self.lock = threading.Lock()

    def answer(self, image: Image.Image, top_k: int) -> dict:
        with self.lock, torch.no_grad():
            rows, scores = self.search(self.transform(image)[None], top_k)
        results = []
        for rank, (row, score) in enumerate(zip(rows[0], scores[0], strict=True), 1):
            if row < 0:
                continue
            item = self.index.rows[int(row)]
            results.append({"rank": rank, "row": int(row), "name": item.name, "score": float(score),
                            "label": item.label})
        return {"score": self.score_name, "results": results}


def read_upload(handler: BaseHTTPRequestHandler, limit: int) -> tuple[bytes, dict[str, str]]:
    """The ``file`` field of a multipart upload, and the other fields."""
    length = int(handler.headers.get("Content-Length") or 0)
    if length > limit:
        raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"upload of {length} bytes is larger than the "
                         f"{limit // 2**20} MB limit (serve.py max_upload_mb=...)")
    kind = handler.headers.get("Content-Type", "")
    if not kind.startswith("multipart/form-data"):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "POST /search takes multipart/form-data with an image in field 'file'")
    body = handler.rfile.read(length)
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {kind}\r\n\r\n".encode() + body)
    fields, data = {}, None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name == "file":
            data = part.get_payload(decode=True)
        elif name:
            fields[name] = (part.get_payload(decode=True) or b"").decode(errors="replace").strip()
    if not data:
        raise BadRequest(HTTPStatus.BAD_REQUEST, "no image in form field 'file'")
    return data, fields


def handler_for(service: SearchService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args) -> None:  # through logging, not stderr
            log.info("%s - %s", self.address_string(), fmt % args)

        def send(self, status: HTTPStatus, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def send_json(self, status: HTTPStatus, payload: dict) -> None:
            self.send(status, json.dumps(payload).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = urlparse(self.path).path
            try:
                if path == "/":
                    about = (f"{service.index.manifest['model_class']} index of {len(service.index.rows)} images "
                             f"({service.index.folder})")
                    self.send(HTTPStatus.OK, PAGE.replace("__ABOUT__", about).encode(), "text/html; charset=utf-8")
                elif path == "/healthz":
                    self.send_json(HTTPStatus.OK, {"status": "ok", "rows": len(service.index.rows),
                                                   "model_class": service.index.manifest["model_class"]})
                elif path.startswith("/image/"):
                    self.send(HTTPStatus.OK, self.thumbnail(path.removeprefix("/image/")), "image/jpeg")
                else:
                    raise BadRequest(HTTPStatus.NOT_FOUND, f"no page {path}: GET /, /healthz, /image/<row>; "
                                                           f"POST /search")
            except BadRequest as exc:
                self.send_json(exc.status, {"error": str(exc)})

        def thumbnail(self, row: str) -> bytes:
            if not row.isdigit() or int(row) >= len(service.index.rows):
                raise BadRequest(HTTPStatus.NOT_FOUND, f"no gallery row {row!r} (0..{len(service.index.rows) - 1})")
            try:
                image = service.image_of(int(row)).convert("RGB")
            except (OSError, ValueError) as exc:
                raise BadRequest(HTTPStatus.NOT_FOUND, f"gallery row {row} cannot be read any more: {exc}") from exc
            image.thumbnail((THUMBNAIL, THUMBNAIL))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
            return buffer.getvalue()

        def do_POST(self) -> None:  # noqa: N802
            try:
                if urlparse(self.path).path != "/search":
                    raise BadRequest(HTTPStatus.NOT_FOUND, "POST /search is the only POST")
                data, fields = read_upload(self, service.max_upload)
                query = parse_qs(urlparse(self.path).query)
                top_k = fields.get("top_k") or (query.get("top_k") or [str(service.top_k)])[0]
                if not str(top_k).isdigit() or int(top_k) < 1:
                    raise BadRequest(HTTPStatus.BAD_REQUEST, f"top_k must be a positive integer, got {top_k!r}")
                try:
                    with Image.open(io.BytesIO(data)) as opened:
                        image = opened.convert("RGB")
                except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
                    raise BadRequest(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"the upload is not an image that can be "
                                                                        f"read ({type(exc).__name__})") from exc
                self.send_json(HTTPStatus.OK, service.answer(image, int(top_k)))
            except BadRequest as exc:
                self.send_json(exc.status, {"error": str(exc)})

    return Handler


def make_server(service: SearchService, host: str, port: int) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((host, port), handler_for(service))


def serve_index(cfg, datamodule, load) -> None:
    """Load the index and its model, then serve until interrupted."""
    from irlab.gallery import item_image

    index = SavedIndex.load(cfg.index)
    model, ckpt = load(cfg, datamodule)
    index.check(ckpt, datamodule)
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    service = SearchService(index, index.searcher(model), datamodule.eval_transform(),
                            lambda row: item_image(index.rows[row], datamodule), model.score_name, int(cfg.top_k),
                            float(cfg.max_upload_mb))
    server = make_server(service, str(cfg.host), int(cfg.port))
    print(f"serving {index.folder} ({len(index.rows)} images) on http://{cfg.host}:{server.server_port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

