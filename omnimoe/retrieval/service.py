"""The retrieval HTTP service (FastAPI + uvicorn): ``omnimoe serve``.

Routes (OpenAPI docs at ``/docs``):

* ``GET  /``                     a small search page (type a caption or drop an image / audio file);
* ``GET  /health``               status, modalities, directions and items per modality;
* ``POST /search``               JSON ``{"text": "...", "target": "image", "k": 5}`` (or ``"queries": [...]`` for a
                                 batch), or multipart: ``file`` (image / audio upload) + ``target`` [+ ``k``, ``source``];
* ``GET  /items/{id}``           a stored item: id, caption, category, media fields;
* ``GET  /media/{field}/{id}``   the file behind a stored item's media field (image / audio / sound);
* ``GET  /thumbs/{id}``          a PNG thumbnail of a stored item's image.

Only stored items are ever served: a request names an id and a field, never a path. Uploads are bounded
(``max_upload_bytes``, checked on the raw body before any parsing) and limited to image and audio types;
bad input gets a 4xx with a message naming the problem.

Every request is logged (logger ``omnimoe.service``: method, path, status, milliseconds), and every 5xx with
its traceback. ``/docs`` works offline: the Swagger UI files are served from the installed
``swagger-ui-bundle`` package, not from a CDN.
"""

from __future__ import annotations

import io
import json
import logging
import mimetypes
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from omnimoe.retrieval.retriever import Batcher, QueryError, Retriever

LOG = logging.getLogger("omnimoe.service")
DOCS_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}
IMAGE_TYPES = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "image/bmp": ".bmp",
}
AUDIO_TYPES = {
    "audio/wav": ".wav",
    "audio/x-wav": ".wav",
    "audio/wave": ".wav",
    "audio/ogg": ".ogg",
    "audio/mpeg": ".mp3",
    "audio/flac": ".flac",
    "audio/x-flac": ".flac",
    "audio/webm": ".webm",
    "audio/mp4": ".m4a",
}


@dataclass
class ServiceConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_bytes: int = 10 * 2**20
    max_k: int = 100
    max_batch: int = 64
    max_text_chars: int = 2000
    warm: bool = True  # build every index and load every encoder before accepting requests
    coalesce: bool = True  # run concurrent queries of one direction as one batch (retriever.Batcher)
    allowed_types: dict[str, str] = field(default_factory=lambda: {**IMAGE_TYPES, **AUDIO_TYPES})


class _TooLarge(Exception):
    """Raised inside the app's receive() once the body passes the limit; caught by :class:`_BodyLimit`."""


class _BodyLimit:
    """ASGI wrapper: answer 413 when a request body exceeds ``limit`` bytes, by its Content-Length or, for a
    chunked body, as soon as the bytes received pass the limit (nothing of the body is parsed before)."""

    def __init__(self, app: Any, limit: int, slack: int = 0) -> None:
        self.app, self.limit, self.max = app, limit, limit + slack

    async def _reject(self, send: Any) -> None:
        body = json.dumps({"detail": f"request body larger than the upload limit of {self.limit} bytes"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max:
            return await self._reject(send)
        seen, started = 0, False

        async def limited_receive() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max:
                    raise _TooLarge
            return message

        async def tracking_send(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send)


def _too_large(exc: BaseException | None, depth: int = 0) -> bool:
    """Whether ``exc`` is, or was caused by, the body limit's :class:`_TooLarge` (Starlette re-raises it
    wrapped: as the cause of another exception, or inside an exception group)."""
    if exc is None or depth > 8:
        return False
    if isinstance(exc, _TooLarge):
        return True
    inner = list(getattr(exc, "exceptions", ())) + [exc.__cause__, exc.__context__]
    return any(_too_large(e, depth + 1) for e in inner)


def _page() -> str:
    return resources.files("omnimoe.retrieval").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(retriever: Retriever, cfg: ServiceConfig | None = None) -> Any:
    """The FastAPI application (without the body limit: :func:`asgi_app` adds it)."""
    cfg = cfg or ServiceConfig()
    batcher = Batcher(retriever, max_items=cfg.max_batch) if cfg.coalesce else None
    app = FastAPI(
        title="omnimoe retrieval",
        version="1",
        description="Cross-modal search through an Alt-MoE connector over pre-stored latents.",
        docs_url=None,
        redoc_url=None,
    )  # /docs below, from local files

    @app.middleware("http")
    async def log_requests(request: Request, call_next: Any) -> Any:
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as exc:
            if _too_large(exc):  # a chunked body passed the limit while the route read it (see _BodyLimit)
                LOG.info(
                    "%s %s -> 413 in %.1f ms", request.method, request.url.path, (time.perf_counter() - start) * 1e3
                )
                return JSONResponse(
                    {"detail": f"request body larger than the upload limit of {cfg.max_upload_bytes} bytes"},
                    status_code=413,
                )
            # an unexpected failure: its traceback goes to the log, the client gets a plain 500
            LOG.exception(
                "%s %s -> 500 after %.1f ms", request.method, request.url.path, (time.perf_counter() - start) * 1e3
            )
            return JSONResponse({"detail": "internal error (the service log has the traceback)"}, status_code=500)
        LOG.info(
            "%s %s -> %d in %.1f ms",
            request.method,
            request.url.path,
            response.status_code,
            (time.perf_counter() - start) * 1e3,
        )
        return response

    @app.get("/docs", include_in_schema=False)
    def docs() -> Any:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="omnimoe retrieval: API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )

    @app.get("/docs-assets/{name}", include_in_schema=False)
    def docs_assets(name: str) -> Any:
        if name not in DOCS_ASSETS:
            raise bad(404, f"no docs asset {name!r}")
        from swagger_ui_bundle import swagger_ui_path

        return FileResponse(
            Path(str(swagger_ui_path)) / name, media_type=DOCS_ASSETS[name], headers={"Cache-Control": "max-age=86400"}
        )

    def bad(status: int, message: str) -> HTTPException:
        return HTTPException(status_code=status, detail=message)

    def hit_json(h: Any) -> dict[str, Any]:
        item = retriever.item(h.id) or {"id": h.id}
        out = {"rank": h.rank, "score": round(h.score, 6), **item, "url": f"/items/{h.id}"}
        out["media_urls"] = {f: f"/media/{f}/{h.id}" for f in item.get("media", [])}
        if "image" in item.get("media", []):
            out["thumbnail"] = f"/thumbs/{h.id}"
        return out

    def check_k(k: Any) -> int:
        """A JSON integer, or a form field of digits; 2.5, true, "2.0" and "1e3" are refused, not rounded."""
        if isinstance(k, str) and k.strip().lstrip("+-").isdigit():
            k = int(k)
        if isinstance(k, bool) or not isinstance(k, int):
            raise bad(422, f"k must be an integer, got {k!r}")
        if not 1 <= k <= cfg.max_k:
            raise bad(422, f"k must be between 1 and {cfg.max_k}, got {k}")
        return k

    def run_search(kind: str, items: list[Any], target: Any, k: int, source: Any) -> dict[str, Any]:
        if not isinstance(target, str) or not target:
            raise bad(422, "target is required: the modality to search, one of " + ", ".join(retriever.modalities))
        if source is not None and not isinstance(source, str):
            raise bad(422, "source must be a modality name")
        try:
            src = retriever.source_for(kind, target, source or None)
            start = time.perf_counter()
            hits = batcher.submit(src, target, items, k) if batcher else retriever.search(src, target, items, k)
            ms = (time.perf_counter() - start) * 1e3
        except QueryError as exc:
            raise bad(400, str(exc)) from None
        return {
            "direction": f"{src}->{target}",
            "source": src,
            "target": target,
            "k": k,
            "took_ms": round(ms, 3),
            "batch": [[hit_json(h) for h in row] for row in hits],
        }

    search_body = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["target"],
                        "properties": {
                            "text": {"type": "string", "description": "one text query"},
                            "queries": {
                                "type": "array",
                                "items": {"type": "string"},
                                "description": "a batch of text queries",
                            },
                            "target": {"type": "string"},
                            "k": {"type": "integer", "default": 5},
                            "source": {
                                "type": "string",
                                "description": "query modality (default: the run's text modality)",
                            },
                        },
                    }
                },
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file", "target"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "target": {"type": "string"},
                            "k": {"type": "integer", "default": 5},
                            "source": {"type": "string"},
                        },
                    }
                },
            },
        }
    }

    @app.post("/search", openapi_extra=search_body, summary="Search stored items with a text, image or audio query")
    async def search(request: Request) -> dict[str, Any]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise bad(400, f"request body is not valid JSON ({exc})") from None
            if not isinstance(body, dict):
                raise bad(422, "the JSON body must be an object")
            single = "text" in body
            if single == ("queries" in body):
                raise bad(422, "give exactly one of 'text' (a string) or 'queries' (a list of strings)")
            texts = [body["text"]] if single else body["queries"]
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
                raise bad(422, "'text' must be a string and 'queries' a non-empty list of strings")
            if len(texts) > cfg.max_batch:
                raise bad(422, f"at most {cfg.max_batch} queries per request, got {len(texts)}")
            for n, t in enumerate(texts):
                if not t.strip():
                    raise bad(400, "empty text query" + ("" if single else f" (query {n})"))
                if len(t) > cfg.max_text_chars:
                    raise bad(422, f"text query longer than {cfg.max_text_chars} characters")
            out = await run_in_threadpool(
                run_search, "text", texts, body.get("target"), check_k(body.get("k", 5)), body.get("source")
            )
            if single:
                out["results"] = out.pop("batch")[0]
            return out
        if ctype == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=8)
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise bad(422, "multipart search needs a 'file' part (an image or audio file)")
            utype = (upload.content_type or "").split(";")[0].strip().lower()
            if utype == "application/octet-stream" or not utype:
                utype = mimetypes.guess_type(upload.filename or "")[0] or utype
            if utype not in cfg.allowed_types:
                raise bad(
                    415, f"file type {utype or 'unknown'!r} is not accepted; send one of {sorted(cfg.allowed_types)}"
                )
            data = await upload.read()
            if len(data) > cfg.max_upload_bytes:
                raise bad(
                    413,
                    f"uploaded file {upload.filename!r} is larger than the upload limit of {cfg.max_upload_bytes} bytes",
                )
            if not data:
                raise bad(400, f"uploaded file {upload.filename!r} is empty")
            kind = "image" if utype in IMAGE_TYPES else "audio"
            with tempfile.TemporaryDirectory(prefix="omnimoe-upload-") as tmp:
                path = Path(tmp) / f"upload{cfg.allowed_types[utype]}"
                path.write_bytes(data)
                try:
                    out = await run_in_threadpool(
                        run_search, kind, [str(path)], form.get("target"), check_k(form.get("k", 5)), form.get("source")
                    )
                except HTTPException as exc:  # name the upload, not our temporary copy
                    exc.detail = str(exc.detail).replace(str(path), f"uploaded file {upload.filename!r}")
                    raise
            out["results"] = out.pop("batch")[0]
            out["query"] = {"file": upload.filename, "type": utype, "bytes": len(data)}
            return out
        raise bad(
            415, f"send application/json (text) or multipart/form-data (file), not {ctype or 'no content type'!r}"
        )

    @app.get("/health", summary="Status, modalities, directions, items")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "method": retriever.method,
            "head": retriever.head,  # "contrastive", or "contrastive+prior" (fused with the label prior)
            "chosen_on_validation": retriever.chosen,
            "modalities": {m: retriever.encoder_kind(m) for m in retriever.modalities},
            "directions": retriever.directions(),
            "items": {m: len(s) for m, s in retriever.stores.items()},
            "index": retriever.spec.kind,
            "max_upload_bytes": cfg.max_upload_bytes,
            "accepted_types": sorted(cfg.allowed_types),
        }

    @app.get("/items/{item_id:path}", summary="A stored item")
    def item(item_id: str) -> dict[str, Any]:
        found = retriever.item(item_id)
        if found is None:
            raise bad(404, f"no stored item {item_id!r}")
        return {**found, "media_urls": {f: f"/media/{f}/{item_id}" for f in found["media"]}}

    @app.get("/media/{field}/{item_id:path}", summary="The media file of a stored item")
    def media(field: str, item_id: str) -> Any:
        path = retriever.media(item_id, field)
        if path is None:
            raise bad(404, f"no {field!r} media for a stored item {item_id!r}")
        # an SVG is shown as an image, never run as a document
        return FileResponse(
            path,
            headers={
                "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; sandbox",
                "X-Content-Type-Options": "nosniff",
            },
        )

    @lru_cache(maxsize=2048)
    def thumbnail(item_id: str) -> bytes | None:
        from omnimoe.encoders.base import BadInput
        from omnimoe.encoders.media import read_image

        path = retriever.media(item_id, "image")
        if path is None:
            return None
        try:
            img = read_image(path)
        except BadInput:
            return None
        img.thumbnail((192, 192))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        return buf.getvalue()

    @app.get("/thumbs/{item_id:path}", summary="A PNG thumbnail of a stored item's image")
    def thumbs(item_id: str) -> Any:
        data = thumbnail(item_id)
        if data is None:
            raise bad(404, f"no image for a stored item {item_id!r}")
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return _page()

    return app


def asgi_app(retriever: Retriever, cfg: ServiceConfig | None = None) -> Any:
    cfg = cfg or ServiceConfig()
    return _BodyLimit(create_app(retriever, cfg), cfg.max_upload_bytes, slack=64 * 1024)  # slack: the multipart framing


def serve(retriever: Retriever, cfg: ServiceConfig | None = None) -> None:
    """Warm up, bind, print the address (``listening on http://host:port``), serve until interrupted."""
    import uvicorn

    cfg = cfg or ServiceConfig()
    if cfg.warm:
        retriever.build_all()
        for m in retriever.modalities:
            retriever.encoder(m)
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((cfg.host, cfg.port))
    sock.listen(2048)  # connections queue from here on, so the printed address works at once
    port = sock.getsockname()[1]
    if not LOG.handlers:  # one line per request on stderr
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        LOG.addHandler(handler)
        LOG.setLevel(logging.INFO)
    host = f"[{cfg.host}]" if family == socket.AF_INET6 else cfg.host
    print(f"listening on http://{host}:{port}", flush=True)
    server = uvicorn.Server(
        uvicorn.Config(
            asgi_app(retriever, cfg),
            log_level=os.environ.get("OMNIMOE_LOG_LEVEL", "warning"),
            timeout_graceful_shutdown=5,
        )
    )
    server.run(sockets=[sock])
