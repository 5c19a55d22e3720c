"""Peak resident memory of `lamina serve` under concurrent uploads of decompression-bomb images (issue 14).

A server process starts on 127.0.0.1 (a free port) with a small CNN for (3, 28, 28) images (random weights:
memory, not accuracy, is measured) and the default limits of `lamina serve`. The client sends `--uploads`
(32) concurrent POST /predict multipart uploads of one RGB PNG of 13000 x 13000 pixels (about 0.5 MB of file,
0.5 GB of pixels once decoded), then the same number of small valid PNGs (the server must still answer them),
and reads the server's peak resident set (VmHWM in /proc/PID/status) after each phase.

For comparison, a second server with the pixel limit lifted and no decode bound (`max_image_pixels=10**12`,
`max_decodes=64`, i.e. how the server behaved before) gets only `--lifted-uploads` (3) bombs at once: 32 would
need tens of GB on a shared machine. Every request is bounded (one per client thread, 180 s timeout).

    python benchmarks/serve_upload_memory.py [--uploads 32] [--lifted-uploads 3] [--size 13000]

Prints a table and writes benchmarks/results/serve_upload_memory.json (with the load average before/after).
"""

import argparse
import io
import os
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import print_table, write_result

ROOT = Path(__file__).resolve().parent.parent

SERVER = r"""
import sys, torch, torch.nn as nn
from lamina.data.facts import DataFacts
from lamina.deploy.serve import TorchBackend, bind_socket, create_app, serve
torch.set_num_threads(1)
kw = eval(sys.argv[1])
facts = DataFacts.from_dict({"name": "bench", "task": "classification", "input_shape": [3, 28, 28],
                             "num_classes": 10, "num_outputs": 10, "class_names": [str(i) for i in range(10)],
                             "meta": {"image_size": [28, 28], "grayscale": False}})
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                      nn.Linear(256, 10))
app = create_app(TorchBackend(model, facts, model_name="bench_cnn", source="bench"), **kw)
sock = bind_socket("127.0.0.1", 0)
print(sock.getsockname()[1], flush=True)
serve(app, sock, log_level="error")
"""


def bomb_png(side: int) -> bytes:
    """A valid all-black RGB PNG of side x side pixels, compressed row by row (never held decoded here)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\x00" * (3 * side + 1)
    idat = b"".join([z.compress(row) for _ in range(side)] + [z.flush()])
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def small_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (28, 28), (120, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


def mib(pid: int, key: str) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0  # kB
    return float("nan")


class ServerProcess:
    def __init__(self, **kw):
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, repr(kw)], stdout=subprocess.PIPE, env=env,
                                     text=True)
        self.port = int(self.proc.stdout.readline())
        self.url = f"http://127.0.0.1:{self.port}"
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def send_concurrently(url: str, body: bytes, name: str, n: int) -> tuple[dict, float]:
    """n uploads at once, one per thread: ({status: count}, seconds)."""
    import httpx

    def one(_):
        try:
            with httpx.Client(timeout=180) as c:
                return c.post(url + "/predict", files={"file": (name, body, "image/png")}).status_code
        except httpx.TransportError as e:
            return type(e).__name__

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        codes = list(pool.map(one, range(n)))
    counts: dict = {}
    for c in codes:
        counts[str(c)] = counts.get(str(c), 0) + 1
    return counts, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--uploads", type=int, default=32)
    ap.add_argument("--lifted-uploads", type=int, default=3, help="bombs sent to the server without limits (0: skip)")
    ap.add_argument("--size", type=int, default=13000, help="side of the bomb image in pixels")
    a = ap.parse_args()
    load_before = os.getloadavg()
    bomb = bomb_png(a.size)
    ok = small_png()
    rows, records = [], []

    def record(server, phase, n, counts, seconds):
        peak, now = mib(server.proc.pid, "VmHWM"), mib(server.proc.pid, "VmRSS")
        rows.append([phase, n, " ".join(f"{k}x{v}" for k, v in sorted(counts.items())) or "-", seconds, peak, now])
        records.append({"phase": phase, "requests": n, "answers": counts, "seconds": round(seconds, 3),
                        "peak_rss_mib": round(peak, 1), "rss_mib": round(now, 1)})

    s = ServerProcess()  # the defaults of `lamina serve`
    try:
        record(s, "idle (default limits)", 0, {}, 0.0)
        counts, sec = send_concurrently(s.url, bomb, "bomb.png", a.uploads)
        record(s, f"{a.uploads} x {a.size}^2 RGB PNG at once", a.uploads, counts, sec)
        counts, sec = send_concurrently(s.url, ok, "ok.png", a.uploads)
        record(s, f"then {a.uploads} x 28^2 PNG at once", a.uploads, counts, sec)
    finally:
        s.close()
    if a.lifted_uploads:
        s = ServerProcess(max_image_pixels=10 ** 12, max_decodes=64)  # the behaviour before the limits
        try:
            record(s, "idle (no pixel limit, no decode bound)", 0, {}, 0.0)
            counts, sec = send_concurrently(s.url, bomb, "bomb.png", a.lifted_uploads)
            record(s, f"{a.lifted_uploads} x {a.size}^2 RGB PNG at once", a.lifted_uploads, counts, sec)
        finally:
            s.close()
    load_after = os.getloadavg()
    print(f"bomb: {len(bomb) / 1e6:.2f} MB file, {a.size}x{a.size} RGB = {3 * a.size * a.size / 2 ** 30:.2f} GiB "
          f"decoded; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print_table(["phase", "requests", "answers", "seconds", "peak RSS MiB", "RSS MiB"], rows)
    write_result("serve_upload_memory", {"bomb_file_bytes": len(bomb), "bomb_side": a.size, "uploads": a.uploads,
                                         "lifted_uploads": a.lifted_uploads, "rows": records,
                                         "load_average_before": [round(x, 2) for x in load_before],
                                         "load_average_after": [round(x, 2) for x in load_after]})


if __name__ == "__main__":
    main()
