"""lamina serve: parity with a direct forward, micro-batching, bad requests under load, limits, metrics, CLI.

The model: a small MLP classifier trained for 100 full-batch steps on scikit-learn's 8x8 digits (real images,
a few seconds on a shared core), behind a normalize transform so the tests also check that the server applies
the run's eval transforms. Servers run under a real uvicorn on a free port in a thread, so requests go through
HTTP exactly as in production (Content-Length checks, chunked bodies, keep-alive, concurrency).
"""

import io
import json
import re
import socket
import threading
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from lamina.data.transforms import eval_transforms  # noqa: E402
from lamina.deploy.serve import OnnxBackend, TorchBackend, bind_socket, create_app  # noqa: E402

from lamina.data.facts import DataFacts  # noqa: E402

CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FACTS = {"name": "digits", "task": "classification", "input_shape": [1, 8, 8], "num_classes": 10, "num_outputs": 10,
         "class_names": CLASSES, "meta": {"image_size": [8, 8], "grayscale": True}}  # as an ONNX file's metadata holds them
TYPED = DataFacts.from_dict(FACTS)  # as a run's open_run gives them
NORM = [{"name": "normalize", "mean": 0.3, "std": 0.4}]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny forwards: a second intra-op thread only adds synchronization, and on a shared CPU a descheduled
    # OpenMP thread stalls every step (100 training steps took 21 s with 2 threads, 2.7 s with 1).
    torch.set_num_threads(1)  # conftest's _fixed_threads restores the count afterwards


@pytest.fixture(scope="module")
def digits():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8) in [0, 1]
    return x, d.target


@pytest.fixture(scope="module")
def model(digits):
    x, y = digits
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module scope runs before the function-scoped _one_thread
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    xt = eval_transforms(NORM)({"x": torch.from_numpy(x[:1200])})["x"]
    yt = torch.from_numpy(y[:1200]).long()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(100):
        loss = nn.functional.cross_entropy(m(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return m.eval()


def direct(model, x: np.ndarray) -> np.ndarray:
    """What the server must answer: softmax(model(normalize(x))), one forward, no server involved."""
    with torch.inference_mode():
        return model(eval_transforms(NORM)({"x": torch.from_numpy(x)})["x"]).softmax(-1).numpy()


class Server:
    """create_app(backend, **kw) under uvicorn on 127.0.0.1:<free port>, in a daemon thread."""

    def __init__(self, backend, **kw):
        import uvicorn

        self.app = create_app(backend, **kw)
        self.sock = bind_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="error", access_log=False))
        self.ready = threading.Event()  # set once uvicorn has started listening, or once its thread has ended
        startup = self.server.startup

        async def startup_then_signal(sockets=None):
            await startup(sockets=sockets)
            self.ready.set()

        self.server.startup = startup_then_signal
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.ready.set()  # a failed start must not leave __enter__ waiting for its whole deadline

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(30) and self.server.started, "server did not start"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics").text


def metric(text: str, series: str) -> float:
    m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    assert m, f"{series} missing from /metrics"
    return float(m.group(1))


@pytest.fixture()
def backend(model):
    return TorchBackend(model, TYPED, eval_transforms(NORM), model_name="tiny_mlp", source="test")


def post(client, x) -> httpx.Response:
    return client.post("/predict", json={"inputs": np.asarray(x).tolist()})


def check_rows(rows: list[dict], want: np.ndarray) -> None:
    assert len(rows) == len(want)
    for row, p in zip(rows, want):
        assert np.abs(np.asarray(row["probabilities"]) - p).max() < 1e-5
        assert row["label"] == int(p.argmax()) and row["class"] == CLASSES[row["label"]]
        assert row["confidence"] == pytest.approx(float(p.max()), abs=1e-5)


# ----------------------------------------------------------------------------------------------- parity, batching
def test_parity_and_batching_under_concurrent_load(backend, model, digits):
    x, _ = digits
    want = direct(model, x[:320])
    errors: list = []
    with Server(backend, max_batch=16, max_wait_ms=20) as s:

        def client(k: int) -> None:
            with httpx.Client(base_url=s.url, timeout=30) as c:
                for i in range(k, 320, 8):  # 8 threads x 40 single-sample requests
                    r = post(c, x[i])
                    try:
                        assert r.status_code == 200, r.text
                        check_rows(r.json()["predictions"], want[i:i + 1])
                    except AssertionError as e:
                        errors.append(e)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        with httpx.Client(base_url=s.url) as c:  # a batch in one request, and one sample without the batch axis
            r = post(c, x[:5])
            check_rows(r.json()["predictions"], want[:5])
            check_rows(post(c, x[7]).json()["predictions"], want[7:8])
        text = s.metrics()
    forwards = metric(text, "lamina_batch_size_count")
    samples = metric(text, "lamina_batch_size_sum")
    assert samples == 320 + 5 + 1
    assert samples / forwards > 1.5, f"mean batch size {samples / forwards:.2f}: requests were not batched"
    assert metric(text, 'lamina_batch_size_bucket{le="16"}') == forwards  # never above max_batch
    assert metric(text, 'lamina_requests_total{route="/predict",status="200"}') == 322


def check_concurrently(url: str, x, want, n: int, workers: int) -> None:
    """Samples 0..n-1 sent one per request from `workers` client threads; every answer must match `want`
    (a failed check in any thread fails the test: futures re-raise)."""
    from concurrent.futures import ThreadPoolExecutor

    def client(k):
        with httpx.Client(base_url=url, timeout=30) as c:
            for i in range(k, n, workers):
                check_rows(post(c, x[i]).json()["predictions"], want[i:i + 1])

    with ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(client, k) for k in range(workers)]:
            f.result()


@pytest.mark.parametrize("forward_threads", [1, 2])
def test_no_batching_runs_each_request_alone(backend, model, digits, forward_threads):
    x, _ = digits
    want = direct(model, x[:64])
    with Server(backend, batching=False, forward_threads=forward_threads) as s:
        check_concurrently(s.url, x, want, 64, workers=4)
        text = s.metrics()
    assert metric(text, "lamina_batch_size_count") == metric(text, "lamina_batch_size_sum") == 64


def test_image_upload_matches_lamina_predict(backend, model, digits, tmp_path):
    from PIL import Image

    from lamina.data.inputs import read_inputs

    x, _ = digits
    files = []
    for i in range(3):
        p = tmp_path / f"d{i}.png"
        Image.fromarray((x[i, 0] * 255).round().astype(np.uint8), mode="L").resize((16, 16)).save(p)
        files.append(p)
    ref, _ = read_inputs([str(p) for p in files], TYPED)  # the tensors `lamina predict` would build
    want = direct(model, ref["x"].numpy())
    with Server(backend) as s, httpx.Client(base_url=s.url) as c:
        up = [("file", (p.name, p.read_bytes(), "image/png")) for p in files]
        r = c.post("/predict", files=up)
        assert r.status_code == 200, r.text
        check_rows(r.json()["predictions"], want)
        buf = io.BytesIO()
        np.save(buf, x[:2])
        r = c.post("/predict", files={"file": ("batch.npy", buf.getvalue(), "application/octet-stream")})
        check_rows(r.json()["predictions"], direct(model, x[:2]))


# ----------------------------------------------------------------------------------------------- bad requests
class _Chunks:
    """A re-iterable body of n KiB: httpx sends it chunked, without Content-Length."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        return iter([b"[" * 1024] * self.n)


def malformed_requests(x: np.ndarray):
    """(name, request kwargs, expected status, a word the message must contain)."""
    js = {"content-type": "application/json"}
    sample = x[0].tolist()
    nan = json.dumps({"inputs": sample}).replace("0.0", "NaN", 1)
    assert "NaN" in nan
    png_bytes = io.BytesIO()
    from PIL import Image

    Image.new("L", (8, 8)).save(png_bytes, format="PNG")
    return [
        ("invalid JSON", dict(method="POST", url="/predict", content=b'{"inputs": [1,', headers=js), 400,
         "invalid JSON"),
        ("empty body", dict(method="POST", url="/predict", content=b"", headers=js), 400, "empty body"),
        ("wrong shape", dict(method="POST", url="/predict", json={"inputs": [[0.5] * 8] * 7}), 422, "expected shape"),
        ("strings in tensor", dict(method="POST", url="/predict", json={"inputs": [[["a"] * 8] * 8]}), 422, "numbers"),
        ("booleans", dict(method="POST", url="/predict", json={"inputs": [[[True] * 8] * 8]}), 422, "booleans"),
        ("null in tensor", dict(method="POST", url="/predict", json={"inputs": [[[None] + [0.1] * 7] * 8]}), 422,
         "numbers"),
        ("NaN", dict(method="POST", url="/predict", content=nan.encode(), headers=js), 422, "NaN"),
        ("infinity", dict(method="POST", url="/predict", content=nan.replace("NaN", "-Infinity").encode(),
                          headers=js), 422, "infinite"),
        ("beyond float32", dict(method="POST", url="/predict", json={"inputs": [[[1e39] * 8] * 8]}), 422, "float32"),
        ("ragged lists", dict(method="POST", url="/predict", json={"inputs": [[[0.1] * 8] * 7 + [[0.1] * 3]]}), 422,
         "ragged"),
        ("unknown field", dict(method="POST", url="/predict", json={"inputs": sample, "top_k": 3}), 422,
         "unknown field"),
        ("missing inputs", dict(method="POST", url="/predict", json={}), 422, "missing"),
        ("JSON array, not object", dict(method="POST", url="/predict", json=[sample]), 422, "JSON object"),
        ("empty batch", dict(method="POST", url="/predict", json={"inputs": []}), 422, "expected shape"),
        ("too many samples", dict(method="POST", url="/predict", json={"inputs": [sample] * 9}), 422, "at most 8"),
        ("body too large", dict(method="POST", url="/predict", json={"inputs": [sample] * 8, "pad": "x" * 70_000}),
         413, "exceeds"),
        ("chunked body too large", dict(method="POST", url="/predict", content=_Chunks(80), headers=js), 413,
         "exceeds"),
        ("wrong content type", dict(method="POST", url="/predict", content=b"1,2,3",
                                    headers={"content-type": "text/csv"}), 415, "text/csv"),
        ("no content type", dict(method="POST", url="/predict", content=b"abc", headers={"content-type": ""}), 415,
         "content type"),
        ("corrupt image", dict(method="POST", url="/predict",
                               files={"file": ("broken.png", b"\x89PNG not really", "image/png")}), 422,
         "cannot read image"),
        ("non-image upload", dict(method="POST", url="/predict", files={"file": ("notes.txt", b"hello", "text/plain")}),
         415, "unsupported file type"),
        ("form field, no file", dict(method="POST", url="/predict",
                                     content=b'--b\r\nContent-Disposition: form-data; name="inputs"\r\n\r\n1'
                                             b'\r\n--b--\r\n',
                                     headers={"content-type": "multipart/form-data; boundary=b"}), 422,
         "upload files only"),
        ("truncated multipart", dict(method="POST", url="/predict", content=b"--xyz\r\nContent-Disposition: form-da",
                                     headers={"content-type": "multipart/form-data; boundary=xyz"}), None, ""),
        ("wrong route", dict(method="POST", url="/predictions", json={"inputs": sample}), 404, "no route"),
        ("wrong method", dict(method="GET", url="/predict"), 405, "use POST"),
        ("PUT on /health", dict(method="PUT", url="/health"), 405, "use GET"),
    ]


def test_malformed_requests_get_4xx_while_valid_load_keeps_succeeding(backend, model, digits):
    x, _ = digits
    want = direct(model, x[:200])
    stop = threading.Event()
    valid = {"ok": 0, "bad": []}
    with Server(backend, max_batch=8, max_wait_ms=2, max_request_bytes=64_000, max_samples=8) as s:

        def load():
            with httpx.Client(base_url=s.url, timeout=30) as c:
                i = 0
                while not stop.is_set() or valid["ok"] < 50:
                    j = i % 200
                    r = post(c, x[j:j + 2] if i % 3 == 0 else x[j])
                    try:
                        assert r.status_code == 200, r.text
                        check_rows(r.json()["predictions"], want[j:j + 2] if i % 3 == 0 else want[j:j + 1])
                        valid["ok"] += 1
                    except AssertionError as e:
                        valid["bad"].append(e)
                    i += 1

        threads = [threading.Thread(target=load) for _ in range(2)]
        for t in threads:
            t.start()
        kinds = malformed_requests(x)
        with httpx.Client(base_url=s.url, timeout=30) as c:
            for _ in range(2):  # each kind twice: a rejection leaves nothing behind
                for name, req, status, word in kinds:
                    t0 = time.perf_counter()
                    r = c.request(**req)
                    msg = r.json()["error"]
                    if status is None:  # malformed multipart: starlette's parser decides between 400 and 422
                        assert 400 <= r.status_code < 500, (name, r.status_code, msg)
                    else:
                        assert r.status_code == status, (name, r.status_code, msg)
                    assert word in msg and "\n" not in msg and len(msg) < 400, (name, msg)
                    assert time.perf_counter() - t0 < 5, f"{name}: rejection took too long"
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert not valid["bad"], valid["bad"][0]
        assert valid["ok"] >= 50
        assert httpx.get(s.url + "/health").json()["status"] == "ok"
        text = s.metrics()
    assert len(kinds) >= 20
    assert metric(text, 'lamina_requests_total{route="/predict",status="422"}') >= 2 * 12
    assert metric(text, 'lamina_errors_total{kind="too_large"}') == 4
    assert metric(text, 'lamina_requests_total{route="other",status="404"}') == 2


def test_413_is_sent_before_the_body_is_read(backend):
    """A Content-Length over the limit is answered at once: the client has sent headers only."""
    with Server(backend, max_request_bytes=1000) as s:
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as sk:
            sk.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 5000000000\r\n\r\n")
            reply = b""
            while b"}" not in reply:  # headers and the JSON body may arrive in separate segments
                part = sk.recv(4096)
                assert part, reply
                reply += part
            reply = reply.decode()
        assert reply.startswith("HTTP/1.1 413"), reply
        assert "exceeds the limit of 1000 bytes" in reply
        assert httpx.get(s.url + "/health").status_code == 200


# ----------------------------------------------------------------------------------------------- model failure
class Flaky(TorchBackend):
    """Raises inside forward when a sample carries the poison value 7.0 (finite, so it passes validation)."""

    def forward(self, x):
        if (x == 7.0).any():
            raise RuntimeError("poisoned sample\nsecond line")
        return super().forward(x)


def test_model_exception_gives_500_and_neighbours_and_server_survive(model, digits):
    x, _ = digits
    want = direct(model, x[:40])
    poison = x[0].copy()
    poison[0, 0, 0] = 7.0
    backend = Flaky(model, TYPED, eval_transforms(NORM))
    results: dict = {}
    with Server(backend, max_batch=32, max_wait_ms=50) as s:

        def send(i):
            with httpx.Client(base_url=s.url, timeout=30) as c:
                results[i] = post(c, poison if i % 10 == 0 else x[i])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, r in results.items():
            if i % 10 == 0:
                assert r.status_code == 500
                assert r.json()["error"].startswith("model error") and "poisoned" not in r.text  # detail: server log
            else:
                assert r.status_code == 200, r.text
                check_rows(r.json()["predictions"], want[i:i + 1])
        with httpx.Client(base_url=s.url) as c:
            assert c.get("/health").json()["status"] == "ok"
            check_rows(post(c, x[1]).json()["predictions"], want[1:2])
        text = s.metrics()
    assert metric(text, 'lamina_errors_total{kind="model_error"}') == 4
    assert metric(text, 'lamina_requests_total{route="/predict",status="500"}') == 4


class Gated(TorchBackend):
    """A backend whose forwards wait for `release`: requests pile up while the first forward runs."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.entered = 0  # forwards started (each holds one request: batching is off)

    def forward(self, x):
        with self.lock:
            self.entered += 1
        assert self.release.wait(60), "the test never released the gated forward"
        return super().forward(x)


def test_full_queue_answers_503_and_recovers(model, digits):
    x, _ = digits
    codes: list = []
    gated = Gated(model, TYPED, eval_transforms(NORM))
    with Server(gated, batching=False, max_queue=2) as s:
        def send(i):
            with httpx.Client(base_url=s.url, timeout=60) as c:
                r = post(c, x[i])
                codes.append((r.status_code, r.json()))

        threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        # hold the first forward until all 8 requests are accounted for: answered (503), running, or queued
        deadline = time.monotonic() + 60
        try:
            while len(codes) + gated.entered + metric(s.metrics(), "lamina_queue_depth") < 8:
                assert time.monotonic() < deadline, (codes, gated.entered)
                time.sleep(0.005)
        finally:
            gated.release.set()
        for t in threads:
            t.join()
        busy = [body["error"] for code, body in codes if code == 503]
        assert busy and all("server busy" in m and "limit 2" in m for m in busy)
        assert sum(code == 200 for code, _ in codes) >= 3  # one running + two queued at any moment
        with httpx.Client(base_url=s.url, timeout=30) as c:
            assert post(c, x[0]).status_code == 200


# ----------------------------------------------------------------------------------------------- metadata, metrics
def test_metadata_and_metrics(backend, digits):
    x, _ = digits
    with Server(backend, max_batch=12, max_wait_ms=3.5, max_request_bytes=123_456) as s, \
            httpx.Client(base_url=s.url) as c:
        md = c.get("/metadata").json()
        assert md["model"] == "tiny_mlp" and md["backend"] == "torch" and md["task"] == "classification"
        assert md["input"]["shape"] == [1, 8, 8] and md["input"]["dtype"] == "float32"
        assert md["input"]["value_range"] == [0.0, 1.0]
        assert md["class_names"] == CLASSES
        assert md["batching"] == {"enabled": True, "max_batch": 12, "max_wait_ms": 3.5, "max_queue": 4096,
                                  "forward_threads": 1}
        assert md["limits"]["max_request_bytes"] == 123_456
        h = c.get("/health").json()
        assert h["status"] == "ok" and h["queue_depth"] == 0 and "pid" not in h
        post(c, x[:3])
        c.post("/predict", content=b"{", headers={"content-type": "application/json"})
        r = c.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    families = {m: t for m, t in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M)}
    assert families == {"lamina_requests_total": "counter", "lamina_errors_total": "counter",
                        "lamina_request_latency_seconds": "histogram", "lamina_batch_size": "histogram",
                        "lamina_forward_seconds": "histogram", "lamina_queue_depth": "gauge"}
    for line in text.splitlines():  # the exposition grammar: comments, or `name{labels} value`
        assert line.startswith("#") or re.fullmatch(r'[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? \S+', line), line
    assert metric(text, 'lamina_requests_total{route="/predict",status="200"}') == 1
    assert metric(text, 'lamina_requests_total{route="/predict",status="400"}') == 1
    assert metric(text, 'lamina_requests_total{route="/metadata",status="200"}') == 1
    assert metric(text, 'lamina_errors_total{kind="invalid_json"}') == 1
    assert metric(text, "lamina_request_latency_seconds_count") == 2
    assert metric(text, 'lamina_request_latency_seconds_bucket{le="+Inf"}') == 2
    assert metric(text, "lamina_batch_size_sum") == 3 and metric(text, "lamina_batch_size_count") == 1
    assert metric(text, 'lamina_batch_size_bucket{le="2"}') == 0
    assert metric(text, 'lamina_batch_size_bucket{le="4"}') == 1
    assert metric(text, "lamina_queue_depth") == 0
    try:  # the reference parser (test extra) reads the same families, types and values
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        return
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    assert {n: f.type for n, f in parsed.items()} == {"lamina_requests": "counter", "lamina_errors": "counter",
                                                      "lamina_request_latency_seconds": "histogram",
                                                      "lamina_batch_size": "histogram",
                                                      "lamina_forward_seconds": "histogram",
                                                      "lamina_queue_depth": "gauge"}
    sizes = {s.labels.get("le"): s.value for s in parsed["lamina_batch_size"].samples if s.name.endswith("_bucket")}
    assert sizes["2"] == 0 and sizes["4"] == 1 and sizes["+Inf"] == 1


# ----------------------------------------------------------------------------------------------- ONNX
class _OrtRunner:
    """The interface of lamina.deploy.runtime.OnnxRunner (run / metadata / input_names / input_shapes), on
    onnxruntime directly: tests OnnxBackend whether or not the export module is present."""

    def __init__(self, path):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        props = self.session.get_modelmeta().custom_metadata_map
        self.metadata = json.loads(props["lamina"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.input_shapes = [i.shape for i in self.session.get_inputs()]

    def run(self, x):
        return self.session.run(None, {self.input_names[0]: x})[0]


@pytest.fixture()
def onnx_file(model, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    path = tmp_path / "tiny.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter warns that it is legacy; it needs no onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    m = onnx.load(str(path))
    meta = {"model": "tiny_mlp", "facts": FACTS, "input_name": "x", "output_name": "logits",
            "normalize": {"mean": [0.3], "std": [0.4]}, "exporter": "torchscript"}
    m.metadata_props.add(key="lamina", value=json.dumps(meta))
    onnx.save(m, str(path))
    return path


def test_onnx_backend_parity(onnx_file, model, digits):
    x, _ = digits
    want = direct(model, x[:50])
    with Server(OnnxBackend(_OrtRunner(onnx_file), source=str(onnx_file)), max_wait_ms=10) as s:
        check_concurrently(s.url, x, want, 50, workers=5)
        md = httpx.get(s.url + "/metadata").json()
    assert md["backend"] == "onnxruntime" and md["model"] == "tiny_mlp" and md["class_names"] == CLASSES


def test_load_backend_onnx_with_lamina_runtime(onnx_file, model, digits):
    try:
        import lamina.deploy.runtime  # noqa: F401
    except ImportError:
        pytest.skip("lamina.deploy.runtime (OnnxRunner, the ONNX export work) is not in this tree yet")
    from lamina.deploy.serve import load_backend

    x, _ = digits
    b = load_backend(onnx_file)
    assert isinstance(b, OnnxBackend) and b.input_shape == (1, 8, 8)
    np.testing.assert_allclose(b.forward(x[:10]), direct(model, x[:10]), atol=1e-5)


# ----------------------------------------------------------------------------------------------- CLI
def _cli(argv, capsys):
    from lamina.cli.main import main

    try:
        rc = main(argv)
    except SystemExit as e:  # argparse errors
        rc = e.code
    err = capsys.readouterr().err.strip()
    return rc, err


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "x.txt").write_text("hi")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    cases = [
        (["serve", str(tmp_path / "missing"), "--port", "0"], "not found"),
        (["serve", str(tmp_path / "notes"), "--port", "0"], "not a run folder"),
        (["serve", str(tmp_path / "x.txt"), "--port", "0"], "not a run folder"),
        (["serve", str(tmp_path / "gone.onnx"), "--port", "0"], "ONNX file not found"),
        (["serve", str(tmp_path / "notes"), "--port", str(port)], f"--port {port}"),
        (["serve", str(tmp_path / "notes"), "--port", "70000"], "--port"),
        (["serve", str(tmp_path / "notes"), "--max-batch", "0"], "--max-batch"),
        (["serve", str(tmp_path / "notes"), "--max-wait-ms", "-1"], "--max-wait-ms"),
        (["serve", str(tmp_path / "notes"), "--max-request-bytes", "-5"], "--max-request-bytes"),
        (["serve", str(tmp_path / "notes"), "--bogus"], "unrecognized arguments"),
        (["serve", str(tmp_path / "notes"), "--max-batch", "many"], "invalid int value"),
    ]
    try:
        for argv, word in cases:
            rc, err = _cli(argv, capsys)
            assert rc == 2, (argv, rc, err)
            assert word in err and len(err.splitlines()) == 1, (argv, err)
    finally:
        busy.close()


def test_cli_missing_fastapi_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(__import__("sys").modules, "fastapi", None)  # `import fastapi` now raises ImportError
    rc, err = _cli(["serve", str(tmp_path)], capsys)
    assert rc == 2 and 'pip install "lamina[deploy]"' in err and "fastapi" in err


def test_cli_wires_flags_into_the_app(monkeypatch, backend, capsys):
    """cmd_serve end to end, minus the blocking uvicorn loop: the flags reach create_app and the socket."""
    from fastapi.testclient import TestClient

    from lamina.deploy import serve as srv

    seen = {}
    monkeypatch.setattr(srv, "load_backend", lambda path, which, threads: backend)
    monkeypatch.setattr(srv, "serve", lambda app, sock, log_level: seen.update(app=app, port=sock.getsockname()[1]))
    rc, err = _cli(["serve", "runs/x", "--port", "0", "--no-batching", "--max-batch", "4", "--max-wait-ms", "1",
                    "--max-request-bytes", "5000", "--max-samples", "3"], capsys)
    assert rc == 0 and f"127.0.0.1:{seen['port']}" in err
    with TestClient(seen["app"]) as c:
        md = c.get("/metadata").json()
        assert md["batching"]["enabled"] is False and md["batching"]["max_batch"] == 4
        assert md["limits"] == {"max_request_bytes": 5000, "max_samples": 3}
        assert c.post("/predict", json={"inputs": [[[[0.0] * 8] * 8]] * 4}).status_code == 422
