"""Blockwise (flash-style) attention, fused and reference, vs explicit attention vs SDPA: time and peak memory.

Paths, all on q, k, v of shape (B, H, L, D) (default B=1, H=1, D=64, fp32):
* blockwise: `lamina.nn.blockwise_attention(q, k, v, causal=..., block_size=...)` with its default impl="auto",
  which on CPU runs PyTorch's fused flash kernel per (query block, key block) tile, merges the tiles by their
  logsumexp, and in backward calls the kernel's backward against the global out / lse (default block 4096).
* blockwise_ref: the same with impl="reference": pure-PyTorch online softmax over (block x block) score tiles
  (default block 512), custom backward that recomputes the tiles; memory linear in L.
* explicit: `lamina.nn.attention.reference_attention(q, k, v, causal=...)`, which materializes the (B, H, L, L)
  scores, their softmax (and, causal, masked copies), and autograd keeps them for backward.
* sdpa: `torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=...)`, PyTorch's fused kernel
  (on CPU a flash kernel in C++): the bar for speed.

Each (mode, mask) section runs every length: mode `forward` (under torch.no_grad()) and/or `backward`
(forward + backward of a fixed random upstream gradient), mask `none` and/or `causal`.

Time and peak memory are measured exactly as in benchmarks/attention.py (whose helpers this script imports):
medians of interleaved rounds after one warm-up; long lengths get fewer rounds (repeats * 1024 / L, at least
`--min-repeats`). Peak memory on CPU: each (path, length) runs once in a FRESH subprocess, which resets the
resident-set high-water mark through /proc/self/clear_refs and reports VmHWM - VmRSS around the one call (see
attention.py's docstring); on CUDA, torch.cuda.max_memory_allocated.

A path is skipped at a length when its predicted peak exceeds `--mem-budget-gb` (default 12): the prediction
is the path's measured peak at the previous length scaled by (L / L_prev)^2 (quadratic even for the linear
paths, to stay on the safe side), or, for the first length, 6 (forward) or 9 (forward + backward) L x L fp32
score matrices.

    python benchmarks/blockwise_attention.py [--lengths 1024 2048 4096 8192 16384] [--mode forward backward]
        [--mask none causal] [--heads 1] [--block-size 4096] [--ref-block-size 512] [--mem-budget-gb 12]
        [--threads N]

Results go to results/blockwise_attention.json. On a shared machine use `--threads 1`. The 1-minute load
average is recorded before and after the run and at the start of every (section, length); a run or row that
starts with it above the core count is flagged (a warning, and "busy": true in the JSON): its times are suspect.
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
import torch.nn.functional as F

from _common import median, peak_rss_mib, print_table, write_result
from attention import make_inputs, sync_fn, time_interleaved  # same inputs and timing as the attention bench
from lamina.nn import blockwise_attention
from lamina.nn.attention import reference_attention

MiB = 2**20
PATHS = ["blockwise", "blockwise_ref", "explicit", "sdpa"]
CORES = os.cpu_count() or 1


def load_1min(what: str) -> float:
    """The 1-minute load average; warns when it is above the core count (other work competes for the CPU)."""
    load = os.getloadavg()[0]
    if load > CORES:
        print(f"WARNING: 1-min load average {load:.2f} > {CORES} cores at {what}: timings are suspect", flush=True)
    return load


def blockwise_fn(path, args, q, k, v, causal):
    if path == "blockwise":
        return lambda: blockwise_attention(q, k, v, causal=causal, block_size=args.block_size, impl="auto")
    return lambda: blockwise_attention(q, k, v, causal=causal, block_size=args.ref_block_size, impl="reference")


def make_call(path, args, inp, causal, backward):
    """A zero-argument function running one forward (or forward + backward) of `path` on `inp`."""
    q, k, v, go = inp["q"], inp["k"], inp["v"], inp["go"]
    if path in ("blockwise", "blockwise_ref"):
        fwd = blockwise_fn(path, args, q, k, v, causal)
    elif path == "explicit":
        fwd = lambda: reference_attention(q, k, v, causal=causal)  # noqa: E731
    else:
        fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
    if backward:
        def call():
            fwd().backward(go)
            q.grad = k.grad = v.grad = None
    else:
        def call():
            with torch.no_grad():
                fwd()
    return call


# ----------------------------------------------------------------------------------------------- memory
def child_peak(args):
    """Runs in a fresh process: one call of (path, L, mode, mask); prints {"peak_mib": ..., "method": ...}."""
    torch.set_num_threads(args.threads)
    path, L, causal, backward = args._child_path, args._child_len, args._child_causal, args._child_backward
    cpu = torch.device("cpu")
    tiny = make_inputs(args, 64, cpu, backward)
    make_call(path, args, tiny, causal, backward)()  # load kernels, thread pools, oneDNN caches
    inp = make_inputs(args, L, cpu, backward)
    call = make_call(path, args, inp, causal, backward)
    del tiny
    gc.collect()
    peak_mib, method = peak_rss_mib(call)
    print(json.dumps({"peak_mib": peak_mib, "method": method}))


def measure_peak(path, L, args, device, causal, backward):
    """Peak extra memory (MiB) of one call; CUDA in-process, CPU in a fresh subprocess."""
    if device.type == "cuda":
        inp = make_inputs(args, L, device, backward)
        call = make_call(path, args, inp, causal, backward)
        call()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / MiB, "torch.cuda.max_memory_allocated"
    cmd = [sys.executable, __file__, "--_child-path", path, "--_child-len", str(L), "--threads", str(args.threads),
           "--batch", str(args.batch), "--heads", str(args.heads), "--head-dim", str(args.head_dim),
           "--ref-block-size", str(args.ref_block_size)]
    cmd += ["--block-size", str(args.block_size)] if args.block_size else []
    cmd += ["--_child-causal"] * causal + ["--_child-backward"] * backward
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
    if out.returncode != 0:
        raise RuntimeError(f"memory child for {path} L={L} failed:\n{out.stderr[-2000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return res["peak_mib"], f"fresh subprocess, {res['method']}"


# ----------------------------------------------------------------------------------------------- one section
def parity(args, device, causal, backward, path):
    """max |blockwise - SDPA| over the output (and, with backward, the q/k/v grads) at the smallest length."""
    inp = make_inputs(args, min(args.lengths), device, backward)
    q, k, v = inp["q"], inp["k"], inp["v"]
    with torch.set_grad_enabled(backward):
        a = blockwise_fn(path, args, q, k, v, causal)()
        b = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    diff = (a - b).abs().max().item()
    if backward:
        ga = torch.autograd.grad(a, (q, k, v), inp["go"])
        gb = torch.autograd.grad(b, (q, k, v), inp["go"])
        diff = max([diff] + [(x - y).abs().max().item() for x, y in zip(ga, gb)])
    return diff


def run_section(args, device, causal, backward):
    sync = sync_fn(device)
    B, H = args.batch, args.heads
    n_mat = 9 if backward else 6
    budget_mib = args.mem_budget_gb * 1024
    results, last_peak = {}, {}
    for L in args.lengths:
        load = load_1min(f"L={L}")
        score_mib = B * H * L * L * 4 / MiB
        res = {p: {"skipped": None, "times_s": [], "peak_mib": None} for p in PATHS}
        for p in PATHS:
            pred = last_peak[p][1] * (L / last_peak[p][0]) ** 2 if p in last_peak else n_mat * score_mib
            if pred > budget_mib:
                res[p]["skipped"] = f"predicted peak {pred / 1024:.3g} GB > budget {args.mem_budget_gb:g} GB"
                continue
            peak, method = measure_peak(p, L, args, device, causal, backward)
            res[p]["peak_mib"], res[p]["mem_method"] = peak, method
            last_peak[p] = (L, max(peak, 1e-3))
        live = [p for p in PATHS if res[p]["skipped"] is None]
        inp = make_inputs(args, L, device, backward)
        calls = {p: make_call(p, args, inp, causal, backward) for p in live}
        for p in live:  # warm-up
            calls[p]()
            sync()
        reps = max(args.min_repeats, min(args.repeats, args.repeats * 1024 // L))
        time_interleaved(calls, live, reps, sync, res)
        del inp, calls
        gc.collect()
        for p in live:
            res[p]["median_ms"] = median(res[p]["times_s"]) * 1e3
        results[L] = {"score_matrix_mib": score_mib, "repeats": reps, "load_1min_at_start": load,
                      "busy": load > CORES, "paths": res}
        print(f"  L={L}: " + ", ".join(f"{p} {res[p]['median_ms']:.1f} ms / {res[p]['peak_mib']:.1f} MiB"
                                      if res[p]["skipped"] is None else f"{p} skipped" for p in PATHS), flush=True)
    return results


def section_rows(results):
    def val(r, key):
        return "skipped" if r["skipped"] else r[key]

    def ratio(a, b, key):
        ok = a["skipped"] is None and b["skipped"] is None
        return a[key] / max(b[key], 1e-3) if ok else None

    rows = []
    for L, res in results.items():
        r = res["paths"]
        bw, ref, ex, sd = r["blockwise"], r["blockwise_ref"], r["explicit"], r["sdpa"]
        res["mem_ratio_blockwise_over_explicit"] = ratio(bw, ex, "peak_mib")
        res["time_ratio_blockwise_over_explicit"] = ratio(bw, ex, "median_ms")
        res["time_ratio_blockwise_over_sdpa"] = ratio(bw, sd, "median_ms")
        res["time_ratio_blockwise_ref_over_sdpa"] = ratio(ref, sd, "median_ms")
        notes = [f"{p}: {r[p]['skipped']}" for p in PATHS if r[p]["skipped"]]
        notes += [f"BUSY: load {res['load_1min_at_start']:.2f}"] if res["busy"] else []
        rows.append([L, res["repeats"], val(bw, "median_ms"), val(ref, "median_ms"), val(ex, "median_ms"),
                     val(sd, "median_ms"), val(bw, "peak_mib"), val(ref, "peak_mib"), val(ex, "peak_mib"),
                     val(sd, "peak_mib"), res["time_ratio_blockwise_over_sdpa"] or "-",
                     res["time_ratio_blockwise_ref_over_sdpa"] or "-", res["time_ratio_blockwise_over_explicit"] or "-",
                     res["mem_ratio_blockwise_over_explicit"] or "-", res["load_1min_at_start"], "; ".join(notes)])
    return rows


HEADERS = ["L", "reps", "fused ms", "ref ms", "explicit ms", "SDPA ms", "fused MiB", "ref MiB", "explicit MiB",
           "SDPA MiB", "time fused/SDPA", "time ref/SDPA", "time fused/expl", "mem fused/expl", "load", "note"]


# ----------------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--mode", nargs="+", choices=["forward", "backward"], default=["forward", "backward"],
                    help="backward = forward + backward")
    ap.add_argument("--mask", nargs="+", choices=["none", "causal"], default=["none", "causal"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=None,
                    help="fused blockwise key (and query) block size (default: the library's, 4096)")
    ap.add_argument("--ref-block-size", type=int, default=512, help="reference blockwise key (and query) block size")
    ap.add_argument("--repeats", type=int, default=5, help="rounds at L <= 1024; scaled by 1024 / L above")
    ap.add_argument("--min-repeats", type=int, default=2)
    ap.add_argument("--mem-budget-gb", type=float, default=12.0, help="skip a path at a length predicted above this")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    ap.add_argument("--_child-path", dest="_child_path", help=argparse.SUPPRESS)
    ap.add_argument("--_child-len", dest="_child_len", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_child-causal", dest="_child_causal", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_child-backward", dest="_child_backward", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child_path:
        return child_peak(args)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    B, H, D = args.batch, args.heads, args.head_dim

    load_before = os.getloadavg()
    busy_start = load_1min("start") > CORES
    t_start = time.perf_counter()
    sections, tables = {}, []
    for mode in args.mode:
        for mask in args.mask:
            backward, causal = mode == "backward", mask == "causal"
            name = f"{'forward+backward' if backward else 'forward'}, {'causal' if causal else 'non-causal'}"
            print(f"{name}:", flush=True)
            diff = {p: parity(args, device, causal, backward, p) for p in ("blockwise", "blockwise_ref")}
            results = run_section(args, device, causal, backward)
            sections[name] = {"mode": mode, "causal": causal, "parity_max_abs_diff": diff, "rows": results}
    wall = time.perf_counter() - t_start
    load_after = os.getloadavg()

    method = next((r["mem_method"] for s in sections.values() for v in s["rows"].values()
                   for r in v["paths"].values() if r.get("mem_method")), "-")
    busy = busy_start or any(v["busy"] for s in sections.values() for v in s["rows"].values())
    print(f"\nblockwise attention (fused: impl='auto', block_size={args.block_size or 'default'}; reference: "
          f"block_size={args.ref_block_size}) vs explicit vs SDPA, B={B} H={H} D={D} fp32, {device.type} "
          f"{args.threads} thread{'s' if args.threads > 1 else ''}; medians; peak memory: {method}")
    for name, s in sections.items():
        d = s["parity_max_abs_diff"]
        print(f"\n{name} (max |blockwise - SDPA| at L={min(args.lengths)}: fused {d['blockwise']:.2e}, "
              f"reference {d['blockwise_ref']:.2e})")
        table = print_table(HEADERS, section_rows(s["rows"]))
        s["table"] = table
        tables.append(f"{name}\n{table}")
    print(f"(benchmark wall time {wall:.0f} s; 1-min load average {load_before[0]:.2f} -> {load_after[0]:.2f} on "
          f"{CORES} cores)")
    if busy:
        print(f"WARNING: the load average exceeded the core count ({CORES}) at the start of the run or of a row "
              f"(marked BUSY): those times are suspect")
    write_result("blockwise_attention", {
        "config": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "mem_method": method,
        "wall_s": wall, "loadavg_before_after": [load_before, load_after], "busy": busy, "tables": tables,
        "sections": {n: {**s, "rows": {str(L): v for L, v in s["rows"].items()}} for n, s in sections.items()}})


if __name__ == "__main__":
    main()
