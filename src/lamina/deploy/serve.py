"""HTTP model server: a trained run (torch) or an exported .onnx file (ONNX Runtime) behind FastAPI + uvicorn.

Routes: POST /predict (JSON tensors or an uploaded image/.npy file), GET /health, GET /metadata, GET /metrics
(Prometheus text format). Requests go through one micro-batching worker (lamina.deploy.batching).

Design choices, and why:
- Bodies are read by hand, not through FastAPI's pydantic models: the size limit is checked on Content-Length
  before anything is read (and again while a chunked body streams in), a 784-float sample does not pay for
  per-element validation, and every rejection is a one-line `{"error": ...}` with a 4xx status.
- Uploaded files are decoded by `lamina.data.inputs.read_inputs`, the function `lamina predict` uses, so an
  image gives the same tensor through the server as through the CLI (mode, resize, /255).
- Validation (shape, numeric dtype, finite values, sample count) happens on the event loop before a request
  is queued: a bad request never reaches the model and never delays a good one beyond its own parse time.
  JSON decoding is one C call that holds the GIL (a thread would not free the loop), so the body limit also
  bounds the stall one request can cause: ~0.5 ms for a 28x28 image, ~150 ms for 256 of them (4 MB).
- Uploads are checked before they cost memory: a compressed image's header declares its pixel count, which
  Pillow reads without decoding (`Image.open` is lazy), so a 0.5 MB PNG of 13000x13000 pixels (0.5 GB once
  decoded) is refused with 413 from the header; uploads hold places in the queue from before their body is
  read (a full queue answers 503 first), and decodes run under a semaphore (`max_decodes` at once), so N
  concurrent uploads cost at most max_decodes decoded images, not N.
- Slow clients cannot hold connections: headers must arrive within `request_timeout` seconds of the
  connection (or of the first byte of the next keep-alive request), and a body within `request_timeout` of
  its headers (408). uvicorn has a keep-alive timeout but no header timeout, hence `_TimedH11Protocol`.
- Failures are logged server-side (logger "lamina.serve"); 500 bodies carry a generic line, never exception
  text; /health and /metadata show no pid or path.
- /metrics is written in the Prometheus text format (0.0.4) by the small `Metrics` class below rather than
  with prometheus_client: four series need no dependency, and each app owns its numbers (prometheus_client's
  default registry is process-global, which several apps in one test process would share).
"""


import asyncio
import io
import json
import logging
import re
import tempfile
import time
import warnings
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np

from lamina.data.facts import DataFacts
from lamina.errors import ConfigError, DataError, LaminaError, MissingDependencyError

DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024  # ~500 Fashion-MNIST images as JSON text
DEFAULT_MAX_SAMPLES = 256
DEFAULT_MIN_IMAGE_PIXELS = 4096 * 4096  # the default --max-image-pixels is max(this, 4 x the model's H x W)
DEFAULT_MAX_DECODES = 2  # uploads decoded at once; the others wait (holding their queue places)
DEFAULT_REQUEST_TIMEOUT = 10.0  # seconds for a request's headers, and again for its body
MAX_HEADER_BYTES = 16 * 1024  # h11's incomplete-event limit: larger header blocks are refused
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pgm", ".bmp", ".ppm")
_log = logging.getLogger("lamina.serve")
UPLOAD_SUFFIXES = (".png", ".jpg", ".jpeg", ".pgm", ".bmp", ".ppm", ".npy")
_CONTENT_SUFFIX = {"image/png": ".png", "image/jpeg": ".jpg", "image/bmp": ".bmp", "image/x-portable-graymap": ".pgm",
                   "application/x-npy": ".npy", "application/octet-stream": ""}
ROUTES = ("/predict", "/health", "/metadata", "/metrics")


def need_web() -> None:
    for mod in ("fastapi", "uvicorn"):
        try:
            __import__(mod)
        except ImportError:
            raise MissingDependencyError(f'lamina serve needs the {mod} package: '
                                         f'pip install "lamina[deploy]"') from None


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float32) - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------------------- backends
class _Backend:
    """What the server needs from a model: facts (input_shape, task, class_names) and a blocking
    `forward(x: float32 (B, *input_shape) as the data set yields it) -> probabilities (B, C) or values (B, K)`."""

    name = "?"

    def __init__(self, facts: DataFacts, model_name: str, source: str):
        self.facts = facts
        self.model_name = model_name
        self.source = source
        self.label = Path(source).name  # what /metadata shows: a name, never the server's paths
        self.task = facts.task
        self.input_shape = tuple(int(d) for d in facts.input_shape)
        self.class_names = list(facts.class_names or [])
        if self.task not in ("classification", "regression"):
            raise ConfigError(f"{source}: lamina serve answers classification and regression models on tensor inputs; "
                              f"this model's task is {self.task}")
        if facts.meta.get("categorical"):
            raise ConfigError(f"{source}: a table model with categorical columns needs CSV rows; lamina serve takes "
                              f"tensors and images (use `lamina predict RUN file.csv`)")

    @property
    def contract(self) -> dict:
        image = len(self.input_shape) == 3
        return {"shape": list(self.input_shape), "dtype": "float32", "batch": "one sample of this shape or a list "
                "of them", "value_range": [0.0, 1.0] if image else None,
                "layout": "CHW pixels scaled to [0, 1] (normalization is applied by the server)" if image
                else "feature vector as the data set yields it",
                "uploads": list(UPLOAD_SUFFIXES if image else (".npy",))}


class TorchBackend(_Backend):
    """A run's model in eval mode; `transform` = eval_transforms(cfg.data.augment) (e.g. normalize), applied to
    each batch exactly as evaluation and `lamina predict` apply it."""

    name = "torch"

    def __init__(self, model, facts: DataFacts, transform=None, model_name: str = "model", source: str = "model"):
        super().__init__(facts, model_name, source)
        self.model = model.eval()
        self.transform = transform

    def forward(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            if self.transform is not None:
                t = self.transform({"x": t})["x"]
            out = self.model(t).float()
            if self.task == "classification":
                out = out.softmax(-1)
            return out.numpy()


class OnnxBackend(_Backend):
    """An exported model through `lamina.deploy.runtime.OnnxRunner`; facts and normalization from the file's
    "lamina" metadata. `normalize` ({"mean", "std"} per channel) is applied here because the exported graph
    takes the data set's input, before the run's eval transforms, just like the torch model."""

    name = "onnxruntime"

    def __init__(self, runner, source: str = "model.onnx"):
        md = runner.metadata or {}
        if "facts" not in md:
            raise ConfigError(f"{source}: no lamina metadata in the ONNX file; export it with `lamina export`")
        super().__init__(DataFacts.from_dict(md["facts"], f"{source} metadata"), md.get("model", "onnx"), source)
        self.runner = runner
        norm = md.get("normalize")
        shape = (1, -1) + (1,) * (len(self.input_shape) - 1)
        self.mean = None if not norm else np.asarray(norm["mean"], np.float32).reshape(shape)
        self.std = None if not norm else np.asarray(norm["std"], np.float32).reshape(shape)

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        out = np.asarray(self.runner.run(x), dtype=np.float32)
        return _softmax(out) if self.task == "classification" else out


def load_backend(path: str | Path, which: str = "best", threads: int | None = None) -> _Backend:
    """A run folder (or checkpoint folder) -> TorchBackend; a .onnx file -> OnnxBackend."""
    p = Path(path)
    if p.suffix.lower() == ".onnx":
        if not p.is_file():
            raise DataError(f"{path}: ONNX file not found")
        try:
            from lamina.deploy.runtime import OnnxRunner
        except ImportError as e:
            raise MissingDependencyError(f'serving .onnx needs onnxruntime and lamina.deploy.runtime ({e}): '
                                         f'pip install "lamina[deploy]"') from None
        return OnnxBackend(OnnxRunner(str(p), threads=threads), source=str(p))  # label: the file's name
    if not p.exists():
        raise DataError(f"{path}: not found; expected a run folder (e.g. runs/NAME) or a .onnx file")
    from lamina.data.transforms import eval_transforms
    from lamina.runs import RunFolder, open_run

    if not RunFolder.is_run(p):
        raise ConfigError(f"{path}: not a run folder (no checkpoints/ or meta.json) and not a .onnx file")

    if threads:
        import torch

        torch.set_num_threads(int(threads))
    run = open_run(p, which)
    backend = TorchBackend(run.model, run.facts, eval_transforms(run.cfg.data.augment),
                           model_name=run.cfg.model.name, source=str(run.checkpoint))
    backend.label = f"{p.resolve().name}:{which}"  # the run folder's name and checkpoint, not its path
    return backend


def default_max_image_pixels(input_shape: tuple) -> int:
    """max(4 x the model's H x W, 4096 x 4096): room for photos to be resized down, not for decompression bombs."""
    hw = int(np.prod(input_shape[1:])) if len(input_shape) == 3 else 0
    return max(4 * hw, DEFAULT_MIN_IMAGE_PIXELS)


# ----------------------------------------------------------------------------------------------- metrics
class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
                break

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{b:g}"}} {acc}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.9g}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """Counters and histograms of one app, rendered in the Prometheus text format."""

    def __init__(self):
        self.requests: Counter = Counter()  # (route, status) -> n
        self.errors: Counter = Counter()  # kind -> n
        self.latency = _Histogram((0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
        self.batch_size = _Histogram((1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.forward_seconds = _Histogram((0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))

    def render(self, queue_depth: int) -> str:
        out = ["# HELP lamina_requests_total HTTP requests answered, by route and status code.",
               "# TYPE lamina_requests_total counter"]
        out += [f'lamina_requests_total{{route="{r}",status="{s}"}} {n}' for (r, s), n in sorted(self.requests.items())]
        out += ["# HELP lamina_errors_total Rejected or failed requests, by kind.",
                "# TYPE lamina_errors_total counter"]
        out += [f'lamina_errors_total{{kind="{k}"}} {n}' for k, n in sorted(self.errors.items())]
        for name, h, help_ in (("lamina_request_latency_seconds", self.latency, "Time to answer /predict."),
                               ("lamina_batch_size", self.batch_size, "Samples per model forward."),
                               ("lamina_forward_seconds", self.forward_seconds, "Time of one model forward.")):
            out += [f"# HELP {name} {help_}", f"# TYPE {name} histogram", *h.lines(name)]
        out += ["# HELP lamina_queue_depth Samples waiting for a forward.", "# TYPE lamina_queue_depth gauge",
                f"lamina_queue_depth {queue_depth}"]
        return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------- requests
class Reject(Exception):
    """A request answered with `status` and `{"error": message}`; `kind` labels lamina_errors_total."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(" ".join(message.split()))
        self.status, self.kind = status, kind


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


def _has_bool(nested) -> bool:
    if isinstance(nested, bool):
        return True
    return isinstance(nested, list) and any(_has_bool(v) for v in nested)


def parse_tensor(obj, input_shape: tuple, max_samples: int, raw: bytes | None = None) -> np.ndarray:
    """JSON `{"inputs": sample | [samples]}` -> float32 (N, *input_shape), or Reject(422) naming the problem.

    `raw`, the JSON text `obj` came from, lets booleans mixed with numbers (which numpy reads as 1.0 / 0.0) be
    found with one C-speed search instead of a walk: once `obj` parsed to a numeric array, its only string is
    the key "inputs", so a `true`/`false` in the text is a JSON literal."""
    if not isinstance(obj, dict):
        raise Reject(422, "invalid_input", f'expected a JSON object {{"inputs": ...}}, got a JSON {type(obj).__name__}')
    unknown = [k for k in obj if k != "inputs"]
    if unknown:
        raise Reject(422, "invalid_input", f"unknown field '{unknown[0]}'; accepted: inputs")
    if "inputs" not in obj:
        raise Reject(422, "invalid_input", f'missing field "inputs": one sample of shape {_shape_str(input_shape)} '
                                           f"or a list of them")
    try:
        arr = np.asarray(obj["inputs"])
    except (ValueError, OverflowError):  # ragged nesting
        raise Reject(422, "invalid_input", f"inputs: ragged nested lists; every sample must have shape "
                                           f"{_shape_str(input_shape)}") from None
    if arr.dtype.kind not in "iuf":
        kinds = {"U": "strings", "b": "booleans", "O": "null, objects or mixed values"}
        what = kinds.get(arr.dtype.kind, str(arr.dtype))
        raise Reject(422, "invalid_input", f"inputs: expected numbers, got {what}")
    if (b"true" in raw or b"false" in raw) if raw is not None else _has_bool(obj["inputs"]):
        raise Reject(422, "invalid_input", "inputs: expected numbers, got booleans mixed with numbers")
    if arr.shape == input_shape:
        arr = arr[None]
    if arr.ndim != len(input_shape) + 1 or arr.shape[1:] != input_shape:
        raise Reject(422, "invalid_input", f"inputs: expected shape {_shape_str(input_shape)} or "
                                           f"(N, {_shape_str(input_shape)[1:-1]}), got {_shape_str(arr.shape)}")
    if len(arr) == 0:
        raise Reject(422, "invalid_input", "inputs: empty batch; send at least one sample")
    if len(arr) > max_samples:
        raise Reject(422, "too_many_samples", f"inputs: {len(arr)} samples; at most {max_samples} per request")
    with np.errstate(over="ignore"):  # 1e39 -> inf, reported just below
        arr = arr.astype(np.float32)
    bad = ~np.isfinite(arr).reshape(len(arr), -1).all(axis=1)
    if bad.any():
        raise Reject(422, "invalid_input", f"inputs: sample {int(bad.argmax())} contains NaN or infinite values "
                                           f"(or numbers beyond float32)")
    return arr


def _upload_suffix(fname: str, ctype: str) -> str:
    suffix = Path(fname or "").suffix.lower() or _CONTENT_SUFFIX.get(ctype, "")
    if suffix not in UPLOAD_SUFFIXES:
        raise Reject(415, "unsupported_media_type", f"upload '{fname}': unsupported file type "
                     f"'{suffix or ctype}'; accepted: {', '.join(UPLOAD_SUFFIXES)}")
    return suffix


def check_uploads(files: list[tuple[str, str, bytes]], max_image_pixels: int) -> None:
    """Refuse, before anything is decoded, uploads of an unsupported type (415) and images whose header declares
    more than `max_image_pixels` pixels (413). Reads headers only (Pillow's `Image.open` is lazy): microseconds,
    so this runs on the event loop. A header Pillow cannot read is left to the decoder, which names the file."""
    from PIL import Image

    for fname, ctype, data in files:
        if _upload_suffix(fname, ctype) not in IMAGE_SUFFIXES:
            continue
        try:
            with warnings.catch_warnings(record=True):  # Pillow warns beyond MAX_IMAGE_PIXELS: we answer instead
                warnings.simplefilter("always")
                with Image.open(io.BytesIO(data)) as im:  # header only; raises beyond twice MAX_IMAGE_PIXELS
                    w, h = im.size
        except Image.DecompressionBombError as e:
            w, h = None, re.search(r"\((\d+) pixels\)", str(e))  # Pillow names the size, not the sides
        except Exception:  # noqa: BLE001 - corrupt or unknown: the decoder's 422 names the upload
            continue
        if w is None or w * h > max_image_pixels:
            size = f"of {w}x{h} = {w * h} pixels " if w is not None else f"of {h.group(1)} pixels " if h else ""
            raise Reject(413, "too_many_pixels", f"upload '{fname}': image {size}exceeds the limit of "
                         f"{max_image_pixels} pixels (--max-image-pixels); send it resized")


def _read_uploads(files: list[tuple[str, str, bytes]], facts: DataFacts) -> np.ndarray:
    """(filename, content type, bytes) uploads -> float32 (N, *input_shape) via read_inputs, as `lamina predict`."""
    from lamina.data.inputs import read_inputs

    with tempfile.TemporaryDirectory(prefix="lamina-serve-") as tmp:
        paths, names = [], {}
        for i, (fname, ctype, data) in enumerate(files):
            suffix = _upload_suffix(fname, ctype)
            p = Path(tmp) / f"upload{i}{suffix}"
            p.write_bytes(data)
            paths.append(str(p))
            names[str(p)] = fname or f"upload{i}"
        try:
            parts, _ = read_inputs(paths, facts)
        except LaminaError as e:  # corrupt image, wrong array shape, ...: name the upload, not the temp file
            msg = str(e)
            for p, n in names.items():
                msg = msg.replace(p, n)
            raise Reject(422, "invalid_input", msg) from None
    x = parts["x"].numpy().astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise Reject(422, "invalid_input", "upload contains NaN or infinite values")
    return x


def _answers(out: np.ndarray, task: str, class_names: list[str]) -> list[dict]:
    if task != "classification":
        return [{"value": row} for row in out.tolist()]
    labels = out.argmax(axis=1).tolist()
    rows = []
    for label, probs in zip(labels, out.tolist()):
        rows.append({"label": label, "class": class_names[label] if class_names else str(label),
                     "confidence": probs[label], "probabilities": probs})
    return rows


# ----------------------------------------------------------------------------------------------- the app
def create_app(backend, max_batch: int = 32, max_wait_ms: float = 5.0, batching: bool = True,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_samples: int = DEFAULT_MAX_SAMPLES,
               max_queue: int = 4096, forward_threads: int = 1, max_image_pixels: int | None = None,
               max_decodes: int = DEFAULT_MAX_DECODES, request_timeout: float = DEFAULT_REQUEST_TIMEOUT):
    """The FastAPI app serving `backend` (see load_backend). The batching worker starts with the app's lifespan,
    so use it under uvicorn or `with TestClient(app)`. `max_image_pixels` defaults to
    `default_max_image_pixels(backend.input_shape)`; `request_timeout` bounds the time to read a body (the
    header timeout is the server's: see `uvicorn_config`)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from lamina.deploy.batching import MicroBatcher, ModelFailure, Overloaded

    from PIL import Image

    metrics = Metrics()
    if max_image_pixels is None:
        max_image_pixels = default_max_image_pixels(backend.input_shape)
    decodes = asyncio.Semaphore(max_decodes)

    def on_batch(n: int, seconds: float) -> None:
        metrics.batch_size.observe(n)
        metrics.forward_seconds.observe(seconds)

    batcher = MicroBatcher(backend.forward, max_batch, max_wait_ms, batching, max_queue, on_batch, forward_threads)

    @asynccontextmanager
    async def lifespan(app):
        # Pillow's own bomb guard (warns beyond it, raises beyond twice it) at the same limit, for every decode
        # while the server runs; put back after, so a process that also trains or reports keeps its own limit
        pixels_before, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, int(max_image_pixels)
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            Image.MAX_IMAGE_PIXELS = pixels_before

    app = FastAPI(title=f"lamina serve: {backend.model_name}", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.batcher, app.state.metrics, app.state.backend = batcher, metrics, backend
    app.state.request_timeout = request_timeout

    def error(status: int, kind: str, message: str) -> JSONResponse:
        metrics.errors[kind] += 1
        return JSONResponse({"error": " ".join(message.split())}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        m, path = request.method, request.url.path
        if exc.status_code == 404:
            return error(404, "not_found", f"no route {m} {path}; routes: POST /predict, GET /health, GET /metadata, "
                                           f"GET /metrics")
        if exc.status_code == 405:
            allowed = "POST" if path == "/predict" else "GET"
            return error(405, "method_not_allowed", f"method {m} not allowed on {path}; use {allowed}")
        return error(exc.status_code, "http", str(exc.detail))

    async def read_body(request: Request) -> bytes:
        try:
            return await asyncio.wait_for(_read_body(request), request_timeout)
        except TimeoutError:
            raise Reject(408, "timeout", f"request body not received within {request_timeout:g} s") from None

    async def _read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise Reject(400, "invalid_request", f"invalid Content-Length header {length!r}")
            if int(length) > max_request_bytes:  # before reading a byte of it
                raise Reject(413, "too_large", f"request body of {int(length)} bytes exceeds the limit of "
                                               f"{max_request_bytes} bytes (--max-request-bytes)")
        chunks, n = [], 0
        async for chunk in request.stream():  # chunked uploads carry no Content-Length: count as they come
            n += len(chunk)
            if n > max_request_bytes:
                raise Reject(413, "too_large", f"request body exceeds the limit of {max_request_bytes} bytes "
                                               f"(--max-request-bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def parse_multipart(request: Request, body: bytes, held: list[int]) -> np.ndarray:
        """Files of a multipart body -> float32 (N, *input_shape). `held[0]` counts the queue places this
        request holds (batcher.reserve): one per file from before any decode."""
        from starlette.concurrency import run_in_threadpool
        from starlette.datastructures import UploadFile

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, receive).form(max_files=max_samples, max_fields=16)
        except AssertionError:  # starlette's way of saying python-multipart is not installed
            raise Reject(415, "unsupported_media_type", 'file uploads need python-multipart on the server: '
                                                        'pip install "lamina[deploy]"; or send JSON tensors') from None
        except Exception as e:  # noqa: BLE001 - python-multipart/starlette raise several types for a bad body
            detail = getattr(e, "detail", None) or str(e) or type(e).__name__
            raise Reject(400, "invalid_request", f"malformed multipart body: {detail}") from None
        files, others = [], []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append((value.filename or key, (value.content_type or "").lower(), await value.read()))
            else:
                others.append(key)
        await form.close()
        if others:
            raise Reject(422, "invalid_input", f"unknown form field '{others[0]}'; upload files only (field name "
                                               f"'file')")
        if not files:
            raise Reject(422, "invalid_input", "multipart body without a file; upload an image or .npy as 'file'")
        check_uploads(files, max_image_pixels)
        if len(files) > held[0]:
            batcher.reserve(len(files) - held[0])
            held[0] = len(files)
        async with decodes:
            return await run_in_threadpool(_read_uploads, files, backend.facts)

    @app.post("/predict")
    async def predict(request: Request):
        t0 = time.perf_counter()
        held = [0]  # queue places reserved by an upload
        try:
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            is_json = ctype == "application/json" or ctype.endswith("+json")
            if not is_json and ctype != "multipart/form-data":  # decided before reading the body
                raise Reject(415, "unsupported_media_type", f"content type '{ctype or 'none'}' not accepted; send "
                             f"application/json or multipart/form-data")
            if not is_json:  # an upload holds a queue place before its body is read: a full queue answers 503 first
                batcher.reserve(1)
                held[0] = 1
            body = await read_body(request)
            if not body:
                raise Reject(400, "invalid_request", 'empty body; send JSON {"inputs": [...]} or a multipart file '
                                                     'upload')
            if is_json:
                try:
                    obj = json.loads(body)
                except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                    raise Reject(400, "invalid_json", f"invalid JSON: {e}") from None
                except RecursionError:  # nesting deeper than the decoder's recursion limit
                    raise Reject(400, "invalid_json", "invalid JSON: nested too deeply; inputs need "
                                                      f"{len(backend.input_shape) + 1} levels of lists") from None
                x = parse_tensor(obj, backend.input_shape, max_samples, raw=body)
            else:
                x = await parse_multipart(request, body, held)
                if len(x) > max_samples:
                    raise Reject(422, "too_many_samples", f"{len(x)} samples; at most {max_samples} per request")
            batcher.unreserve(held[0])  # submit counts the samples themselves (no await in between)
            held[0] = 0
            try:
                out = await batcher.submit(x)
            except Overloaded as e:
                raise Reject(503, "overloaded", str(e)) from None
            except ModelFailure as e:
                _log.error("model error on /predict: %s", e)
                raise Reject(500, "model_error", "model error: the model failed on this request (details in the "
                                                 "server log)") from None
            rows = _answers(out, backend.task, backend.class_names)
        except Overloaded as e:  # batcher.reserve: an upload met a full queue
            return error(503, "overloaded", str(e))
        except Reject as r:
            return error(r.status, r.kind, str(r))
        except Exception:  # noqa: BLE001 - a bug here answers 500 and leaves the server running
            _log.exception("internal error on /predict")
            return error(500, "internal", "internal error (details in the server log)")
        finally:
            batcher.unreserve(held[0])
            metrics.latency.observe(time.perf_counter() - t0)
        return Response(json.dumps({"predictions": rows}), media_type="application/json")

    @app.get("/health")
    async def health():
        ok = batcher.alive
        return JSONResponse({"status": "ok" if ok else "worker stopped", "queue_depth": batcher.depth},
                            status_code=200 if ok else 503)

    @app.get("/metadata")
    async def metadata():
        return {"model": backend.model_name, "source": backend.label, "backend": backend.name,
                "task": backend.task, "input": backend.contract, "class_names": backend.class_names,
                "num_outputs": backend.facts.num_outputs,
                "batching": {"enabled": batcher.batching, "max_batch": batcher.max_batch,
                             "max_wait_ms": batcher.max_wait * 1000.0, "max_queue": batcher.max_queue,
                             "forward_threads": batcher.forward_threads},
                "limits": {"max_request_bytes": max_request_bytes, "max_samples": max_samples},
                "uploads": {"max_image_pixels": max_image_pixels, "max_decodes": max_decodes,
                            "request_timeout_s": request_timeout}}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(batcher.depth), media_type="text/plain; version=0.0.4")

    app.add_middleware(_CountRequests, metrics=metrics)
    return app


class _CountRequests:
    """ASGI middleware: lamina_requests_total{route, status} for every answer, 404s included (one route label
    "other" for unknown paths, so a scan cannot grow the series without bound)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.requests[(route, str(status[0]))] += 1


# ----------------------------------------------------------------------------------------------- running
def bind_socket(host: str, port: int):
    """A listening socket on host:port, or ConfigError naming the port when it is taken (checked here so the
    CLI can fail with one line instead of uvicorn's log and exit)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); choose another port "
                          f"(--port 0 picks a free one)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _timed_h11_protocol(header_timeout: float):
    """uvicorn's h11 protocol plus a header deadline. uvicorn closes idle keep-alive connections, but a client
    that sends part of its headers is held forever (the keep-alive timer is cancelled by the first byte and
    the first request has none). Here headers must be complete `header_timeout` seconds after the connection
    opens, or after the first byte of a later request; otherwise the connection is closed."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class _TimedH11Protocol(H11Protocol):
        _header_deadline = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_header_deadline()

        def _arm_header_deadline(self):
            if self._header_deadline is None:
                self._header_deadline = self.loop.call_later(header_timeout, self._header_timeout)

        def _cancel_header_deadline(self):
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._arm_header_deadline()  # (part of) the next request's headers: they have header_timeout
            else:
                self._cancel_header_deadline()  # headers complete: the body has its own timeout (408)

        def connection_lost(self, exc):
            self._cancel_header_deadline()
            super().connection_lost(exc)

        def _header_timeout(self):
            self._header_deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                if self.cycle is None or self.cycle.response_complete:
                    self.transport.close()

    return _TimedH11Protocol


def uvicorn_config(app, log_level: str = "warning", request_timeout: float = DEFAULT_REQUEST_TIMEOUT):
    """uvicorn.Config for `app`: h11 with a header deadline of `request_timeout` seconds, header blocks of at
    most MAX_HEADER_BYTES, and idle keep-alive connections closed after 5 s."""
    import uvicorn

    return uvicorn.Config(app, log_level=log_level, access_log=False, timeout_keep_alive=5,
                          http=_timed_h11_protocol(request_timeout), h11_max_incomplete_event_size=MAX_HEADER_BYTES)


def serve(app, sock, log_level: str = "warning") -> None:
    """Run `app` under uvicorn on an already bound socket until SIGINT/SIGTERM; headers get the app's
    request_timeout (create_app)."""
    import uvicorn

    timeout = getattr(app.state, "request_timeout", DEFAULT_REQUEST_TIMEOUT)
    uvicorn.Server(uvicorn_config(app, log_level, timeout)).run(sockets=[sock])


__all__ = ["create_app", "load_backend", "TorchBackend", "OnnxBackend", "Metrics", "parse_tensor", "serve",
           "bind_socket", "Reject", "uvicorn_config", "check_uploads", "default_max_image_pixels"]
