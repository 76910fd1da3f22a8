"""``finetune serve RUN``: an exported model behind HTTP (FastAPI on uvicorn), with a web page.

- ``POST /predict``: images as ``multipart/form-data`` files, or JSON
  ``{"images": [BASE64, ...], "names": [...], "top_k": 5, "tta": false}``; ``top_k`` and
  ``tta`` also as query parameters. Each image gets its ``top_k`` classes; a multi-label
  model's also its ``labels``, the tags over their thresholds. Each image is decoded and
  preprocessed exactly as ``finetune predict`` does it (:meth:`Predictor.views`), and
  concurrent requests share model calls (:class:`~finetune.batching.Batcher`).
- ``GET /health``, ``GET /metadata`` (classes, preprocessing, test metrics, the model card),
  ``GET /openapi.json``, and ``GET /``: a page to drop images on (no external resources).
- Limits: the request body (413), an image's pixels (413, before it is decoded: decompression
  bombs), images per request (413); an undecodable image is a 400 naming it, another content
  type a 415, an unknown route a 404; every error is JSON ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import os
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from finetune.batching import Batcher
from finetune.data.images import open_image
from finetune.errors import DataError, FinetuneError
from finetune.inference import Predictor, load, probability_pairs, tags_over, top_classes
from finetune.serve_limits import BodyLimit, Limits, error_response

PAGE = Path(__file__).with_name("web") / "index.html"
SETTINGS_ENV = "FINETUNE_SERVE"  # how uvicorn's worker processes get the settings
METRICS = ("test_acc", "test_top5_acc", "test_balanced_acc", "test_macro_f1", "test_ece",
           "test_loss", "test_map", "test_f1_micro", "test_f1_macro")


@dataclass
class Settings:
    run: str
    device: str = "cpu"
    max_batch: int = 32  # images per model call; 1: no dynamic batching
    batch_wait_ms: float = 5.0  # how long the first request waits for others
    limits: Limits = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.limits is None:
            self.limits = Limits()
        elif isinstance(self.limits, dict):
            self.limits = Limits(**self.limits)


def metadata(predictor: Predictor, run: Path) -> dict:
    """What ``GET /metadata`` answers: the model, its preprocessing, test metrics, its card."""
    from finetune.runs import read_metrics

    meta = predictor.meta
    keys = ("architecture", "num_classes", "in_chans", "image_size", "mean", "std", "crop_pct",
            "interpolation", "resize", "recipe", "pretrained", "augment", "train_images",
            "test_images", "task", "thresholds")
    folder = run if run.is_dir() else run.parent
    try:
        record = read_metrics(folder)[-1] if (folder / "metrics.jsonl").is_file() else {}
    except FinetuneError:  # a damaged metrics.jsonl: the model still serves
        record = {}
    card = folder / "README.md"
    return {"name": folder.name, "class_names": predictor.class_names,
            **{k: meta[k] for k in keys if k in meta},
            "metrics": {k: record[k] for k in METRICS if k in record},
            "card": card.read_text(encoding="utf-8", errors="replace") if card.is_file()
            else None}


def decode(predictor: Predictor, data: bytes, name: str, max_pixels: int, tta: bool
           ) -> torch.Tensor:
    """One uploaded image as its input views (V, C, S, S), opened as ``finetune predict``
    opens a file; its size checked from the header before any pixel is decoded."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = image.width * image.height
    except Image.DecompressionBombError:  # over twice PIL's own limit: refused by PIL itself
        raise HTTPException(413, f"{name}: over {2 * Image.MAX_IMAGE_PIXELS:,} pixels, which "
                                 f"PIL itself refuses to open (a decompression bomb?); "
                                 f"downscale it") from None
    except (OSError, ValueError):
        pixels = 0  # open_image says why, in its words
    if pixels > max_pixels:
        raise HTTPException(413, f"{name}: {pixels:,} pixels, over this server's limit of "
                                 f"{max_pixels:,} (finetune serve --max-pixels); downscale it")
    need = 0 if predictor.resample != "image" else predictor.need
    try:
        image = open_image(data, predictor.meta["in_chans"], need, name=name,
                           fix="Send a PNG, JPEG, WebP, BMP, GIF or TIFF file.")
    except DataError as e:
        raise HTTPException(400, str(e)) from None
    return predictor.views(image, tta)


async def _uploads(request: Request, limits: Limits) -> tuple[list[bytes], list[str], dict]:
    """The images of a request (bytes), their names and the JSON body's options."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=limits.max_images, max_fields=100,
                                      max_part_size=limits.max_request_bytes)
        except StarletteHTTPException as e:  # starlette's words for its own limits
            raise (_too_many(limits) if "files" in str(e.detail) else e) from None
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if len(files) > limits.max_images:
            raise _too_many(limits)
        if not files and "files" in form:
            raise HTTPException(400, "the part 'files' has no filename, so it is not a file: "
                                     "send images as files (curl -F files=@image.png)")
        options = {k: form[k] for k in ("top_k", "tta") if isinstance(form.get(k), str)}
        return ([await f.read() for f in files],
                [f.filename or f"image {i}" for i, f in enumerate(files)], options)
    if kind == "application/json":
        return _json_images(await request.body(), limits)
    raise HTTPException(415, f"content type {kind or '(none)'!r}: send images as "
                             f"multipart/form-data files or as application/json "
                             f'{{"images": [BASE64, ...]}}')


def _too_many(limits: Limits) -> HTTPException:
    return HTTPException(413, f"more than {limits.max_images} images in one request (finetune "
                              f"serve --max-images); split them over several requests")


def _json_images(body: bytes, limits: Limits) -> tuple[list[bytes], list[str], dict]:
    try:
        doc = json.loads(body)
        images = doc["images"]
        assert isinstance(images, list) and all(isinstance(i, str) for i in images)
    except (ValueError, KeyError, TypeError, AssertionError, RecursionError):
        raise HTTPException(400, 'the JSON body must be {"images": [BASE64, ...]} (optional '
                                 '"names", "top_k", "tta")') from None
    if len(images) > limits.max_images:
        raise _too_many(limits)
    names = doc.get("names") or [f"image {i}" for i in range(len(images))]
    if not (isinstance(names, list) and len(names) == len(images)):
        raise HTTPException(400, '"names" must be a list with one name per image')
    data = []
    for text, name in zip(images, names, strict=True):
        try:  # a data URL ("data:image/png;base64,...") or the bare base64
            data.append(base64.b64decode(text.rpartition(",")[2], validate=True))
        except (binascii.Error, ValueError):
            raise HTTPException(400, f"{name}: not valid base64") from None
    return data, [str(n) for n in names], {k: doc[k] for k in ("top_k", "tta") if k in doc}


def _options(request: Request, body: dict, num_classes: int) -> tuple[int, bool]:
    """``top_k`` and ``tta`` from the body (JSON, or multipart fields), else the query, else 5
    and false."""
    query = request.query_params
    top_k, tta = body.get("top_k", query.get("top_k", 5)), body.get("tta", query.get("tta", False))
    whole = (isinstance(top_k, int) and not isinstance(top_k, bool)  # not 2.5, true, "1e3"
             or isinstance(top_k, str) and top_k.isascii() and top_k.isdigit()
             and len(top_k) < 10)
    if not whole or int(top_k) < 1:
        raise HTTPException(422, f"top_k must be a positive integer, got {repr(top_k)[:20]}")
    if isinstance(tta, str) and tta.lower() in ("true", "false", "1", "0"):
        tta = tta.lower() in ("true", "1")
    if not isinstance(tta, bool):
        raise HTTPException(422, f"tta must be true or false, got {repr(tta)[:20]}")
    return min(int(top_k), num_classes), tta


def create_app(settings: Settings) -> FastAPI:
    """The application: the model loaded once, its batcher running while the app lives."""
    predictor = load(settings.run, device=settings.device)
    # Probabilities: a softmax's (as logs, exact for small ones) or each tag's sigmoid.
    score = predictor.tag_probs if predictor.multilabel else predictor.log_probs
    batcher = Batcher(lambda views: score(views), settings.max_batch,
                      settings.batch_wait_ms / 1000)
    info = metadata(predictor, Path(settings.run))

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        batcher.start()
        yield
        batcher.close()

    app = FastAPI(title=f"finetune: {info['name']}", lifespan=lifespan, docs_url=None,
                  redoc_url=None,  # their pages load scripts from a CDN
                  description="Image classification with a model trained by finetune.")
    app.add_middleware(BodyLimit, max_bytes=settings.limits.max_request_bytes)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.state.batcher = batcher
    _routes(app, predictor, batcher, info, settings.limits)
    return app


def _routes(app: FastAPI, predictor: Predictor, batcher: Batcher, info: dict,
            limits: Limits) -> None:
    # A small PNG may decode to hundreds of MB (6000 x 6000, 16-bit RGBA): as many decodes at
    # once as there are cores to run them, not one per waiting request.
    decoding = asyncio.Semaphore(max(1, min(os.cpu_count() or 1, 8)))

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse,
                   include_in_schema=False)
    def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    # HEAD beside GET, out of the schema: one route with both methods gives OpenAPI one
    # operation id twice (FastAPI warns "Duplicate Operation ID").
    @app.get("/health", summary="the server is up and the model loaded")
    @app.head("/health", include_in_schema=False)
    def health() -> dict:
        return {"status": "ok", "model_calls": batcher.calls}

    @app.get("/metadata", summary="classes, preprocessing, test metrics and the model card")
    @app.head("/metadata", include_in_schema=False)
    def get_metadata() -> dict:
        return info

    @app.post("/predict", summary="top-k classes of one or more images",
              openapi_extra={"requestBody": PREDICT_BODY}, responses=PREDICT_RESPONSES)
    async def predict(request: Request) -> dict:
        try:
            data, names, body = await _uploads(request, limits)
        except ClientDisconnect:  # nobody to answer: no traceback in the log either
            raise HTTPException(400, "the client went away before its request arrived") from None
        if not data:
            raise HTTPException(400, "no images in the request: send one or more files")
        top_k, tta = _options(request, body, len(predictor.class_names))
        if tta:
            try:
                predictor.check_tta()
            except FinetuneError as e:
                raise HTTPException(422, str(e)) from None
        with batcher.arriving():
            views = []
            for d, n in zip(data, names, strict=True):
                async with decoding:  # a bounded number of images in memory at a time
                    views.append(await run_in_threadpool(decode, predictor, d, n,
                                                         limits.max_pixels, tta))
            future = batcher.submit(torch.stack(views))
        scores = await asyncio.wrap_future(future)
        return {"model": info["name"], "predictions": predictions(predictor, scores, names, top_k)}


def predictions(predictor: Predictor, scores: torch.Tensor, names: list[str], top_k: int
                ) -> list[dict]:
    """Each image's ``top_k`` classes by probability; a multi-label model's also its
    ``labels``: every tag at or over its threshold (``model.json``), most likely first."""
    multilabel = predictor.multilabel
    probs = scores if multilabel else scores.exp()
    out = [{"file": n, "top_k": probability_pairs(r)}
           for n, r in zip(names, top_classes(probs, predictor.class_names, top_k), strict=True)]
    if multilabel:
        for row, tags in zip(out, tags_over(probs, predictor.class_names, predictor.thresholds),
                             strict=True):
            row["labels"] = probability_pairs(tags)
    return out


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    if e.status_code == 404:
        return error_response(404, f"no route {request.method} {request.url.path}; this server "
                                   f"answers GET /, /health, /metadata, /openapi.json and "
                                   f"POST /predict")
    if e.status_code == 405:
        return error_response(405, f"{request.method} is not allowed on {request.url.path}")
    return error_response(e.status_code, str(e.detail))


async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0] if e.errors() else {}
    return error_response(422, f"{'.'.join(map(str, first.get('loc', ())))}: "
                               f"{first.get('msg', 'invalid request')}")


PAIRS = {"type": "array", "items": {"type": "object", "properties": {
    "class": {"type": "string"}, "probability": {"type": "number"}}}}
PREDICTION = {"type": "object", "properties": {
    "file": {"type": "string"}, "top_k": PAIRS,
    "labels": {**PAIRS, "description": "multi-label models only: the tags at or over their "
                                       "thresholds"}}}
PREDICT_BODY = {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "byte"}},
        "names": {"type": "array", "items": {"type": "string"}},
        "top_k": {"type": "integer", "minimum": 1, "default": 5},
        "tta": {"type": "boolean", "default": False}}}}}}
ERROR = {"content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "string"}}}}}}
PREDICT_RESPONSES = {
    200: {"content": {"application/json": {"schema": {"type": "object", "properties": {
        "model": {"type": "string"}, "predictions": {"type": "array", "items": PREDICTION}}}}}},
    400: {"description": "an image that cannot be decoded, a malformed body", **ERROR},
    413: {"description": "body, pixels or images over the server's limits", **ERROR},
    415: {"description": "neither multipart/form-data nor application/json", **ERROR},
    422: {"description": "top_k or tta invalid", **ERROR}}


def app_from_environment() -> FastAPI:
    """uvicorn's factory in each worker process: the settings ``serve`` put in the
    environment."""
    return create_app(Settings(**json.loads(os.environ[SETTINGS_ENV])))


def serve(settings: Settings, host: str, port: int, workers: int) -> None:
    """Run the server until interrupted (uvicorn, ``workers`` processes)."""
    import uvicorn

    from finetune.serve_limits import check_port

    check_port(host, port)
    app = create_app(settings)  # a bad run folder: one line here, not one per worker
    print(f"serving {settings.run} on http://{host}:{port}/ (the page; POST /predict, "
          f"GET /metadata, /health, /openapi.json); Ctrl-C stops", flush=True)
    options = {"host": host, "port": port, "log_level": "warning", "access_log": False}
    if workers == 1:
        uvicorn.run(app, **options)
        return
    os.environ[SETTINGS_ENV] = json.dumps(asdict(settings))
    uvicorn.run("finetune.serving:app_from_environment", factory=True, workers=workers,
                **options)
