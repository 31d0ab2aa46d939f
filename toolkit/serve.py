"""`capkit serve`: the installed packs behind an HTTP API and a web page, on one machine.

    captioner = Captioner(packs_dir, ["all"], feature_cache=False).load()
    app = create_app(captioner, ServeConfig(max_upload_mb=10))
    serve(app, ServeConfig(port=8000))          # until Ctrl-C or SIGTERM

The API (`/v1`, described at `/openapi.json`):

- `POST /v1/captions`: multipart; field `image` (repeat it), `lang` (repeat
  it, or `all`; default every served pack), `beam`, `length_penalty`,
  `no_repeat_ngram`, `attention` (heat maps for attention packs). Answers
  `{"results": [{"image", "captions": {lang: {"text", "pack_version"}}, "seconds"}]}`
  in upload order; the text is what `capkit caption` prints for the same file.
- `GET /v1/packs`, `GET /healthz`; the page at `/` (`toolkit.serve_page`).

Every error is a 4xx (or 503 when busy) with `{"error": "<one line>"}`; no
answer holds a traceback, and no request names a file the server opens.

Throughput: every request goes through one `BatchWorker`, the one thread that
owns the `Captioner`. It takes the first waiting request, waits a few
milliseconds for others, and captions all their images in one
`Captioner.caption` call: one encoder pass and one search per pack, so many
clients cost about what one `capkit caption` of all their images costs.
Uploads' features stay in memory for that call only, never in the packs
dir's cache (`feature_cache=False`).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (`Request`) at runtime.

import asyncio
import math
import queue
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import astuple, dataclass, field
from typing import Sequence

from toolkit.config import SEARCH, SearchConfig
from toolkit.errors import CapkitError
from toolkit.images import ImageBytes

API_VERSION = "v1"
MAX_BEAM = 16              # beam widths above this cost far more than they give; refused
MAX_NO_REPEAT_NGRAM = 16
MAX_LENGTH_PENALTY = 10.0
FORM_FIELDS = ("image", "lang", "beam", "length_penalty", "no_repeat_ngram", "attention")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"          # the address to bind; 127.0.0.1 keeps the server on this machine
    port: int = 8000                 # 0: any free port (the one chosen is printed)
    max_upload_mb: float = 20.0      # most bytes in one request body; more is a 413
    max_images: int = 16             # most images in one request
    max_pixels: int = 50_000_000     # most pixels in one image (decompression bombs); a phone photo is 12M
    batch_wait_ms: float = 10.0      # how long the worker waits after a request for others to caption with it
    max_batch_images: int = 64       # most images in one `Captioner.caption` call
    max_queue_images: int = 1024     # images waiting for the worker; beyond, requests are refused (503, busy)
    body_timeout_s: float = 30.0     # a request's body must arrive within this (a client that stops sending: 408)
    max_connections: int = 256       # connections at once; beyond, uvicorn answers 503

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


class RequestError(Exception):
    """A request the server refuses: `status` and the one line of its `{"error": ...}` answer."""

    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


# -- the worker that batches --------------------------------------------------------------


@dataclass
class Job:
    """One request's images, waiting for the worker."""

    images: list[ImageBytes]
    langs: tuple[str, ...]
    search: SearchConfig
    attention: bool = False     # also draw heat maps for the captions of attention packs
    future: Future = field(default_factory=Future)  # -> JobResult, or an exception
    queued: float = field(default_factory=time.perf_counter)


@dataclass
class JobResult:
    images: list            # `captioner.ImageCaptions`, one per image of the job, in its order
    attention: dict         # (index in the job, lang) -> `report_page.AttentionStrip`
    wait_seconds: float     # from submission until its batch started
    batch_seconds: float    # the batch's captioning (all its jobs together)
    batch_images: int       # images in that batch, this job's and the others'


class BatchWorker:
    """The one thread that captions: requests that arrive together become one `Captioner.caption` call.

    `submit(job)` returns at once; `job.future` resolves when its batch is
    done. The worker takes the first waiting job, then whatever else arrives
    within `wait_s` (and whatever queued while it was busy), up to
    `max_images`, and captions each group of jobs that share languages and
    search settings in one call. `stop()` finishes what is queued, then ends.
    """

    def __init__(self, captioner, *, wait_s: float = 0.01, max_images: int = 64, max_queue_images: int = 1024,
                 max_pixels: int | None = None):
        self.captioner = captioner
        self.wait_s = wait_s
        self.max_images = max_images
        self.max_queue_images = max_queue_images
        self.max_pixels = max_pixels
        self._queue: queue.Queue = queue.Queue()
        self._queued_images = 0
        self._count_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.batches = 0            # `Captioner.caption` calls made
        self.images_done = 0        # images captioned or refused

    def start(self) -> "BatchWorker":
        self._thread = threading.Thread(target=self._run, name="capkit-caption-worker", daemon=True)
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, job: Job) -> Future:
        with self._count_lock:
            if self._stopping:
                raise RequestError(503, "the server is shutting down")
            if self._queued_images + len(job.images) > self.max_queue_images:
                raise RequestError(503, f"busy: {self._queued_images} images are waiting; try again in a moment")
            self._queued_images += len(job.images)
        self._queue.put(job)
        return job.future

    def stop(self, timeout: float | None = None) -> None:
        with self._count_lock:
            self._stopping = True
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        carry: Job | None = None
        while True:
            first = carry or self._queue.get()
            carry = None
            if first is None:
                return
            jobs, n = [first], len(first.images)
            deadline = time.perf_counter() + self.wait_s
            stop = False
            while n < self.max_images:
                try:
                    left = deadline - time.perf_counter()
                    job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                if n + len(job.images) > self.max_images:
                    carry = job
                    break
                jobs.append(job)
                n += len(job.images)
            try:
                self._caption(jobs)
            except BaseException as e:  # never leave a request waiting on a worker that is gone
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e if isinstance(e, Exception) else RuntimeError("worker stopped"))
                if not isinstance(e, Exception):
                    raise
            if stop:
                self._drain()
                return

    def _drain(self) -> None:
        """Caption whatever was queued behind the stop (requests accepted before it)."""
        rest = []
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                rest.append(job)
        if rest:
            self._caption(rest)

    def _caption(self, jobs: list[Job]) -> None:
        # A request whose client went away is cancelled: dropped here, and no longer cancellable after.
        gone = [job for job in jobs if not job.future.set_running_or_notify_cancel()]
        if gone:
            with self._count_lock:
                self._queued_images -= sum(len(job.images) for job in gone)
            jobs = [job for job in jobs if job not in gone]
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault((job.langs, astuple(job.search)), []).append(job)
        for (langs, _), group in groups.items():
            search = group[0].search
            start = time.perf_counter()
            try:
                images = [im for job in group for im in job.images]
                kw = {"max_pixels": self.max_pixels} if self.max_pixels else {}
                batch = self.captioner.caption(images, list(langs), search, **kw)
                want = [(job, i) for job in group if job.attention for i in range(len(job.images))]
                strips = self._attention(group, batch.images) if want else {}
                seconds = time.perf_counter() - start
                self.batches += 1
                at = 0
                for job in group:
                    k = len(job.images)
                    mine = {(i - at, lang): s for (i, lang), s in strips.items() if at <= i < at + k and job.attention}
                    job.future.set_result(JobResult(batch.images[at : at + k], mine, start - job.queued, seconds, len(images)))
                    at += k
            except Exception as e:  # a bug or a broken pack: each request gets a 500 (logged there), the worker goes on
                for job in group:
                    if not job.future.done():
                        job.future.set_exception(e)
            finally:
                self.captioner.forget_features()
                with self._count_lock:
                    self._queued_images -= sum(len(job.images) for job in group)
                self.images_done += sum(len(job.images) for job in group)

    def _attention(self, group: list[Job], results) -> dict:
        """(index in the batch, lang) -> heat maps, for the images of jobs that asked, in attention packs."""
        from toolkit.images import ImageError
        from toolkit.report import _attention_maps, _small_rgb, attention_strip

        flat = [(im, job) for job in group for im in job.images]
        shown = [(im, res.image, {}, {lang: c.ids for lang, c in res.captions.items()})
                 for (im, job), res in zip(flat, results) if job.attention and res.error is None]
        if not shown:
            return {}
        langs = list(dict.fromkeys(lang for *_, ids in shown for lang in ids))
        maps = _attention_maps(shown, langs, self.captioner, _quiet)
        index = {id(im): i for i, (im, _) in enumerate(flat)}
        out = {}
        for im, *_ in shown:
            try:
                small = None
                for lang in langs:
                    if (im, lang) in maps:
                        if small is None:
                            small = _small_rgb(im, 256, self.max_pixels)
                        out[index[id(im)], lang] = attention_strip(small, *maps[im, lang])
            except ImageError:
                continue
        return out


def _quiet(kind: str, **fields) -> None:
    """A `Report` that keeps nothing: the server has no progress bar."""


# -- the HTTP app ----------------------------------------------------------------------------


def _parse_int(name: str, value: str, low: int, high: int) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise RequestError(400, f"{name} must be an integer from {low} to {high}, not {value!r:.40}") from None
    if not low <= v <= high:
        raise RequestError(400, f"{name} must be an integer from {low} to {high}, not {v}")
    return v


def _parse_float(name: str, value: str, low: float, high: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise RequestError(400, f"{name} must be a number from {low:g} to {high:g}, not {value!r:.40}") from None
    if not (math.isfinite(v) and low <= v <= high):
        raise RequestError(400, f"{name} must be a number from {low:g} to {high:g}, not {value!r:.40}")
    return v


def parse_langs(values: Sequence[str], served: Sequence[str]) -> tuple[str, ...]:
    """The languages a request asks for: each value one code, a comma-separated list, or `all`; none: all."""
    asked = [code.strip() for v in values for code in str(v).split(",") if code.strip()]
    if not asked or "all" in asked:
        return tuple(served)
    unknown = [code for code in asked if code not in served]
    if unknown:
        raise RequestError(400, f"no {unknown[0][:20]!r} pack is served here (served: {', '.join(served)}, or all)")
    return tuple(dict.fromkeys(asked))


def pack_summary(lang: str, manifest: dict) -> dict:
    """What `GET /v1/packs` says of one pack: language, version, decoder, its manifest's scores."""
    from toolkit.pack import architecture
    from toolkit.report_page import text_dir

    scores = {}
    for split, systems in (manifest.get("scores") or {}).items():
        model = systems.get("model", {})
        scores[split] = {k: model[k] for k in ("bleu1", "bleu2", "bleu3", "bleu4", "cider_d", "n_images", "beam",
                                               "length_penalty", "no_repeat_ngram", "signature") if k in model}
    return {"lang": lang, "name": manifest.get("name"), "version": manifest["pack_version"],
            "decoder": architecture(manifest), "encoder": manifest["encoder"]["id"], "direction": text_dir(lang),
            "scores": scores}


class _BodyTooLarge(Exception):
    pass


class _BodyTimeout(Exception):
    pass


class _BodyLimit:
    """ASGI middleware: a body over `max_bytes` is a 413 (refused from its Content-Length before a byte is
    read, else as soon as it passes the limit); a body that does not arrive within `timeout_s` is a 408."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            return await _send_json(send, 400, "the Content-Length header is not a number")
        if length is not None and int(length) > self.max_bytes:
            if headers.get(b"expect", b"").lower() != b"100-continue":  # else the client waits, having sent nothing
                await _drain(receive)
            return await _send_json(send, 413, too_large_message(self.max_bytes))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        state = {"received": 0, "done": False}

        async def limited_receive():
            if state["done"]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.001))
            except asyncio.TimeoutError:
                raise _BodyTimeout() from None
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    if message.get("more_body", False):
                        await _drain(receive)
                    state["done"] = True
                    raise _BodyTooLarge()
                state["done"] = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)


DRAIN_SECONDS = 2.0       # how long a refused upload is read on, and dropped, before the answer
DRAIN_BYTES = 64 * 2**20  # and at most this much of it


async def _drain(receive) -> None:
    """Read and drop what a refused upload still sends (for a while, up to a size): closing a connection
    with unread data resets it, and the client would lose the answer it has not read yet."""
    loop = asyncio.get_running_loop()
    end, n = loop.time() + DRAIN_SECONDS, 0
    while n < DRAIN_BYTES:
        try:
            message = await asyncio.wait_for(receive(), max(end - loop.time(), 0.001))
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request":
            return
        n += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def too_large_message(max_bytes: int) -> str:
    return f"the upload is over the limit of {max_bytes / 2**20:g} MB; send fewer or smaller images (--max-upload-mb)"


async def _send_json(send, status: int, message: str) -> None:
    """An error answer sent before the app sees the request, closing the connection after it."""
    import json

    data = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


_CAPTIONS_OPENAPI = {
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["image"],
        "properties": {
            "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": "One or several images (repeat the field)."},
            "lang": {"type": "array", "items": {"type": "string"},
                     "description": "Pack languages (repeat the field), or all; default: every served pack."},
            "beam": {"type": "integer", "minimum": 1, "maximum": MAX_BEAM, "default": SEARCH.beam},
            "length_penalty": {"type": "number", "minimum": 0, "maximum": MAX_LENGTH_PENALTY,
                               "default": SEARCH.length_penalty},
            "no_repeat_ngram": {"type": "integer", "minimum": 0, "maximum": MAX_NO_REPEAT_NGRAM,
                                "default": SEARCH.no_repeat_ngram},
            "attention": {"type": "boolean", "default": False,
                          "description": "Also answer, for attention packs, a heat map per token (JPEG data URIs)."},
        }}}}},
    "responses": {
        "200": {"description": "Captions per image, in upload order",
                "content": {"application/json": {"example": {"results": [{
                    "image": "dog.jpg", "seconds": 0.41,
                    "captions": {"en": {"text": "A dog runs on the grass.", "pack_version": "1.0.0"}}}]}}}},
        "4XX": {"description": "What is wrong with the request", "content": {"application/json": {"example": {
            "error": "no 'fr' pack is served here (served: en, zh, or all)"}}}},
    },
}


def create_app(captioner, config: ServeConfig = ServeConfig()):
    """The FastAPI app serving `captioner`'s packs (loaded already, or on the first request)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from toolkit import __version__
    from toolkit import serve_page

    worker = BatchWorker(captioner, wait_s=config.batch_wait_ms / 1000, max_images=config.max_batch_images,
                         max_queue_images=config.max_queue_images, max_pixels=config.max_pixels)
    served = list(captioner.langs)
    packs = [pack_summary(lang, captioner.manifests[lang]) for lang in served]

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            # Uvicorn has answered every request in flight by now; the worker finishes what is queued.
            await asyncio.get_running_loop().run_in_executor(None, worker.stop)

    app = FastAPI(title="capkit", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Captions in the languages of the installed capkit packs.")
    app.state.worker = worker
    app.add_middleware(_BodyLimit, max_bytes=config.max_upload_bytes, timeout_s=config.body_timeout_s)

    def error(status: int, message: str, **extra) -> JSONResponse:
        headers = {"Retry-After": "1"} if status == 503 else None
        return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)

    @app.exception_handler(RequestError)
    async def _request_error(request, e: RequestError):
        return error(e.status, e.message, **e.extra)

    @app.exception_handler(_BodyTooLarge)
    async def _too_large(request, e):
        return error(413, too_large_message(config.max_upload_bytes))

    @app.exception_handler(_BodyTimeout)
    async def _timeout(request, e):
        return error(408, f"the request's body did not arrive within {config.body_timeout_s:g} s")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        if e.status_code == 404:
            return error(404, f"no such page: {request.url.path[:100]} (the API is under /{API_VERSION}; see /openapi.json)")
        if e.status_code == 405:
            return error(405, f"{request.method} is not allowed on {request.url.path[:100]}")
        return error(e.status_code, str(e.detail)[:300])

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e):
        return error(400, "invalid request: " + "; ".join(str(x.get("msg")) for x in e.errors())[:300])

    @app.exception_handler(Exception)
    async def _bug(request, e):
        return error(500, "internal error while captioning; the server's log says more")

    secure = {
        "Content-Security-Policy": serve_page.CSP,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(serve_page.PAGE_HTML, headers=secure)

    @app.get("/static/app.js", include_in_schema=False)
    async def script():
        return Response(serve_page.APP_JS, media_type="text/javascript", headers=secure)

    @app.get("/static/app.css", include_in_schema=False)
    async def style():
        return Response(serve_page.APP_CSS, media_type="text/css", headers=secure)

    @app.get("/healthz", summary="200 once the packs are loaded and the worker runs")
    async def healthz():
        if not worker.alive:
            return error(503, "the caption worker is not running")
        return {"status": "ok", "packs": served, "batches": worker.batches, "images": worker.images_done}

    @app.get(f"/{API_VERSION}/packs", summary="The packs served: language, version, decoder, scores")
    async def list_packs():
        return {"packs": packs}

    @app.post(f"/{API_VERSION}/captions", summary="Caption uploaded images in one or more languages",
              openapi_extra=_CAPTIONS_OPENAPI)
    async def captions(request: Request):
        t0 = time.perf_counter()
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            raise RequestError(415, "send multipart/form-data, the images in field 'image' "
                               "(curl -F image=@photo.jpg -F lang=en ...)")
        try:
            form = await request.form(max_files=config.max_images, max_fields=64, max_part_size=64 * 1024)
        except (_BodyTooLarge, _BodyTimeout):
            raise
        except StarletteHTTPException as e:
            detail = str(e.detail)
            if "Too many files" in detail:
                raise RequestError(400, f"too many images: at most {config.max_images} in one request") from None
            raise RequestError(400, f"malformed multipart body ({detail[:200]})") from None
        except Exception as e:  # the multipart parser's own errors
            raise RequestError(400, f"malformed multipart body ({str(e)[:200] or type(e).__name__})") from None
        try:
            unknown = sorted({k for k in form.keys() if k not in FORM_FIELDS})
            if unknown:
                raise RequestError(400, f"unknown field {unknown[0][:40]!r}; the fields are {', '.join(FORM_FIELDS)}")
            uploads = form.getlist("image")
            if not uploads:
                raise RequestError(400, "no image: send the files in field 'image' (repeat it for several)")
            if len(uploads) > config.max_images:
                raise RequestError(400, f"too many images: at most {config.max_images} in one request")
            images = []
            for i, up in enumerate(uploads):
                if not isinstance(up, UploadFile):
                    raise RequestError(400, f"field 'image' number {i + 1} is text, not a file")
                name = (up.filename or "").strip()[:200] or f"image {i + 1}"
                images.append(ImageBytes(name, await up.read()))
            langs = parse_langs(form.getlist("lang"), served)
            one = {k: form.getlist(k) for k in ("beam", "length_penalty", "no_repeat_ngram", "attention")}
            for k, v in one.items():
                if len(v) > 1:
                    raise RequestError(400, f"field {k!r} given {len(v)} times; give it once")
                if v and not isinstance(v[0], str):
                    raise RequestError(400, f"field {k!r} is a file, not a value")
            search = SearchConfig(
                beam=_parse_int("beam", one["beam"][0], 1, MAX_BEAM) if one["beam"] else SEARCH.beam,
                length_penalty=_parse_float("length_penalty", one["length_penalty"][0], 0.0, MAX_LENGTH_PENALTY)
                if one["length_penalty"] else SEARCH.length_penalty,
                no_repeat_ngram=_parse_int("no_repeat_ngram", one["no_repeat_ngram"][0], 0, MAX_NO_REPEAT_NGRAM)
                if one["no_repeat_ngram"] else SEARCH.no_repeat_ngram,
            )
            attention = False
            if one["attention"]:
                flag = one["attention"][0].strip().lower()
                if flag not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise RequestError(400, f"attention must be true or false, not {flag[:20]!r}")
                attention = flag in ("true", "1", "yes", "on")
        finally:
            await form.close()
        job = Job(images, langs, search, attention)
        result: JobResult = await asyncio.wrap_future(worker.submit(job))
        failed = [{"image": im.image, "error": im.error} for im in result.images if im.error is not None]
        if failed:
            raise RequestError(422, "; ".join(f["error"] for f in failed)[:500], failed=failed)
        total = time.perf_counter() - t0
        results = []
        for i, im in enumerate(result.images):
            caps = {}
            for lang, c in im.captions.items():
                caps[lang] = {"text": c.text, "pack_version": c.pack_version}
                strip = result.attention.get((i, lang))
                if strip is not None:
                    caps[lang]["attention"] = {
                        "grid": strip.grid, "n_tokens": strip.n_tokens,
                        "tokens": [{"token": t.token, "image": t.image.data_uri, "peak": round(t.peak, 4)}
                                   for t in strip.tokens]}
            results.append({"image": im.image, "captions": caps, "seconds": round(total, 4)})
        return {"results": results, "timing": {
            "seconds": round(total, 4), "queued": round(result.wait_seconds, 4),
            "batch": round(result.batch_seconds, 4), "batch_images": result.batch_images}}

    return app


# -- running it ----------------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host:port` (port 0: any free one); a port in use is a `CapkitError`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise CapkitError(f"cannot listen on {host}:{port} ({e.strerror or e})",
                          hint="pick another port with --port, or stop what is using it") from None
    sock.listen(512)
    sock.set_inheritable(True)
    return sock


def server(app, sock: socket.socket, config: ServeConfig = ServeConfig(), log_level: str = "warning"):
    """A uvicorn `Server` for `app` on the bound `sock`; `.run(sockets=[sock])` serves until SIGINT/SIGTERM,
    which stop it after answering the requests in flight."""
    import uvicorn

    cfg = uvicorn.Config(app, log_level=log_level, access_log=False, limit_concurrency=config.max_connections,
                         timeout_keep_alive=5, timeout_graceful_shutdown=max(30, int(config.body_timeout_s) + 5),
                         h11_max_incomplete_event_size=64 * 1024)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            # A stop asked for is a clean end: uvicorn would raise the signal again once it has
            # shut down, which makes Ctrl-C a KeyboardInterrupt and SIGTERM a kill.
            getattr(self, "_captured_signals", []).clear()

    return Server(cfg)


def address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = "127.0.0.1" if host == "0.0.0.0" else (f"[{host}]" if ":" in host else host)
    return f"http://{shown}:{port}/"
