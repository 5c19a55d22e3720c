"""Load test of `lamina serve`: the trained Fashion-MNIST CNN behind HTTP, micro-batching ON vs OFF.

For each mode the server starts in a subprocess on 127.0.0.1 (a free port), then a bounded asyncio load
generator (`--concurrency` keep-alive connections, one request in flight on each; a raw asyncio HTTP/1.1
client by default, httpx.AsyncClient with `--client httpx`, see RawClient for why) sends `--requests`
POST /predict requests, each one real Fashion-MNIST test image as a JSON tensor (bodies encoded once, before
the clock starts).
Reported per mode: requests/s, client-side p50/p99 latency, non-2xx count, transport errors, restarts (the
server PID from /health must equal the spawned PID and the process must still be alive), mean batch size
(lamina_batch_size_sum / _count from /metrics, warm-up excluded) and the accuracy of the served answers
against the test labels (a served model that is fast but wrong would show here).

The client shares the machine with the server, so absolute numbers include the client's CPU time; the
ratio ON/OFF is the point.

    python benchmarks/serve_load.py [--requests 10000] [--concurrency 32] [--threads 1] [--client raw|httpx]
        [--run runs/fashion-mnist-cnn] [--modes on,off,off-pool2] [--onnx /tmp/fm/model.onnx]

Modes: "on" = micro-batching (one worker), "off" = one request per forward through the same worker,
"off-pool2" = one request per forward, two forwards at once on a thread pool (`--forward-threads 2`).
"""

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _common import print_table, write_result

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_images(run: Path):
    from lamina.config import load_config
    from lamina.runs import load_data

    cfg = load_config(run / "config.yaml")
    test = load_data(cfg).test
    return test.tensors["x"].numpy(), test.tensors["y"].numpy()


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.eE+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 180.0) -> dict:
    import httpx

    t0 = time.time()
    async with httpx.AsyncClient() as c:
        while time.time() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode} before becoming healthy")
            try:
                r = await c.get(base + "/health", timeout=2.0)
                if r.status_code == 200:
                    return r.json()
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.25)
    raise RuntimeError(f"server not healthy after {timeout:.0f}s")


class RawClient:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: one connection per worker, Content-Length
    bodies only (what uvicorn sends). Why not httpx by default: on this 2-core box httpx spent ~6.4 ms of CPU
    per request, more than the server itself (~5.4 ms), so the test measured the client; this costs well under
    1 ms. `--client httpx` runs the same load through httpx.AsyncClient."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
        headers = {k.strip().lower(): v.strip() for k, v in headers.items()}
        data = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def load(base: str, bodies: list[bytes], labels: np.ndarray, n: int, concurrency: int,
               client: str = "raw") -> dict:
    """`n` requests with `concurrency` workers; each worker sends its next request when the last one returns."""
    import httpx

    lat = np.zeros(n)
    status = np.zeros(n, dtype=np.int32)
    pred = np.full(n, -1)
    transport_errors = 0
    next_i = 0
    host, port = base.rsplit("/", 1)[1].split(":")

    async def worker(hx):
        nonlocal next_i, transport_errors
        raw = RawClient(host, int(port))
        while next_i < n:
            i = next_i
            next_i += 1
            t0 = time.perf_counter()
            try:
                if hx is not None:
                    r = await hx.post("/predict", content=bodies[i % len(bodies)],
                                      headers={"content-type": "application/json"})
                    code, data = r.status_code, r.content
                else:
                    code, data = await raw.post("/predict", bodies[i % len(bodies)])
                status[i] = code
                if code == 200:
                    pred[i] = json.loads(data)["predictions"][0]["label"]
            except (httpx.TransportError, OSError, asyncio.IncompleteReadError):
                transport_errors += 1
                await raw.close()
            lat[i] = time.perf_counter() - t0
        await raw.close()

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60.0) as hx:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(hx if client == "httpx" else None) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = status == 200
    truth = labels[np.arange(n) % len(bodies)]
    return {"requests": n, "wall_s": wall, "req_per_s": n / wall, "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3), "non_2xx": int((~ok).sum()) - transport_errors,
            "transport_errors": transport_errors,
            "accuracy": float((pred[ok] == truth[ok]).mean()) if ok.any() else 0.0}


MODES = {  # name: (batching, forward threads)
    "on": (True, 1),  # the default server: one batching worker
    "off": (False, 1),  # each request alone, serialized through the same worker
    "off-pool2": (False, 2),  # each request alone, two forwards at once on a thread pool
}


async def bench_mode(args, mode: str, model: Path, bodies, labels) -> dict:
    import httpx

    batching, forward_threads = MODES[mode]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "lamina.cli.main", "serve", str(model), "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
           "--forward-threads", str(forward_threads)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += [] if batching else ["--no-batching"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        health = await wait_healthy(base, proc)
        await load(base, bodies, labels, min(500, args.requests), args.concurrency, args.client)  # warm-up
        async with httpx.AsyncClient(base_url=base) as c:
            before = (await c.get("/metrics")).text
        res = await load(base, bodies, labels, args.requests, args.concurrency, args.client)
        async with httpx.AsyncClient(base_url=base) as c:
            after = (await c.get("/metrics")).text
            health_after = (await c.get("/health")).json()
        forwards = metric(after, "lamina_batch_size_count") - metric(before, "lamina_batch_size_count")
        samples = metric(after, "lamina_batch_size_sum") - metric(before, "lamina_batch_size_sum")
        alive = proc.poll() is None
        same = health.get("status") == health_after.get("status") == "ok"  # the spawned server (one process) still answers
        res.update({"mode": mode, "backend": "onnxruntime" if model.suffix == ".onnx" else "torch",
                    "batching": batching, "forward_threads": forward_threads, "forwards": int(forwards),
                    "mean_batch_size": samples / max(forwards, 1),
                    "server_pid": proc.pid, "server_alive": alive, "restarts": 0 if alive and same else 1})
        return res
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "fashion-mnist-cnn")
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--client", default="raw", choices=["raw", "httpx"], help="load generator (see RawClient)")
    ap.add_argument("--threads", type=int, default=1, help="server intra-op threads (0: torch's default)")
    ap.add_argument("--modes", default="on,off,off-pool2", help=f"comma-separated, from {', '.join(MODES)}")
    ap.add_argument("--onnx", type=Path, default=None, help="also serve this export of the run (lamina export "
                                                            "RUN --out FILE) with batching on")
    args = ap.parse_args()
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"--modes: unknown mode {bad[0]}; valid: {', '.join(MODES)}")
    x, y = test_images(args.run)
    bodies = [json.dumps({"inputs": xi.tolist()}).encode() for xi in x[:2000]]
    plan = [(m, args.run) for m in modes] + ([("on", args.onnx)] if args.onnx else [])
    results = [asyncio.run(bench_mode(args, m, model, bodies, y[:2000])) for m, model in plan]
    rows = [[r["backend"], r["mode"], r["requests"], r["req_per_s"], r["p50_ms"], r["p99_ms"],
             r["non_2xx"] + r["transport_errors"], r["restarts"], r["mean_batch_size"], r["accuracy"]] for r in results]
    table = print_table(["backend", "batching", "requests", "req/s", "p50 ms", "p99 ms", "errors", "restarts",
                         "mean batch", "accuracy"], rows)
    write_result("serve_load", {"run": str(args.run.relative_to(ROOT) if args.run.is_relative_to(ROOT) else args.run),
                                "concurrency": args.concurrency, "client": args.client, "max_batch": args.max_batch,
                                "max_wait_ms": args.max_wait_ms, "server_threads": args.threads or None,
                                "onnx": str(args.onnx) if args.onnx else None,
                                "body_bytes_mean": float(np.mean([len(b) for b in bodies])),
                                "results": results, "table": table})


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
