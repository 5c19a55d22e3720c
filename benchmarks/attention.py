"""Attention: PyTorch's fused SDPA vs the explicit softmax(Q K^T / sqrt(d)) V, time and peak memory by length.

Paths, all on q, k, v of shape (B, H, L, D) (default B=1, H=8, D=64, fp32, as in shared/ANCHORS.md):
* SDPA: `torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=...)`, what lamina's
  `MultiHeadAttention` calls (on CPU it picks the flash kernel: blockwise online softmax, no L x L matrix).
* explicit: `lamina.nn.attention.reference_attention(q, k, v, causal=...)`, which materializes the (B, H, L, L)
  score matrix, its softmax (and, causal, a masked copy) before multiplying by v.
* with `--mha`, two more columns: lamina's `MultiHeadAttention` module (q/k/v/out projections + SDPA) and the
  same four Linear layers + SDPA written out by hand with the same weights, to show what the module adds.

Time: per length, one warm-up call of every path, then `repeats` rounds in which the paths run interleaved;
the table shows medians. Long lengths get fewer rounds (repeats * 1024 / L, at least `--min-repeats`).
`--backward` times forward + backward (grad of a fixed random upstream gradient) instead of forward only
(forward-only runs under torch.no_grad()).

Peak memory: on CUDA, torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus what was
allocated before the call. On CPU, torch keeps no allocator statistics and tracemalloc does not see its
allocations, so each (path, length) runs once in a FRESH subprocess: it warms the kernels up on a tiny input,
allocates the inputs, resets the process's resident-set high-water mark (writing "5" to /proc/self/clear_refs
sets VmHWM back to the current VmRSS, Linux >= 4.0), runs the call once and reads VmHWM from
/proc/self/status. Peak = VmHWM - VmRSS before the call: every page the call touched at its worst moment,
including the output (and, with --backward, the input gradients), which both paths share. A fresh process
means no freed-but-cached heap memory can hide an allocation. If clear_refs cannot be written, the child
falls back to ru_maxrss - VmRSS and says so (then the import's own peak can mask a small call's peak).

A length is skipped for a path when its predicted peak exceeds `--mem-budget-gb` (default 8): the prediction
is the measured peak at the previous length scaled by (L / L_prev)^2, or, for the first length, 6 (forward)
or 9 (forward + backward) score matrices of B*H*L*L floats.

    python benchmarks/attention.py [--lengths 512 1024 2048 4096 8192] [--causal] [--backward]
                                   [--repeats 7] [--mem-budget-gb 8] [--mha] [--device cpu|cuda] [--threads N]

Results go to results/attention[_causal][_backward][_threadsN].json. On a machine shared with other jobs,
torch's OpenMP threads spin at barriers while a core is taken, and 2-thread times can swing by several x
(at L=512 here: explicit 6.9 ms with 1 thread, 48.7 ms with 2, under a load average of ~4); the 1-minute
load average before and after the run is printed and saved so a reader can tell. `--threads 1` is the
steadier measurement there.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from _common import median, peak_rss_mib, print_table, write_result
from lamina.nn.attention import MultiHeadAttention, reference_attention

MiB = 2**20
DEFAULT_THREADS = torch.get_num_threads()


# ----------------------------------------------------------------------------------------------- the calls
def make_inputs(args, L, device, grad, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (args.batch, args.heads, L, args.head_dim)
    q, k, v = (torch.randn(shape, generator=g).to(device).requires_grad_(grad) for _ in range(3))
    x = torch.randn(args.batch, L, args.heads * args.head_dim, generator=g).to(device).requires_grad_(grad)
    go = torch.randn(shape, generator=g).to(device)
    gx = torch.randn(args.batch, L, args.heads * args.head_dim, generator=g).to(device)
    return {"q": q, "k": k, "v": v, "x": x, "go": go, "gx": gx}


class HandProjSDPA(nn.Module):
    """The four Linear layers of a MultiHeadAttention + SDPA, written out; weights copied from `mha`."""

    def __init__(self, mha: MultiHeadAttention):
        super().__init__()
        self.mha, self.nh, self.hs = mha, mha.n_head, mha.head_dim

    def forward(self, x):
        m, (B, T, C) = self.mha, x.shape
        q = F.linear(x, m.q_proj.weight, m.q_proj.bias).view(B, T, self.nh, self.hs).transpose(1, 2)
        k = F.linear(x, m.k_proj.weight, m.k_proj.bias).view(B, T, self.nh, self.hs).transpose(1, 2)
        v = F.linear(x, m.v_proj.weight, m.v_proj.bias).view(B, T, self.nh, self.hs).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=m.causal)
        return F.linear(y.transpose(1, 2).reshape(B, T, C), m.out_proj.weight, m.out_proj.bias)


def make_call(path, args, inp, device):
    """A zero-argument function running one forward (or forward + backward) of `path` on `inp`."""
    causal = args.causal
    if path == "sdpa":
        fwd = lambda: F.scaled_dot_product_attention(inp["q"], inp["k"], inp["v"], is_causal=causal)  # noqa: E731
        go = inp["go"]
    elif path == "explicit":
        fwd = lambda: reference_attention(inp["q"], inp["k"], inp["v"], causal=causal)  # noqa: E731
        go = inp["go"]
    else:
        torch.manual_seed(0)
        mha = MultiHeadAttention(args.heads * args.head_dim, args.heads, causal=causal).to(device)
        mod = mha if path == "mha" else HandProjSDPA(mha)
        fwd = lambda: mod(inp["x"])  # noqa: E731
        go = inp["gx"]
    leaves = [inp[k] for k in ("q", "k", "v", "x")] + (list(mha.parameters()) if path in ("mha", "hand_proj_sdpa")
                                                        else [])

    if args.backward:
        def call():
            fwd().backward(go)
            for t in leaves:
                t.grad = None
    else:
        def call():
            with torch.no_grad():
                fwd()
    return call


def time_interleaved(calls: dict, live: list, reps: int, sync, res: dict) -> None:
    """`reps` rounds of every live path, the order alternating so drift hits every path alike; each call's
    seconds go to res[path]["times_s"]."""
    for r in range(reps):
        for p in (live if r % 2 == 0 else live[::-1]):
            t0 = time.perf_counter()
            calls[p]()
            sync()
            res[p]["times_s"].append(time.perf_counter() - t0)


def sync_fn(device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


# ----------------------------------------------------------------------------------------------- memory
def child_peak(args):
    """Runs in a fresh process: one call of (path, L) on the CPU, prints {"peak_mib": ..., "method": ...}."""
    torch.set_num_threads(args.threads)
    path, L = args._child_path, args._child_len
    tiny = make_inputs(args, 64, torch.device("cpu"), args.backward)
    make_call(path, args, tiny, torch.device("cpu"))()  # load kernels, thread pools, oneDNN caches
    inp = make_inputs(args, L, torch.device("cpu"), args.backward)
    call = make_call(path, args, inp, torch.device("cpu"))
    del tiny
    gc.collect()
    peak_mib, method = peak_rss_mib(call)
    print(json.dumps({"peak_mib": peak_mib, "method": method}))


def measure_peak(path, L, args, device):
    """Peak extra memory (MiB) of one call; CUDA in-process, CPU in a fresh subprocess (see the docstring)."""
    if device.type == "cuda":
        inp = make_inputs(args, L, device, args.backward)
        call = make_call(path, args, inp, device)
        call()  # warm-up (cuBLAS workspaces, kernel selection) outside the measurement
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / MiB, "torch.cuda.max_memory_allocated"
    cmd = [sys.executable, __file__, "--_child-path", path, "--_child-len", str(L), "--threads", str(args.threads),
           "--batch", str(args.batch), "--heads", str(args.heads), "--head-dim", str(args.head_dim)]
    cmd += ["--causal"] * args.causal + ["--backward"] * args.backward
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
    if out.returncode != 0:
        raise RuntimeError(f"memory child for {path} L={L} failed:\n{out.stderr[-2000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return res["peak_mib"], f"fresh subprocess, {res['method']}"


# ----------------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--causal", action="store_true", help="causal mask (default: none)")
    ap.add_argument("--backward", action="store_true", help="time forward + backward instead of forward only")
    ap.add_argument("--repeats", type=int, default=7, help="rounds at L <= 1024; scaled by 1024 / L above")
    ap.add_argument("--min-repeats", type=int, default=3)
    ap.add_argument("--mem-budget-gb", type=float, default=8.0, help="skip a path at a length predicted above this")
    ap.add_argument("--mha", action="store_true", help="add lamina MultiHeadAttention and hand proj+SDPA columns")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                    help="torch intra-op threads (default: torch's); a non-default value goes into the JSON's name")
    ap.add_argument("--_child-path", dest="_child_path", help=argparse.SUPPRESS)
    ap.add_argument("--_child-len", dest="_child_len", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child_path:
        return child_peak(args)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = sync_fn(device)
    paths = ["sdpa", "explicit"] + (["mha", "hand_proj_sdpa"] if args.mha else [])
    B, H, D = args.batch, args.heads, args.head_dim
    n_mat = 9 if args.backward else 6  # first-length guess, in score matrices
    budget_mib = args.mem_budget_gb * 1024

    # parity at the smallest length: the two attention paths must agree before their times mean anything
    L0 = min(args.lengths)
    inp = make_inputs(args, L0, device, False)
    with torch.no_grad():
        diff = (F.scaled_dot_product_attention(inp["q"], inp["k"], inp["v"], is_causal=args.causal)
                - reference_attention(inp["q"], inp["k"], inp["v"], causal=args.causal)).abs().max().item()
    del inp

    results, last_peak = {}, {}
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    for L in args.lengths:
        score_mib = B * H * L * L * 4 / MiB
        res = {p: {"skipped": None, "times_s": [], "peak_mib": None} for p in paths}
        for p in paths:
            pred = (last_peak[p][1] * (L / last_peak[p][0]) ** 2 if p in last_peak else n_mat * score_mib)
            if pred > budget_mib:
                res[p]["skipped"] = f"predicted peak {pred / 1024:.3g} GB > budget {args.mem_budget_gb:g} GB"
                continue
            peak, method = measure_peak(p, L, args, device)
            res[p]["peak_mib"], res[p]["mem_method"] = peak, method
            last_peak[p] = (L, max(peak, 1e-3))
        live = [p for p in paths if res[p]["skipped"] is None]
        inp = make_inputs(args, L, device, args.backward)
        calls = {p: make_call(p, args, inp, device) for p in live}
        for p in live:  # warm-up
            calls[p]()
            sync()
        reps = max(args.min_repeats, min(args.repeats, args.repeats * 1024 // L))
        time_interleaved(calls, live, reps, sync, res)
        del inp, calls
        gc.collect()
        for p in live:
            res[p]["median_ms"] = median(res[p]["times_s"]) * 1e3
        results[L] = {"score_matrix_mib": score_mib, "repeats": reps, "paths": res}
        print(f"L={L}: " + ", ".join(f"{p} {res[p]['median_ms']:.1f} ms / {res[p]['peak_mib']:.0f} MiB"
                                    if res[p]["skipped"] is None else f"{p} skipped" for p in paths), flush=True)
    wall = time.perf_counter() - t_start
    load_after = os.getloadavg()

    def fmt(p, L, key):
        r = results[L]["paths"][p]
        return "skipped" if r["skipped"] else r[key]

    rows = []
    for L in args.lengths:
        r = results[L]["paths"]
        s, e = r["sdpa"], r["explicit"]
        both = s["skipped"] is None and e["skipped"] is None
        t_ratio = e["median_ms"] / s["median_ms"] if both else "-"
        m_ratio = e["peak_mib"] / max(s["peak_mib"], 1e-3) if both else "-"
        row = [L, results[L]["repeats"], fmt("sdpa", L, "median_ms"), fmt("explicit", L, "median_ms"), t_ratio,
               fmt("sdpa", L, "peak_mib"), fmt("explicit", L, "peak_mib"), m_ratio, results[L]["score_matrix_mib"]]
        if args.mha:
            row += [fmt("mha", L, "median_ms"), fmt("hand_proj_sdpa", L, "median_ms")]
        notes = [f"{p}: {r[p]['skipped']}" for p in paths if r[p]["skipped"]]
        rows.append(row + ["; ".join(notes) or ""])
        results[L]["time_ratio"] = t_ratio if both else None
        results[L]["mem_ratio"] = m_ratio if both else None
    headers = ["L", "reps", "SDPA ms", "explicit ms", "time x", "SDPA MiB", "explicit MiB", "mem x", "LxL MiB"]
    headers += ["MHA ms", "hand proj+SDPA ms"] if args.mha else []
    headers += ["note"]
    mode = "forward+backward" if args.backward else "forward"
    method = next((r["mem_method"] for v in results.values() for r in v["paths"].values() if r.get("mem_method")),
                  "-")
    print(f"\nattention B={B} H={H} D={D} fp32 {'causal' if args.causal else 'non-causal'}, {mode}, "
          f"{device.type} {args.threads} thread{'s' if args.threads > 1 else ''}; medians; "
          f"time x / mem x = explicit / SDPA; "
          f"peak memory: {method}; max |SDPA - explicit| at L={L0}: {diff:.2e}")
    table = print_table(headers, rows)
    print(f"(benchmark wall time {wall:.0f} s; 1-min load average {load_before[0]:.1f} -> {load_after[0]:.1f})")
    name = "attention" + ("_causal" if args.causal else "") + ("_backward" if args.backward else "")
    name += f"_threads{args.threads}" if args.threads != DEFAULT_THREADS else ""
    write_result(name, {"config": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                        "mode": mode, "mem_method": method, "parity_max_abs_diff": diff, "wall_s": wall,
                        "loadavg_before_after": [load_before, load_after],
                        "table": table, "results": {str(L): v for L, v in results.items()}})


if __name__ == "__main__":
    main()
