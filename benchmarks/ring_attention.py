"""Ring attention (context parallelism) on CPU: per-rank peak memory and time over 1, 2, 4 gloo processes.

One fixed total sequence length (default L=8192, B=1, H=4, D=64, fp32, causal), one intra-op thread per
process. Rows:
* SDPA: `torch.nn.functional.scaled_dot_product_attention(is_causal=True)` in one process (flash kernel).
* explicit: `lamina.nn.attention.reference_attention(causal=True)` in one process (materializes L x L).
* ring N: `lamina.nn.ring_attention.ring_attention(layout="zigzag", causal=True)` over N spawned gloo
  processes, each holding L / N tokens of q, k, v (zigzag shards); the per-chunk math is
  lamina.nn.blockwise_attention with `--impl` (default auto: PyTorch's fused flash kernel per chunk, merged by
  logsumexp; reference: pure-PyTorch 512 x 512 tiles). N=1 is the same code with no communication.
Columns: forward (under no_grad) and forward + backward (a fixed random upstream gradient).

Memory ("peak MiB/rank", the largest over the ranks): each (path, N, mode) runs in FRESH processes, as in
benchmarks/attention.py (whose helpers measure the SDPA / explicit rows): warm up on a tiny input, allocate the
inputs, write "5" to /proc/self/clear_refs (VmHWM := VmRSS), run the call once, peak = VmHWM - VmRSS before.
It counts every page the call touched at its worst moment: the output (and input gradients), the score tiles,
the fp32 accumulators, and for ring the kv shard in flight and the travelling dk/dv.

Time: per rank, the median over `--repeats` calls after the measured one; a ring call is as slow as its
slowest rank, so each repeat takes the max over ranks.

What the CPU numbers mean. The memory columns are the honest ones: what one rank needs. A ring call's peak is
a few fixed-size score tiles (reference: 512 x 512 per head, fp32: 4 MiB each at H=4; fused: the kernel's
own small per-thread tiles) plus terms linear in L / N (fp32
out / lse accumulators, row-layout copies of q and dout, the kv shard in flight, dq and the travelling dk /
dv). Nothing is L x L, so it stays far below the explicit path's (which grows as L^2), and at L=8192, H=4 the
tiles dominate, so the peak is about flat in N; what falls as 1/N is the sequence-proportional part, and the
inputs each rank holds ("shard MiB/rank": q, k, v and, with backward, dout of L / N tokens, allocated before the
measurement). At long contexts (100k+ tokens on GPUs) those L / N terms, and the model's other activations,
which shard the same way, are what context parallelism saves. The time columns are not a speed-up
measurement: N gloo processes share this machine's cores (4 processes on 2 cores are oversubscribed, so ring
N=4 takes about as long as N=2, or longer), gloo moves the shards over loopback TCP through the CPUs that
should be computing, and the chunks are merged one step at a time; other jobs on a shared machine add noise
(the load average is printed, and a run started above the core count is flagged "busy"). On GPUs with NCCL each rank
has its own device, the transfer of the next kv shard overlaps the compute on the current one, and time per
step falls as about 1/N until the communication (one kv shard per step, plus dk / dv in backward) outgrows the
compute of a T_local x T_local / 2 tile.

    python benchmarks/ring_attention.py [--length 8192] [--world-sizes 1 2 4] [--heads 4] [--head-dim 64]
                                        [--repeats 3] [--mem-budget-gb 8] [--impl auto|fused|reference]

Results go to results/ring_attention.json.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from _common import median, peak_rss_mib, print_table, write_result
from attention import make_call, make_inputs, measure_peak

MiB = 2**20


# ----------------------------------------------------------------------------------------------- ring worker
def _ring_inputs(args, L, rank, n, grad, seed=0):
    """This rank's zigzag shards of the full q, k, v, upstream grad (same seed on every rank)."""
    from lamina.nn.ring_attention import zigzag_shard

    g = torch.Generator().manual_seed(seed)
    shape = (args.batch, args.heads, L, args.head_dim)
    full = [torch.randn(shape, generator=g) for _ in range(4)]  # q, k, v, dout
    q, k, v, go = (zigzag_shard(t, 2, rank, n).contiguous() for t in full)
    del full
    return [t.requires_grad_(grad) for t in (q, k, v)], go


def _ring_call(qkv, go, backward, impl):
    from lamina.nn.ring_attention import ring_attention

    if backward:
        def call():
            ring_attention(*qkv, causal=True, layout="zigzag", check_shapes=False, impl=impl).backward(go)
            for t in qkv:
                t.grad = None
    else:
        def call():
            with torch.no_grad():
                ring_attention(*qkv, causal=True, layout="zigzag", check_shapes=False, impl=impl)
    return call


def ring_worker(rank, n, args, backward, out_dir):
    """One spawned rank: parity at a small length, peak memory of the first full call, then timed repeats."""
    from lamina.nn.ring_attention import ring_attention, zigzag_shard

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rdzv_{n}_{int(backward)}", rank=rank,
                            world_size=n, timeout=datetime.timedelta(seconds=1800))
    try:
        # parity on a small length (and warm-up of kernels, gloo pairs, thread pools)
        L0 = 64 * n
        (q, k, v), _ = _ring_inputs(args, L0, rank, n, False)
        full = _ring_inputs(args, L0, 0, 1, False)[0]
        want = zigzag_shard(F.scaled_dot_product_attention(*full, is_causal=True), 2, rank, n)
        diff = (ring_attention(q, k, v, causal=True, impl=args.impl) - want).abs().max().item()
        qkv, go = _ring_inputs(args, 64 * n, rank, n, backward)
        _ring_call(qkv, go, backward, args.impl)()
        del q, k, v, full, want, qkv, go

        qkv, go = _ring_inputs(args, args.length, rank, n, backward)
        call = _ring_call(qkv, go, backward, args.impl)
        gc.collect()
        dist.barrier()
        peak_mib, method = peak_rss_mib(call)
        times = []
        for _ in range(args.repeats):
            dist.barrier()
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        res = {"peak_mib": peak_mib, "method": method, "times_s": times, "parity": diff}
        (out_dir / f"ring_{n}_{int(backward)}_rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def run_ring(n, args, backward, out_dir):
    mp.spawn(ring_worker, args=(n, args, backward, out_dir), nprocs=n, join=True)
    ranks = [json.loads((out_dir / f"ring_{n}_{int(backward)}_rank{r}.json").read_text()) for r in range(n)]
    per_repeat = [max(r["times_s"][i] for r in ranks) for i in range(args.repeats)]
    return {"median_ms": median(per_repeat) * 1e3, "times_s": per_repeat,
            "peak_mib_per_rank": [r["peak_mib"] for r in ranks], "peak_mib": max(r["peak_mib"] for r in ranks),
            "mem_method": ranks[0]["method"], "parity_max_abs_diff": max(r["parity"] for r in ranks)}


# ----------------------------------------------------------------------------------------------- one process
def run_single(path, args, backward):
    """SDPA or explicit in this process (time) and in a fresh subprocess (memory), via benchmarks/attention.py."""
    a = argparse.Namespace(batch=args.batch, heads=args.heads, head_dim=args.head_dim, causal=True,
                           backward=backward, threads=args.threads)
    cpu = torch.device("cpu")
    peak, method = measure_peak(path, args.length, a, cpu)
    inp = make_inputs(a, args.length, cpu, backward)
    call = make_call(path, a, inp, cpu)
    call()  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    del inp, call
    gc.collect()
    return {"median_ms": median(times) * 1e3, "times_s": times, "peak_mib": peak, "peak_mib_per_rank": [peak],
            "mem_method": method}


# ----------------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=8192, help="total (global) sequence length")
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    ap.add_argument("--impl", choices=["auto", "fused", "reference"], default="auto",
                    help="ring attention's per-chunk kernel (lamina.nn.blockwise_attention impl=)")
    ap.add_argument("--mem-budget-gb", type=float, default=8.0,
                    help="skip the explicit path when its predicted peak exceeds this")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    B, H, L, D = args.batch, args.heads, args.length, args.head_dim
    score_mib = B * H * L * L * 4 / MiB
    load_before = os.getloadavg()
    busy = load_before[0] > (os.cpu_count() or 1)
    if busy:
        print(f"WARNING: 1-min load average {load_before[0]:.2f} > {os.cpu_count()} cores at the start: times are "
              f"suspect", flush=True)
    t_start = time.perf_counter()

    rows, results = [], {}
    for path in ["sdpa", "explicit", *(f"ring_{n}" for n in args.world_sizes)]:
        res = {}
        for backward in (False, True):
            mode = "forward+backward" if backward else "forward"
            if path == "explicit" and (6.5 if backward else 3.0) * score_mib > args.mem_budget_gb * 1024:
                res[mode] = {"skipped": f"predicted peak > {args.mem_budget_gb:g} GB"}
                continue
            if path.startswith("ring"):
                with tempfile.TemporaryDirectory() as tmp:
                    res[mode] = run_ring(int(path.split("_")[1]), args, backward, Path(tmp))
            else:
                res[mode] = run_single(path, args, backward)
            r = res[mode]
            print(f"{path} {mode}: {r['median_ms']:.0f} ms, peak {r['peak_mib']:.1f} MiB/rank "
                  f"(per rank {[round(p, 1) for p in r['peak_mib_per_rank']]})", flush=True)
        results[path] = res
        n = int(path.split("_")[1]) if path.startswith("ring") else 1
        f, b = res["forward"], res["forward+backward"]
        cell = lambda r, k: "skipped" if "skipped" in r else r[k]  # noqa: E731
        shard_mib = B * H * (L // n) * D * 4 / MiB  # one of q, k, v, dout for L / n tokens, fp32
        rows.append([path.replace("_", " N="), n, L // n, 3 * shard_mib, cell(f, "median_ms"), cell(f, "peak_mib"),
                     4 * shard_mib, cell(b, "median_ms"), cell(b, "peak_mib"),
                     f"{f['parity_max_abs_diff']:.1e}" if "parity_max_abs_diff" in f else "-"])
    wall = time.perf_counter() - t_start
    load_after = os.getloadavg()

    method = results["sdpa"]["forward"]["mem_method"]
    print(f"\ncausal attention, total L={L}, B={B} H={H} D={D} fp32, cpu, {args.threads} thread(s) per process, "
          f"ring layout zigzag over gloo, impl={args.impl}; median of {args.repeats}; peak memory: {method}; "
          f"L x L score matrix = {score_mib:.0f} MiB")
    headers = ["path", "procs", "tokens/rank", "fwd shard MiB/rank", "fwd ms", "fwd peak MiB/rank",
               "fwd+bwd shard MiB/rank", "fwd+bwd ms", "fwd+bwd peak MiB/rank", "parity vs SDPA (L=64N)"]
    table = print_table(headers, rows)
    print(f"(benchmark wall time {wall:.0f} s; 1-min load average {load_before[0]:.1f} -> {load_after[0]:.1f}; "
          f"{os.cpu_count()} cores: times above {os.cpu_count()} processes are oversubscribed)")
    write_result("ring_attention", {"config": vars(args), "mem_method": method, "score_matrix_mib": score_mib,
                                    "wall_s": wall, "loadavg_before_after": [load_before, load_after], "busy": busy,
                                    "table": table, "results": results})


if __name__ == "__main__":
    main()
