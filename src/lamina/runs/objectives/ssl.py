"""Self-supervised objectives: learn an encoder from images alone, for `lamina pretrain` (lamina/runs/ssl.py).

    simclr  (Chen et al. 2020)  two augmented views per image; NT-Xent pulls each view's projection towards its
                                twin and away from the other 2B - 2 in the batch
    byol    (Grill et al. 2020) no negatives: an online network + predictor regresses a momentum (EMA) target
                                network's projection of the other view; the EMA keeps it from collapsing
    mae     (He et al. 2022)    a ViT encodes a random 25% of the patches; a light decoder rebuilds the pixels
                                of the hidden ones; loss on hidden patches only

Each method is a `Learner` (an nn.Module holding the zoo model as `encoder` plus the heads the method trains
and throws away) and `SSLTask` (the Task protocol around it: makes the views / masks from the task's own seeded
generator, returns the loss). The Trainer trains the learner like any model; the run keeps `learner.encoder`.
The encoder is used through the model contract (`forward_features`, `forward_head(pre_logits=True)`,
`num_features`), so SimCLR and BYOL take any classifier of the zoo; MAE needs a ViT (patch embedding,
position embeddings and blocks to run on a subset of tokens).

Written here rather than taken from lightly: lightly 1.6 imports torchvision at package import, and no
torchvision build imports beside torch 2.13 (benchmarks/ssl_fashion.py runs lightly in its own environment).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lamina.data.transforms import ColorJitter, Compose, RandomHorizontalFlip, RandomResizedCrop
from lamina.errors import ConfigError
from lamina.models.contract import pooled_features

METHODS = ("simclr", "byol", "mae")


# ----- losses ------------------------------------------------------------------------------------------------
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SimCLR's NT-Xent over the 2B projections: for each one, cross-entropy of its twin among the other 2B - 1
    by cosine similarity / T. Returns (loss, fraction of views whose twin ranked first)."""
    B = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2B, d)
    sim = z @ z.T / temperature  # (2B, 2B)
    sim = sim.masked_fill(torch.eye(2 * B, dtype=torch.bool, device=z.device), float("-inf"))  # never itself
    target = torch.cat([torch.arange(B, 2 * B), torch.arange(0, B)]).to(z.device)  # view i's twin
    return F.cross_entropy(sim, target), (sim.argmax(1) == target).float().mean()


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p, z): the MSE of the L2-normalised prediction and target, per pair, averaged."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=-1)).mean()


def mlp_head(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """Linear-BN-ReLU-Linear: SimCLR v2's projector and BYOL's projector / predictor shape."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, d_out))


# ----- learners ----------------------------------------------------------------------------------------------
class SimCLR(nn.Module):
    def __init__(self, encoder: nn.Module, proj_hidden: int, proj_dim: int, temperature: float):
        super().__init__()
        self.encoder, self.temperature = encoder, float(temperature)
        self.projector = mlp_head(encoder.num_features, proj_hidden, proj_dim)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor) -> dict:
        z = self.projector(pooled_features(self.encoder, torch.cat([v1, v2])))  # both views in one pass: (2B, d)
        loss, acc = nt_xent(*z.chunk(2), self.temperature)
        return {"loss": loss, "pos_acc": acc.detach()}


class BYOL(nn.Module):
    def __init__(self, encoder: nn.Module, proj_hidden: int, proj_dim: int, momentum: float, total_steps: int):
        super().__init__()
        self.encoder = encoder
        self.projector = mlp_head(encoder.num_features, proj_hidden, proj_dim)
        self.predictor = mlp_head(proj_dim, proj_hidden, proj_dim)
        # the target: a copy that only follows the online weights by EMA (no gradients, not in the optimizer)
        self.target_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.base_momentum, self.total_steps = float(momentum), max(1, int(total_steps))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def momentum(self) -> float:
        """tau_k = 1 - (1 - tau_0) (cos(pi k / K) + 1) / 2: from tau_0 to 1 over the run (the paper's schedule)."""
        k = min(int(self.step), self.total_steps)
        return 1 - (1 - self.base_momentum) * (math.cos(math.pi * k / self.total_steps) + 1) / 2

    @torch.no_grad()
    def update_target(self) -> None:
        """target = tau target + (1 - tau) online. Called before each training forward, so the target a step sees
        is the EMA of the weights the previous optimizer step left (the same as updating right after it)."""
        if int(self.step) > 0:
            tau = self.momentum()
            for online, target in ((self.encoder, self.target_encoder), (self.projector, self.target_projector)):
                o, t = list(online.parameters()), list(target.parameters())
                torch._foreach_lerp_(t, o, 1 - tau)
                for bo, bt in zip(online.buffers(), target.buffers()):  # BN running statistics follow as they are
                    bt.copy_(bo)
        self.step += 1

    def forward(self, v1: torch.Tensor, v2: torch.Tensor) -> dict:
        if self.training:
            self.update_target()
        x = torch.cat([v1, v2])
        p = self.predictor(self.projector(pooled_features(self.encoder, x)))  # (2B, d)
        with torch.no_grad():
            self.target_encoder.train(self.training)  # BYOL's target uses batch statistics too
            z = self.target_projector(pooled_features(self.target_encoder, x))
        p1, p2 = p.chunk(2)
        z1, z2 = z.chunk(2)
        loss = byol_loss(p1, z2) + byol_loss(p2, z1)  # each view predicts the target's view of the other, symmetric
        return {"loss": loss}


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches row-major as PatchEmbed orders its tokens."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


class MAE(nn.Module):
    def __init__(self, encoder: nn.Module, mask_ratio: float, decoder_dim: int, decoder_depth: int,
                 decoder_heads: int, norm_pix: bool):
        super().__init__()
        need = ("patch_embed", "blocks", "norm", "_pos_embed_for", "num_prefix_tokens")
        if not all(hasattr(encoder, a) for a in need):
            raise ConfigError(f"ssl.method=mae: masked image modelling needs a ViT-family model (patch embedding, "
                              f"position embeddings, blocks), got {getattr(encoder, 'model_name', type(encoder).__name__)}"
                              f"; use e.g. model.name=vit_fashion, or ssl.method=simclr|byol for other models")
        from lamina.models.vit import Block, ViTConfig

        self.encoder, self.mask_ratio, self.norm_pix = encoder, float(mask_ratio), bool(norm_pix)
        cfg = encoder.cfg
        self.patch, n_pos = cfg.patch_size, encoder.pos_embed.shape[1]
        dcfg = ViTConfig(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                         embed_dim=decoder_dim, depth=decoder_depth, n_head=decoder_heads, mlp_ratio=4.0)
        self.decoder_embed = nn.Linear(encoder.num_features, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos = nn.Parameter(torch.zeros(1, n_pos, decoder_dim))  # same token layout as the encoder's
        self.decoder_blocks = nn.ModuleList(Block(dcfg, 0.0) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, cfg.patch_size ** 2 * cfg.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos, std=0.02)

    def encode_visible(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The encoder on the kept patches only: (B, P + n_keep, D), P prefix (cls) tokens first."""
        enc = self.encoder
        grid = enc.patch_embed.grid_size(x.shape[-2], x.shape[-1])
        pos = enc._pos_embed_for(grid)  # (1, P + N, D)
        P = enc.num_prefix_tokens
        t = enc.patch_embed(x) + pos[:, P:]  # (B, N, D)
        t = torch.gather(t, 1, keep[..., None].expand(-1, -1, t.shape[-1]))  # (B, n_keep, D)
        if P:
            t = torch.cat([(enc.cls_token + pos[:, :P]).expand(t.shape[0], -1, -1), t], dim=1)
        t = enc.pos_drop(t)
        for blk in enc.blocks:
            t, _ = blk(t)
        return enc.norm(t)

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> dict:
        """`noise` (B, N) uniform: each sample keeps its lowest-noise patches (MAE's per-sample random shuffle)."""
        B, N = noise.shape
        n_keep = max(1, int(round(N * (1 - self.mask_ratio))))
        order = noise.argsort(1)  # (B, N): kept patches first
        restore = order.argsort(1)
        h = self.encode_visible(x, order[:, :n_keep])
        P = self.encoder.num_prefix_tokens
        d = self.decoder_embed(h)  # (B, P + n_keep, Dd)
        patches = torch.cat([d[:, P:], self.mask_token.expand(B, N - n_keep, -1)], dim=1)  # shuffled order
        patches = torch.gather(patches, 1, restore[..., None].expand(-1, -1, d.shape[-1]))  # image order
        d = torch.cat([d[:, :P], patches], dim=1) + self.decoder_pos
        for blk in self.decoder_blocks:
            d, _ = blk(d)
        pred = self.decoder_pred(self.decoder_norm(d[:, P:]))  # (B, N, p*p*C)
        target = patchify(x, self.patch)
        if self.norm_pix:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        hidden = torch.ones(B, N, device=x.device)
        hidden.scatter_(1, order[:, :n_keep], 0.0)  # 1 on the patches the encoder did not see
        per_patch = (pred.float() - target.float()).pow(2).mean(-1)
        return {"loss": (per_patch * hidden).sum() / hidden.sum()}


def build_learner(ssl, encoder: nn.Module, total_steps: int) -> nn.Module:
    """The learner of `ssl.method` (config section `ssl`) around the zoo model `encoder`."""
    if ssl.method == "simclr":
        return SimCLR(encoder, ssl.proj_hidden, ssl.proj_dim, ssl.temperature)
    if ssl.method == "byol":
        return BYOL(encoder, ssl.proj_hidden, ssl.proj_dim, ssl.momentum, total_steps)
    if ssl.method == "mae":
        return MAE(encoder, ssl.mask_ratio, ssl.decoder_dim, ssl.decoder_depth, ssl.decoder_heads, ssl.norm_pix)
    raise ConfigError(f"ssl.method: expected one of {', '.join(METHODS)} for `lamina pretrain`, got {ssl.method!r}")


def views(ssl) -> Compose:
    """One random view of a batch of images in [0, 1] (before any normalize): crop, flip, brightness/contrast."""
    return Compose([RandomResizedCrop(scale=ssl.crop_scale), RandomHorizontalFlip(),
                    ColorJitter(ssl.jitter, ssl.jitter, ssl.jitter_p)])


class SSLTask:
    """The Task protocol around a learner: images in, the method's loss out; labels are never read."""

    name = "ssl"

    def __init__(self, ssl, seed: int = 0, normalize=None):
        self.method = ssl.method
        self.views = views(ssl) if ssl.method in ("simclr", "byol") else None
        self.normalize = normalize  # the run's normalize step, applied after the views (they work in [0, 1])
        self.generator = torch.Generator().manual_seed(seed + 104729)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize({"x": x})["x"] if self.normalize is not None else x

    def forward(self, learner, batch):
        x = batch["x"]
        if self.views is not None:
            v1 = self._norm(self.views({"x": x}, self.generator)["x"])
            v2 = self._norm(self.views({"x": x}, self.generator)["x"])
            return learner(v1, v2)
        n = learner.encoder.patch_embed.grid_size(x.shape[-2], x.shape[-1])
        noise = torch.rand(x.shape[0], n[0] * n[1], generator=self.generator).to(x.device)
        return learner(self._norm(x), noise)

    def loss(self, outputs, batch) -> torch.Tensor:
        return outputs["loss"]

    def train_stats(self, outputs, batch):
        if "pos_acc" not in outputs:
            return {}
        n = torch.tensor(float(batch["x"].shape[0]), device=outputs["pos_acc"].device)
        return {"pos_acc": outputs["pos_acc"] * n, "n": n}

    def summarize_train(self, sums: dict, n: int) -> dict:
        return {"pos_acc": float(sums["pos_acc"]) / float(sums["n"])} if "n" in sums else {}


__all__ = ["BYOL", "MAE", "METHODS", "SSLTask", "SimCLR", "build_learner", "byol_loss", "mlp_head", "nt_xent",
           "patchify", "views"]
