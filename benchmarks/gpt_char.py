"""GPT on Tiny Shakespeare (characters): lamina's GPT trained by lamina's Trainer vs a plain PyTorch loop over a
minimal nanoGPT-style model of the same shape, in tokens per second.

Both runners get the same model shape (nanoGPT's CPU setting: 4 layers x 4 heads x 128 wide, block 64, batch 12,
vocab 65, dropout 0, biases, tied lm_head), the same initial weights (the plain model's are copied from lamina's,
c_attn = cat(q_proj, k_proj, v_proj)), the same AdamW (nanoGPT's configure_optimizers: lr 1e-3, betas (0.9, 0.99),
weight decay 0.1 on 2-D tensors only), the same gradient clipping (nanoGPT's grad_clip 1.0; --grad-clip 0 turns it
off) and the same batches (lamina's RandomWindowLoader, one gather per batch, same seed). The plain model is
nanoGPT's model.py cut to what training needs: fused qkv Linear, F.scaled_dot_product_attention(is_causal=True),
GELU MLP, pre-LN blocks, loss inside forward.

A third row runs the Trainer with the perf preset `lamina train` uses (trainer.perf: bf16 autocast on CPUs with
native bf16, fused AdamW); its losses differ from the fp32 rows by bf16 rounding. The script refuses to start
when the 1-minute load average is above the core count (--allow-busy records a flagged run instead).

Each repeat builds both models fresh, runs `--warmup` untimed steps (AdamW state, first-call allocations), then
times `--steps` steps; runners are interleaved and their order alternates between repeats. lamina's time is the
wall time of `Trainer.fit` (one epoch of `--steps` batches, no validation, no loggers), so it includes whatever
the Trainer does per step and per epoch. Losses at the end are printed: same weights, data and optimizer, so
they should agree to float noise.

    python benchmarks/gpt_char.py [--steps 200] [--warmup 10] [--repeats 3] [--batch-size 12] [--block-size 64]
                                  [--grad-clip 1.0] [--data PATH/input.txt] [--threads N]

Results go to results/gpt_char[_threadsN].json. On a machine shared with other jobs, torch's OpenMP threads
spin at barriers while a core is taken and 2-thread step times swing wildly (here, under a load average of
3-5: 48-54 ms/iter with 1 thread, 111-1373 ms/iter with 2, from one repeat to the next); the 1-minute load
average before and after is printed and saved so a reader can tell. `--threads 1` is the steadier measurement
there.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from _common import busy, median, print_table, refuse_if_busy, write_result
from lamina.data import load_dataset
from lamina.data.windows import RandomWindowLoader
from lamina.engine import Trainer
from lamina.models import create_model
from lamina.tasks import LanguageModelingTask

DEFAULT_THREADS = torch.get_num_threads()
ANCHOR_MS = 45.0  # shared/ANCHORS.md: nanoGPT 3adf61e, this CPU setting, 2000 iters in ~90 s (evals included)


# --------------------------------------------------------------------------- plain nanoGPT-style model
class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class PlainGPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)]),
            ln_f=nn.LayerNorm(n_embd),
        ))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying

    def forward(self, idx, targets):
        t = idx.size(1)
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    @torch.no_grad()
    def load_from_lamina(self, g):
        """Copy a lamina GPT's weights (same shape) into this model."""
        t = self.transformer
        t.wte.weight.copy_(g.wte.weight)
        t.wpe.weight.copy_(g.wpe.weight)
        for blk, lb in zip(t.h, g.blocks):
            a, la = blk.attn, lb.attn
            a.c_attn.weight.copy_(torch.cat([la.q_proj.weight, la.k_proj.weight, la.v_proj.weight]))
            a.c_attn.bias.copy_(torch.cat([la.q_proj.bias, la.k_proj.bias, la.v_proj.bias]))
            a.c_proj.load_state_dict(la.out_proj.state_dict())
            blk.mlp.c_fc.load_state_dict(lb.mlp.fc.state_dict())
            blk.mlp.c_proj.load_state_dict(lb.mlp.out_proj.state_dict())
            blk.ln_1.load_state_dict(lb.ln_1.state_dict())
            blk.ln_2.load_state_dict(lb.ln_2.state_dict())
        t.ln_f.load_state_dict(g.ln_f.state_dict())


def adamw(model, lr, weight_decay, betas, fused=False):
    """nanoGPT's configure_optimizers: decay 2-D tensors (matmuls, embeddings), not biases or norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **({"fused": True} if fused else {}))


# --------------------------------------------------------------------------- runners
def make_models(args, vocab_size, seed):
    torch.manual_seed(seed)
    lam = create_model("gpt", vocab_size=vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd, dropout=0.0)
    plain = PlainGPT(vocab_size, args.block_size, args.n_layer, args.n_head, args.n_embd)
    plain.load_from_lamina(lam)
    return lam, plain


def loader(ids, args, steps, seed):
    return RandomWindowLoader(ids, args.block_size, args.batch_size, steps_per_epoch=steps, seed=seed)


def opt_for(model, args, fused=False):
    return adamw(model, args.lr, args.weight_decay, (0.9, 0.99), fused=fused)


def run_plain(ids, vocab_size, args, seed):
    _, model = make_models(args, vocab_size, seed)
    opt = opt_for(model, args)
    model.train()

    def steps(batches):
        for batch in batches:
            loss = model(batch["x"], batch["y"])
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    steps(loader(ids, args, args.warmup, 10_000 + seed))
    t0 = time.perf_counter()
    loss = steps(loader(ids, args, args.steps, seed))
    return time.perf_counter() - t0, float(loss.detach())


def run_lamina_perf(ids, vocab_size, args, seed):
    return run_lamina(ids, vocab_size, args, seed, perf=True)


def run_lamina(ids, vocab_size, args, seed, perf=False):
    """perf=False: the bare engine (Trainer() is fp32 eager, the same torch AdamW as the plain loop); perf=True:
    what `lamina train` uses (trainer.perf: bf16 autocast where native, fused AdamW)."""
    model, _ = make_models(args, vocab_size, seed)
    opt = opt_for(model, args, fused=perf)
    task = LanguageModelingTask(vocab_size)
    kw = dict(max_epochs=1, device="cpu", log_every=10**9, grad_clip=args.grad_clip if args.grad_clip > 0 else None,
              perf=perf)
    Trainer(**kw).fit(model, task, loader(ids, args, args.warmup, 10_000 + seed), optimizer=opt)
    trainer = Trainer(**kw)
    data = loader(ids, args, args.steps, seed)
    t0 = time.perf_counter()
    trainer.fit(model, task, data, optimizer=opt)
    dt = time.perf_counter() - t0
    return dt, trainer.last_metrics["train/loss"]  # mean loss over the timed epoch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0, help="0 = no clipping")
    ap.add_argument("--allow-busy", action="store_true", help="run even when the load average is above the cores")
    ap.add_argument("--data", help="path to Tiny Shakespeare's input.txt (default: the shared data folder)")
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                    help="torch intra-op threads (default: torch's); a non-default value goes into the JSON's name")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    # the registry looks in $LAMINA_SHARED_DATA or ./../shared/data; resolve it from the repo root instead of cwd
    shared = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    path = args.data or (None if os.environ.get("LAMINA_SHARED_DATA") else shared / "tinyshakespeare" / "input.txt")
    bundle = load_dataset("tiny_shakespeare", block_size=args.block_size, path=path)
    ids, vocab_size = bundle.train.tensors["ids"], bundle.meta["vocab_size"]
    refuse_if_busy(args.allow_busy)
    load_before = os.getloadavg()
    times = {"plain PyTorch loop": [], "lamina Trainer.fit": [], "lamina Trainer.fit, perf preset": []}
    fns = {"plain PyTorch loop": run_plain, "lamina Trainer.fit": run_lamina,
           "lamina Trainer.fit, perf preset": run_lamina_perf}
    losses = {k: [] for k in times}  # plain: last step's loss; lamina: the epoch's mean (what fit reports)
    for r in range(args.repeats):
        order = list(times) if r % 2 == 0 else list(times)[::-1]
        for name in order:
            dt, loss = fns[name](ids, vocab_size, args, r)
            times[name].append(dt)
            losses[name].append(loss)
            print(f"repeat {r} {name}: {dt * 1e3 / args.steps:.1f} ms/iter", flush=True)
    load_after = os.getloadavg()

    # same-weights parity: the mean train loss over the timed epoch, from the plain loop, for comparison
    parity = epoch_mean_plain(ids, vocab_size, args, 0)

    tokens = args.steps * args.batch_size * args.block_size
    base = median(times["plain PyTorch loop"])
    rows = [[name, median(ts) * 1e3 / args.steps, min(ts) * 1e3 / args.steps, tokens / median(ts),
             median(ts) / base] for name, ts in times.items()]
    rows.append(["nanoGPT 3adf61e (ANCHORS.md, 2000 iters incl. evals)", ANCHOR_MS, "-",
                 args.batch_size * args.block_size / (ANCHOR_MS / 1e3), "-"])
    n_params = sum(p.numel() for p in make_models(args, vocab_size, 0)[0].parameters())
    print(f"\nGPT {args.n_layer}x{args.n_head}x{args.n_embd} ({n_params / 1e6:.2f}M params), Tiny Shakespeare chars "
          f"(vocab {vocab_size}), batch {args.batch_size} x block {args.block_size}, AdamW, grad clip "
          f"{args.grad_clip or 'off'}, {args.steps} timed steps after {args.warmup} warm-up, median of "
          f"{args.repeats}, {args.threads} thread{'s' if args.threads > 1 else ''}; "
          f"load avg {load_before[0]:.1f} -> {load_after[0]:.1f}")
    table = print_table(["runner", "ms/iter", "min ms/iter", "tokens/s", "x plain"], rows)
    ratio = median(times["lamina Trainer.fit"]) / base
    print(f"lamina / plain time ratio {ratio:.3f}; mean train loss over the timed epoch, repeat 0: "
          f"lamina {losses['lamina Trainer.fit'][0]:.4f}, plain {parity:.4f}")
    name = "gpt_char" + (f"_threads{args.threads}" if args.threads != DEFAULT_THREADS else "")
    write_result(name, {"config": vars(args), "n_params": n_params, "tokens_per_run": tokens, "table": table,
                        "ratio_lamina_over_plain": ratio, "loadavg_before_after": [load_before, load_after],
                        "busy": busy(load_before[0]),
                        "ratio_perf_preset_over_plain": median(times["lamina Trainer.fit, perf preset"]) / base,
                        "anchor_nanogpt_ms_per_iter": ANCHOR_MS,
                        "epoch_mean_loss_repeat0": {"lamina": losses["lamina Trainer.fit"][0], "plain": parity},
                        "results": {n: {"median_ms_per_iter": median(t) * 1e3 / args.steps,
                                        "tokens_per_s": tokens / median(t), "all_s": t,
                                        "ratio": median(t) / base, "losses": losses[n]}
                                    for n, t in times.items()}})


def epoch_mean_plain(ids, vocab_size, args, seed):
    """Re-run the plain loop for repeat `seed` (untimed) and return its mean loss over the timed steps, the
    figure lamina's Trainer reports for an epoch: with the same weights, batches and optimizer they should match."""
    _, model = make_models(args, vocab_size, seed)
    opt = opt_for(model, args)
    model.train()
    total = 0.0
    for i, batches in enumerate((loader(ids, args, args.warmup, 10_000 + seed), loader(ids, args, args.steps, seed))):
        for batch in batches:
            loss = model(batch["x"], batch["y"])
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i == 1:
                total += float(loss.detach())
    return total / args.steps


if __name__ == "__main__":
    main()
