"""The serve verb: an HTTP model server with micro-batching (lamina.deploy.serve)."""

from __future__ import annotations

import argparse
import sys


def add_parsers(sub) -> None:
    s = sub.add_parser("serve", help="serve a trained run or an exported .onnx over HTTP (POST /predict, GET /health, "
                                     "/metadata, /metrics) with dynamic micro-batching")
    s.add_argument("path", metavar="RUN_DIR|MODEL.onnx")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    s.add_argument("--max-batch", type=int, default=32, help="most samples in one forward")
    s.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait for a batch to fill, after the "
                                                                   "oldest queued request")
    s.add_argument("--no-batching", action="store_true", help="one request per forward")
    s.add_argument("--max-request-bytes", type=int, default=None, help="larger bodies get 413 (default 8 MiB)")
    s.add_argument("--max-samples", type=int, default=None, help="most samples in one request (default 256)")
    s.add_argument("--max-image-pixels", type=int, default=None, help="uploaded images whose header declares more "
                   "pixels get 413 before decoding (default: max(4 x the model's H x W, 4096 x 4096))")
    s.add_argument("--request-timeout", type=float, default=10.0, help="seconds a client has to send a request's "
                   "headers, and again its body (default 10)")
    s.add_argument("--threads", type=int, default=None, help="intra-op threads of the model (default: torch's/"
                                                             "ONNX Runtime's choice)")
    s.add_argument("--forward-threads", type=int, default=1, help="forwards that may run at once (default 1: one "
                                                                  "batching worker; see lamina.deploy.batching)")
    s.add_argument("--which", default="best", choices=["best", "last"], help="checkpoint of a run folder")
    s.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def _positive(flag: str, value, allow_zero: bool = False) -> None:
    from lamina.errors import ConfigError

    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        kind = "integer" if isinstance(value, int) else "number"
        raise ConfigError(f"{flag}: expected a {'non-negative' if allow_zero else 'positive'} {kind}, got {value}")


def cmd_serve(a, console) -> int:
    from lamina.deploy import serve as srv
    from lamina.errors import ConfigError

    for flag, v in (("--max-batch", a.max_batch), ("--max-request-bytes", a.max_request_bytes),
                    ("--max-samples", a.max_samples), ("--threads", a.threads),
                    ("--forward-threads", a.forward_threads), ("--max-image-pixels", a.max_image_pixels),
                    ("--request-timeout", a.request_timeout)):
        _positive(flag, v)
    _positive("--max-wait-ms", a.max_wait_ms, allow_zero=True)
    if not 0 <= a.port <= 65535:
        raise ConfigError(f"--port: expected 0..65535, got {a.port}")
    srv.need_web()
    sock = srv.bind_socket(a.host, a.port)  # before loading the model: a taken port fails fast, in one line
    try:
        backend = srv.load_backend(a.path, which=a.which, threads=a.threads)
    except BaseException:
        sock.close()
        raise
    limits = {k: v for k, v in (("max_request_bytes", a.max_request_bytes), ("max_samples", a.max_samples),
                                ("max_image_pixels", a.max_image_pixels)) if v is not None}
    app = srv.create_app(backend, max_batch=a.max_batch, max_wait_ms=a.max_wait_ms, batching=not a.no_batching,
                         forward_threads=a.forward_threads, request_timeout=a.request_timeout, **limits)
    host, port = sock.getsockname()[:2]
    batching = "off" if a.no_batching else f"max {a.max_batch} samples / {a.max_wait_ms:g} ms"
    console.print(f"serving {backend.model_name} ({backend.name}) on http://{host}:{port}  batching {batching}  "
                  f"(Ctrl-C stops)")
    sys.stderr.flush()
    srv.serve(app, sock, log_level=a.log_level)  # the header timeout comes from the app (request_timeout)
    return 0


COMMANDS: dict = {"serve": cmd_serve}
