"""Gradient-health demo: a 20-layer Linear+Sigmoid MLP (default init) vs a 20-layer ReLU+LayerNorm residual MLP on
sklearn digits. One forward/backward each; prints first/middle/last layer grad norms and the findings."""

import torch
import torch.nn.functional as F

from lamina.data import load_dataset
from lamina.trust.gradients import PlainMLP, ResidualMLP, diagnose, gradient_health




def main():
    torch.manual_seed(0)
    split = load_dataset("digits", seed=0).train
    batch = (split.tensors["x"][:256].float(), split.tensors["y"][:256])
    for name, model in [("20 x Linear+Sigmoid", PlainMLP()), ("20 x ReLU+LayerNorm+residual", ResidualMLP())]:
        rep = gradient_health(model, F.cross_entropy, batch)
        w = [(n, r["grad_norm"]) for n, r in rep.items() if "grad_norm" in r]
        print(f"== {name}")
        for n, g in (w[0], w[len(w) // 2], w[-1]):
            print(f"  {n:12s} grad norm {g:.3e}")
        print(f"  first/last ratio {w[0][1] / w[-1][1]:.3e}")
        findings = diagnose(rep)
        for f in findings:
            print("  " + f.message())
        if not findings:
            print("  no findings")


if __name__ == "__main__":
    main()
