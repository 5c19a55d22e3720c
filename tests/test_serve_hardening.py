"""lamina serve under hostile clients (issue 14): decompression bombs refused from the header, uploads counted
against the queue and decoded under a semaphore, deep JSON and booleans refused with 4xx, slow clients cut off,
500 bodies without exception text, /health and /metadata without pid or paths.

The model, backends and the real-socket Server come from test_serve.py (same 8x8 digits MLP); the header-timeout
tests run uvicorn with `uvicorn_config`, the configuration `lamina serve` uses.
"""

import io
import logging
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
Image = pytest.importorskip("PIL.Image")

from test_serve import (TYPED, Flaky, Gated, NORM, Server, _cli, _one_thread, backend, digits,  # noqa: E402,F401
                        direct, metric, model, post)

from lamina.data.transforms import eval_transforms  # noqa: E402
from lamina.deploy import serve as srv  # noqa: E402
from lamina.deploy.serve import TorchBackend, default_max_image_pixels, uvicorn_config  # noqa: E402


def bomb_png(width: int, height: int) -> bytes:
    """A valid all-black grayscale PNG of width x height, built row by row (the test never holds the pixels):
    13000 x 13000 is ~0.2 MB of file and 169 MB (L) to 0.5 GB (RGB) once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    parts = [z.compress(row) for _ in range(height)] + [z.flush()]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def png(size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (size, size), 128).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def decode_calls(monkeypatch):
    """Counts calls of the upload decoder (and the most that ran at once), still decoding for real."""
    real = srv._read_uploads
    state = {"calls": 0, "now": 0, "most": 0, "delay": 0.0}
    lock = threading.Lock()

    def spy(files, facts):
        with lock:
            state["calls"] += 1
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        try:
            time.sleep(state["delay"])
            return real(files, facts)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(srv, "_read_uploads", spy)
    return state


# ----------------------------------------------------------------------------------------------- case 1: uploads
def test_decompression_bomb_is_refused_from_its_header(backend, decode_calls):
    bomb = bomb_png(13000, 13000)
    assert len(bomb) < 1_000_000
    with Server(backend) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        r = c.post("/predict", files={"file": ("bomb.png", bomb, "image/png")})
        assert r.status_code == 413, r.text
        msg = r.json()["error"]
        assert "bomb.png" in msg and str(13000 * 13000) in msg and str(4096 * 4096) in msg and "\n" not in msg
        assert decode_calls["calls"] == 0  # refused before any decode
        assert c.post("/predict", files={"file": ("ok.png", png(16), "image/png")}).status_code == 200
        assert c.get("/metadata").json()["uploads"]["max_image_pixels"] == 4096 * 4096
        assert metric(s.metrics(), 'lamina_errors_total{kind="too_many_pixels"}') == 1


def test_image_pixel_limit_follows_the_option_and_the_model():
    assert default_max_image_pixels((1, 8, 8)) == 4096 * 4096  # small models: the floor
    assert default_max_image_pixels((3, 4096, 4096)) == 4 * 4096 * 4096  # large ones: 4x their input
    assert default_max_image_pixels((64,)) == 4096 * 4096


def test_max_image_pixels_option(backend, decode_calls):
    before = Image.MAX_IMAGE_PIXELS
    with Server(backend, max_image_pixels=20 * 20) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        assert Image.MAX_IMAGE_PIXELS == 400  # Pillow's own guard agrees with the server's limit while it runs
        assert c.post("/predict", files={"file": ("a.png", png(20), "image/png")}).status_code == 200
        r = c.post("/predict", files=[("file", ("a.png", png(20), "image/png")),
                                      ("file", ("b.png", png(21), "image/png"))])
        assert r.status_code == 413 and "'b.png'" in r.json()["error"] and "21x21 = 441" in r.json()["error"]
    assert decode_calls["calls"] == 1  # the second request decoded nothing, not even its good first file
    assert Image.MAX_IMAGE_PIXELS == before  # put back: the rest of the process (training, reports) keeps its own


def test_full_queue_answers_503_to_uploads_before_decoding(model, digits, decode_calls):
    x, _ = digits
    gated = Gated(model, TYPED, eval_transforms(NORM))
    answers = {}
    with Server(gated, batching=False, max_queue=1) as s:
        def send(i):
            with httpx.Client(base_url=s.url, timeout=60) as c:
                answers[i] = post(c, x[i])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
        try:
            threads[0].start()
            deadline = time.monotonic() + 30
            while gated.entered < 1:  # request 0 is in the forward
                assert time.monotonic() < deadline
                time.sleep(0.005)
            threads[1].start()
            while metric(s.metrics(), "lamina_queue_depth") < 1:  # request 1 fills the queue
                assert time.monotonic() < deadline
                time.sleep(0.005)
            with httpx.Client(base_url=s.url, timeout=30) as c:
                # a corrupt image: decoding it would answer 422; a full queue must answer first
                r = c.post("/predict", files={"file": ("broken.png", b"\x89PNG not really", "image/png")})
                assert r.status_code == 503, r.text
                assert "server busy" in r.json()["error"]
                assert decode_calls["calls"] == 0
        finally:
            gated.release.set()
            for t in threads:
                t.join(timeout=60)
        assert [answers[i].status_code for i in range(2)] == [200, 200]
        with httpx.Client(base_url=s.url, timeout=30) as c:  # places held by uploads are given back
            for _ in range(3):
                assert c.post("/predict", files={"file": ("ok.png", png(8), "image/png")}).status_code == 200
            assert s.app.state.batcher.reserved == 0


def test_uploads_are_decoded_under_a_semaphore(backend, decode_calls):
    decode_calls["delay"] = 0.2
    codes = []
    with Server(backend, max_decodes=2) as s:
        def send():
            with httpx.Client(base_url=s.url, timeout=60) as c:
                codes.append(c.post("/predict", files={"file": ("ok.png", png(16), "image/png")}).status_code)

        threads = [threading.Thread(target=send) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert s.app.state.batcher.reserved == 0
    assert codes == [200] * 6
    assert decode_calls["calls"] == 6 and decode_calls["most"] <= 2


# ----------------------------------------------------------------------------------------------- case 2: JSON
def test_deeply_nested_json_is_400(backend):
    with Server(backend) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        for depth in (100_000, 5_000):
            body = b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}"
            r = c.post("/predict", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, (depth, r.status_code, r.text)
            assert "nested too deeply" in r.json()["error"]
        assert c.get("/health").json()["status"] == "ok"


def test_booleans_mixed_with_numbers_are_refused(backend, digits):
    x, _ = digits
    sample = x[0].tolist()
    sample[0][0][0] = True
    batch = [x[1].tolist(), sample]
    with Server(backend) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        for inputs in (sample, batch, [[[False] + [0.5] * 7] * 8]):
            r = c.post("/predict", json={"inputs": inputs})
            assert r.status_code == 422, r.text
            assert "booleans" in r.json()["error"]
        assert post(c, x[0]).status_code == 200  # 0 and 1 as numbers stay numbers
        assert c.post("/predict", json={"inputs": [[[1] + [0] * 7] * 8]}).status_code == 200
    with pytest.raises(srv.Reject, match="booleans"):  # direct callers (no raw text) get the same answer
        srv.parse_tensor({"inputs": [[[0.5] * 7 + [True]] * 8]}, (1, 8, 8), 4)


# ----------------------------------------------------------------------------------------------- case 2: 500s
def test_500_bodies_carry_no_exception_text(model, digits, monkeypatch, caplog):
    x, _ = digits
    poison = x[0].copy()
    poison[0, 0, 0] = 7.0
    flaky = Flaky(model, TYPED, eval_transforms(NORM))
    with caplog.at_level(logging.ERROR, logger="lamina.serve"):
        with Server(flaky) as s, httpx.Client(base_url=s.url, timeout=30) as c:
            r = post(c, poison)
            assert r.status_code == 500
            assert "poisoned" not in r.text and "RuntimeError" not in r.text
            assert r.json()["error"].startswith("model error")

            def broken(*a, **kw):
                raise ValueError("secret /srv/models/key.pem")

            monkeypatch.setattr(srv, "_answers", broken)
            r = post(c, x[0])
            assert r.status_code == 500
            assert r.json() == {"error": "internal error (details in the server log)"}
    logged = caplog.text
    assert "poisoned sample" in logged and "secret /srv/models/key.pem" in logged  # the detail is logged


# ----------------------------------------------------------------------------------------------- case 2: info leaks
def test_health_and_metadata_leak_no_pid_or_path(model):
    b = TorchBackend(model, TYPED, eval_transforms(NORM), model_name="tiny_mlp",
                     source="/home/alice/secret-project/runs/mnist/checkpoints/best")
    with Server(b) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        h = c.get("/health").json()
        assert h == {"status": "ok", "queue_depth": 0}
        md = c.get("/metadata")
        assert md.json()["source"] == "best"
        assert "alice" not in md.text and "secret-project" not in md.text


# ----------------------------------------------------------------------------------------------- case 2: slow clients
class TimedServer(Server):
    """test_serve.Server, but uvicorn configured as `lamina serve` configures it (uvicorn_config)."""

    def __init__(self, backend, request_timeout: float, **kw):
        import uvicorn

        super().__init__(backend, request_timeout=request_timeout, **kw)
        self.server = uvicorn.Server(uvicorn_config(self.app, "error", request_timeout))
        startup = self.server.startup

        async def startup_then_signal(sockets=None):
            await startup(sockets=sockets)
            self.ready.set()

        self.server.startup = startup_then_signal


def closed_within(sk: socket.socket, seconds: float) -> bool:
    """True when the server closes the connection (recv gives b"") within `seconds`."""
    sk.settimeout(seconds)
    try:
        while True:
            part = sk.recv(4096)
            if not part:
                return True
    except (TimeoutError, socket.timeout):
        return False
    except ConnectionResetError:
        return True


def test_half_sent_headers_are_cut_off(backend):
    with TimedServer(backend, request_timeout=1.0) as s:
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as sk:
            t0 = time.monotonic()
            sk.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
            assert closed_within(sk, 6), "a client sending half its headers was held"
            assert time.monotonic() - t0 < 4
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as sk:  # nothing sent at all
            assert closed_within(sk, 6)
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as sk:  # after a keep-alive request
            sk.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while b"}" not in reply:
                reply += sk.recv(4096)
            assert reply.startswith(b"HTTP/1.1 200")
            t0 = time.monotonic()
            sk.sendall(b"GET /hea")
            assert closed_within(sk, 6) and time.monotonic() - t0 < 4
        assert httpx.get(s.url + "/health").status_code == 200


def test_half_sent_body_gets_408(backend):
    with TimedServer(backend, request_timeout=1.0) as s:
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as sk:
            t0 = time.monotonic()
            sk.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 1000\r\n\r\n{\"inputs\": [")
            sk.settimeout(6)
            reply = b""
            while b"}" not in reply:
                part = sk.recv(4096)
                assert part, reply
                reply += part
            assert reply.startswith(b"HTTP/1.1 408"), reply
            assert b"not received within 1 s" in reply
            assert time.monotonic() - t0 < 4


def test_cli_passes_the_new_limits(monkeypatch, backend, capsys):
    from fastapi.testclient import TestClient

    seen = {}
    monkeypatch.setattr(srv, "load_backend", lambda path, which, threads: backend)
    monkeypatch.setattr(srv, "serve", lambda app, sock, log_level: seen.update(app=app))
    rc, err = _cli(["serve", "runs/x", "--port", "0", "--max-image-pixels", "1000", "--request-timeout", "2.5"],
                   capsys)
    assert rc == 0, err
    assert seen["app"].state.request_timeout == 2.5
    with TestClient(seen["app"]) as c:
        assert c.get("/metadata").json()["uploads"]["max_image_pixels"] == 1000
    for flag in ("--max-image-pixels", "--request-timeout"):
        rc, err = _cli(["serve", "runs/x", "--port", "0", flag, "0"], capsys)
        assert rc == 2 and flag in err
