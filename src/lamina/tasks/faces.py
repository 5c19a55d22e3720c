"""Face recognition: embeddings trained with a margin loss (ArcFace, CosFace), a triplet baseline or plain
softmax; closed-set identification and verification metrics.

Batch: x (B, C, H, W), y (B,) identity. Model: a face embedder (lamina.models.face): `embed_images` gives unit
embeddings, `head` their cosines to the K training identities.

Losses (task.loss):
* arcface / cosface / softmax: cross-entropy over s * cos with the margin m on the true identity
  (lamina.nn.margin.margin_logits; ArcFace s 30 m 0.5, CosFace s 30 m 0.35 as in the papers, softmax m 0).
* triplet: batch-hard triplets on the embeddings (margin m, default 0.2); training batches hold P identities x
  K images (lamina.data.faces.identity_batches) so every anchor has a positive.
Rows whose identity the model never trained on (the verification protocol's test people) count in the
metrics, not in the margin losses.

Metrics over a split (FaceMetrics), all from the split's embeddings:
* top1: the nearest training-identity centre (the cosine head) is the true identity: closed-set
  identification; only over rows of known identities, absent when there are none.
* verification over every pair of the split (genuine: same person): roc_auc, eer (the rate where false
  accepts equal false rejects, interpolated on the ROC), tar_far_1e-2 / tar_far_1e-3 (true accepts at a
  false-accept rate of at most 1% / 0.1%; a rate is reported only when the split has enough impostor pairs to
  measure it). The ROC and AUROC are torchmetrics'.
At test time (test_extras), identification as a deployed system does it: enrol each training identity from its
training images (mean unit embedding, renormalised) and match every test image to the nearest template
(gallery_top1), or to the nearest single training image (nn_top1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lamina.errors import ConfigError
from lamina.nn.margin import batch_hard_triplet, margin_logits
from lamina.tasks.base import BaseTask, check_options, refuse_label_smoothing

LOSSES = {"arcface": (30.0, 0.5), "cosface": (30.0, 0.35), "softmax": (30.0, 0.0), "triplet": (1.0, 0.2)}
MAX_PAIRS_SAMPLES = 8000  # verification over every pair: 32M scores; larger splits use the first 8,000 rows


@dataclass
class FaceOutput:
    emb: torch.Tensor  # (B, E) unit rows
    cos: torch.Tensor  # (B, K) cosines to the training identities

    def __len__(self) -> int:
        return len(self.emb)


def pair_scores(emb: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine score and genuine flag of every unordered pair i < j: ((P,), (P,) bool)."""
    e = torch.nn.functional.normalize(emb.float(), dim=-1)
    i, j = torch.triu_indices(len(e), len(e), 1)
    return (e[i] * e[j]).sum(-1), y[i] == y[j]


def verification(scores: torch.Tensor, genuine: torch.Tensor, fars: tuple[float, ...] = (1e-2, 1e-3)) -> dict:
    """ROC summary of pair scores in [-1, 1]: roc_auc, eer and tar_far_<far> for every far the number of
    impostor pairs can resolve (at least 1 / far of them)."""
    from torchmetrics.functional.classification import binary_auroc, binary_roc

    n_gen, n_imp = int(genuine.sum()), int((~genuine).sum())
    if n_gen == 0 or n_imp == 0:
        return {}
    p = ((scores.float() + 1) / 2).clamp(0, 1)  # probabilities for torchmetrics; a monotone map keeps the ROC
    t = genuine.long()
    fpr, tpr, _ = binary_roc(p, t)
    out = {"roc_auc": float(binary_auroc(p, t))}
    fnr = 1 - tpr
    k = int(torch.nonzero(fnr <= fpr)[0]) if bool((fnr <= fpr).any()) else len(fpr) - 1
    if k == 0:
        out["eer"] = float(fpr[0])
    else:  # the crossing lies between points k-1 and k: interpolate linearly
        d0, d1 = float(fnr[k - 1] - fpr[k - 1]), float(fnr[k] - fpr[k])
        a = d0 / (d0 - d1) if d0 != d1 else 0.0
        out["eer"] = float(fpr[k - 1] + a * (fpr[k] - fpr[k - 1]))
    for far in fars:
        if n_imp * far >= 1:
            ok = fpr <= far
            out[f"tar_far_{far:.0e}".replace("e-0", "e-")] = float(tpr[ok].max()) if bool(ok.any()) else 0.0
    return out


class FaceMetrics:
    """Accumulates a split's embeddings (on the CPU: E floats a face) and computes top1 + verification."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self.embs: list[torch.Tensor] = []
        self.ys: list[torch.Tensor] = []
        self.hits, self.known = 0, 0

    def to(self, device):
        return self

    def update(self, out: FaceOutput, y: torch.Tensor) -> None:
        known = y < self.num_classes
        if self.num_classes and bool(known.any()):
            self.hits += int((out.cos[known].argmax(-1) == y[known]).sum())
            self.known += int(known.sum())
        self.embs.append(out.emb.detach().float().cpu())
        self.ys.append(y.detach().cpu())

    def compute(self) -> dict[str, float]:
        out = {"top1": self.hits / self.known} if self.known else {}
        if self.embs:
            e, y = torch.cat(self.embs)[:MAX_PAIRS_SAMPLES], torch.cat(self.ys)[:MAX_PAIRS_SAMPLES]
            out.update(verification(*pair_scores(e, y)))
        return out


def templates(emb: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One enrolled template per identity: the renormalised mean of its unit embeddings. (ids, (n_ids, E))."""
    ids = torch.unique(y)
    t = torch.stack([torch.nn.functional.normalize(emb[y == i].float().mean(0), dim=-1) for i in ids.tolist()])
    return ids, t


@torch.no_grad()
def embed_all(model, x: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([model.embed_images(x[i:i + batch_size].to(device)).float().cpu()
                     for i in range(0, len(x), batch_size)])
    model.train(was)
    return out


def embed_split(model, data, device, batch_size: int = 256) -> torch.Tensor:
    """embed_all over a split: its tensors in memory, or batch by batch through its loader when streamed."""
    from lamina.data.sample import is_streamed, split_batches

    if not is_streamed(data):
        return embed_all(model, data.x, device, batch_size)
    return torch.cat([embed_all(model, b["x"], device, batch_size) for b in split_batches(data, batch_size)])


class FaceTask(BaseTask):
    name = "face"
    default_monitor = ("val/top1", "max")
    OPTIONS = ("label_smoothing", "loss", "scale", "margin", "identities_per_batch", "images_per_identity")

    def __init__(self, num_classes: int, loss: str = "arcface", scale: float | None = None,
                 margin: float | None = None, identities_per_batch: int = 16, images_per_identity: int = 4):
        if loss not in LOSSES:
            raise ConfigError(f"task.loss: expected one of {', '.join(LOSSES)}, got {loss!r}")
        s0, m0 = LOSSES[loss]
        self.num_classes, self.kind = int(num_classes), loss
        self.scale = float(s0 if scale is None else scale)
        self.margin = float(m0 if margin is None else margin)
        self.P, self.K = int(identities_per_batch), int(images_per_identity)
        if not 0 < self.scale <= 128:
            raise ConfigError(f"task.scale: expected a logit scale in (0, 128], got {self.scale}")
        if not 0 <= self.margin < 2:
            raise ConfigError(f"task.margin: expected a margin in [0, 2), got {self.margin}")
        if self.P < 2 or self.K < 2:
            raise ConfigError(f"task.identities_per_batch / images_per_identity: need at least 2 each (batch-hard "
                              f"triplets need positives and negatives), got {self.P} / {self.K}")

    @classmethod
    def from_facts(cls, facts, options: dict) -> "FaceTask":
        check_options("option of task face", options, cls.OPTIONS)
        refuse_label_smoothing(options, "margin and triplet losses have no label smoothing")
        kw = {k: options[k] for k in cls.OPTIONS[1:] if k in options}
        return cls(int(facts.num_classes), **kw)

    @classmethod
    def check_data(cls, bundle) -> None:
        if bundle.task not in ("face", "classification") or len(bundle.input_shape) != 3:
            raise ConfigError(f"task.name: face needs images labelled by person (data set faces, or an image "
                              f"classification set); '{bundle.name}' is {bundle.task}")

    @classmethod
    def num_outputs(cls, bundle) -> int:
        return int(bundle.num_classes)

    @classmethod
    def model_options(cls, facts, entry=None) -> dict:
        return {"in_chans": int(facts.input_shape[0]), "num_classes": int(facts.num_classes)}

    @classmethod
    def check_model(cls, model, facts) -> None:
        if getattr(model, "output_kind", None) != "embedding":
            raise ConfigError(f"model.name: {getattr(model, 'model_name', type(model).__name__)} is not a face "
                              "embedder; use face_cnn or face_resnet")

    def train_loader(self, bundle, data_cfg, seed: int, device):
        if self.kind != "triplet":
            return super().train_loader(bundle, data_cfg, seed, device)
        from lamina.data.faces import identity_batches
        from lamina.data.transforms import build_transforms

        augment = build_transforms(data_cfg.augment) if data_cfg.augment else None
        return identity_batches(bundle.train, self.P, self.K, seed, device, augment)

    # ----- per batch -------------------------------------------------------------------------------------
    def forward(self, model, batch) -> FaceOutput:
        emb = model.forward_head(model.forward_features(batch["x"]), pre_logits=True)
        return FaceOutput(emb, model.head(emb) if self.num_classes else emb[:, :0])

    def loss(self, outputs: FaceOutput, batch) -> torch.Tensor:
        y = batch["y"]
        if self.kind == "triplet":
            return batch_hard_triplet(outputs.emb, y, self.margin)[0]
        known = y < self.num_classes
        if not bool(known.all()):  # unseen identities (verification test people): no class to pull towards
            if not bool(known.any()):
                return outputs.emb.sum() * 0.0
            outputs, y = FaceOutput(outputs.emb[known], outputs.cos[known]), y[known]
        logits = margin_logits(outputs.cos, y, self.kind, self.scale, self.margin)
        return torch.nn.functional.cross_entropy(logits, y)

    def train_stats(self, outputs: FaceOutput, batch):
        if not self.num_classes:
            return {}
        return {"correct": (outputs.cos.detach().argmax(-1) == batch["y"]).sum()}

    def summarize_train(self, sums: dict, n: int) -> dict:
        return {"top1": float(sums["correct"]) / max(n, 1)} if "correct" in sums else {}

    def make_metrics(self):
        return FaceMetrics(self.num_classes)

    def update_metrics(self, metrics, outputs: FaceOutput, batch) -> None:
        metrics.update(outputs, batch["y"])

    def predict(self, outputs: FaceOutput) -> dict[str, torch.Tensor]:
        """The nearest training identity and its cosine (a similarity in [-1, 1], not a probability)."""
        score, label = outputs.cos.float().max(-1)
        return {"label": label, "confidence": score}

    def test_extras(self, model, bundle, split: str, device, run_dir=None, progress=None) -> dict:
        """Identification by enrolment: training images -> templates; each image of `split` whose person was
        enrolled is matched to the nearest template (gallery_top1) and to the nearest training image (nn_top1)."""
        data = getattr(bundle, split, None)
        if data is None or split == "train":
            return {}
        known = data.y < self.num_classes
        if not bool(known.any()):
            return {}
        gal = embed_split(model, bundle.train, device)
        probe = embed_split(model, data.subset(known.nonzero().flatten()), device)
        ids, t = templates(gal, bundle.train.y)
        truth = data.y[known]
        g1 = ids[(probe @ t.t()).argmax(-1)] == truth
        nn1 = bundle.train.y[(probe @ gal.t()).argmax(-1)] == truth
        return {f"{split}/gallery_top1": float(g1.float().mean()), f"{split}/nn_top1": float(nn1.float().mean())}


__all__ = ["FaceMetrics", "FaceOutput", "FaceTask", "LOSSES", "embed_all", "embed_split", "pair_scores",
           "templates", "verification"]
