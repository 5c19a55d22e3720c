"""Trainer overhead: the same model, data, batch size, optimizer and steps trained by
(a) a hand-written PyTorch loop, (b) lamina's Trainer, (c) PyTorch Lightning (pip install "lamina[bench]").

All three get the same in-memory batches (a seeded permutation per epoch, whole-batch indexing), so the
ratio measures the engine, not the data pipeline. A fourth row shows the common hand-written loop over
torch's DataLoader(TensorDataset), which pays per-sample Python. Runs are interleaved and repeated; the
table shows medians.

    python benchmarks/trainer_overhead.py [--epochs 5] [--repeats 9] [--model small_cnn]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import time
import warnings

import torch
import torch.nn.functional as F

from _common import median, print_table, write_result
from lamina.data import InMemoryLoader, load_dataset
from lamina.engine import Trainer
from lamina.models import create_model
from lamina.tasks import ClassificationTask


def make_model(name, seed):
    torch.manual_seed(seed)
    return create_model(name, num_classes=10, in_chans=1)


def run_hand(bundle, args, seed):
    model = make_model(args.model, seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = InMemoryLoader(bundle.train, args.batch_size, shuffle=True, seed=seed)
    model.train()
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        for batch in loader:
            loss = F.cross_entropy(model(batch["x"]), batch["y"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, float(loss)


def run_hand_dataloader(bundle, args, seed):
    model = make_model(args.model, seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ds = torch.utils.data.TensorDataset(bundle.train.x, bundle.train.y)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    model.train()
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, float(loss)


def run_lamina(bundle, args, seed):
    model = make_model(args.model, seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = InMemoryLoader(bundle.train, args.batch_size, shuffle=True, seed=seed)
    trainer = Trainer(max_epochs=args.epochs, device="cpu", log_every=10**9)
    t0 = time.perf_counter()
    hist = trainer.fit(model, ClassificationTask(10), loader, optimizer=opt)
    return time.perf_counter() - t0, hist[-1]["train/loss"]


def run_lightning(bundle, args, seed):
    import lightning.pytorch as pl

    class LitModule(pl.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.model(batch["x"]), batch["y"])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    lit = LitModule(make_model(args.model, seed))
    loader = InMemoryLoader(bundle.train, args.batch_size, shuffle=True, seed=seed)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer.fit(lit, train_dataloaders=loader)  # silence Lightning's banner lines; timing unaffected
    return time.perf_counter() - t0, float(trainer.callback_metrics.get("train_loss", float("nan")))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--model", default="small_cnn")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    bundle = load_dataset("digits", seed=0)
    runners = {"hand-written loop": run_hand, "lamina Trainer": run_lamina}
    try:
        import lightning  # noqa: F401

        runners["PyTorch Lightning"] = run_lightning
    except ImportError:
        print("lightning not installed (pip install 'lamina[bench]'): skipping that row")
    runners["hand loop + DataLoader(TensorDataset)"] = run_hand_dataloader
    for fn in runners.values():  # warm-up: first-call allocations and lazy imports
        fn(bundle, argparse.Namespace(**{**vars(args), "epochs": 1}), 0)
    times = {k: [] for k in runners}
    for r in range(args.repeats):
        for name, fn in runners.items():
            times[name].append(fn(bundle, args, r)[0])
    base = median(times["hand-written loop"])
    steps = args.epochs * -(-len(bundle.train) // args.batch_size)
    rows = [[name, median(ts), min(ts), median(ts) / base, steps / median(ts)] for name, ts in times.items()]
    print(f"\n{args.model} on digits ({len(bundle.train)} train), batch {args.batch_size}, Adam, "
          f"{args.epochs} epochs = {steps} steps, median of {args.repeats}")
    table = print_table(["runner", "median s", "min s", "x hand loop", "steps/s"], rows)
    write_result("trainer_overhead", {"config": vars(args), "steps": steps, "table": table,
                                      "results": {n: {"median_s": median(t), "all_s": t, "ratio": median(t) / base}
                                                  for n, t in times.items()}})


if __name__ == "__main__":
    main()
