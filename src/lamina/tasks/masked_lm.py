"""Masked language modeling (BERT's pre-training objective): corrupt tokens, predict the originals.

Each batch is masked on the fly (dynamic masking, as RoBERTa: a sequence gets new masks every epoch):

* every real token (inside its length, not a special id: <pad>, <s>, </s>, ...) is selected with
  probability `mask_prob` (15%), independently;
* a selected token becomes <mask> with probability `mask_token_frac` (80%), a random token with
  probability `random_token_frac` (10%), and stays unchanged otherwise (10%). Random tokens are drawn
  uniformly from the non-special ids (BERT draws from the whole vocabulary; a random <pad> or <mask> would
  only teach the model about ids it never has to predict);
* the loss is cross-entropy on the selected positions only (labels -100 elsewhere).

Only the selected positions go through the model's head: the task calls `forward_features`, gathers those
states and calls the position-wise `forward_head` on them (the masked-LM model contract, see
lamina.models.bert), so outputs are (N_selected, V) logits and a large vocabulary costs ~15% of the full
(B, T, V) projection. Metrics: masked-token accuracy and perplexity (exp of the mean NLL over selected tokens).

Randomness: masks come from the task's own torch.Generator (CPU, seeded by `seed`), never from the global
RNG, so they do not depend on dropout or on the device. `state_dict()` / `load_state_dict()` carry it
across a resume. Evaluation draws from a second generator re-seeded at the start of every evaluation
(`make_metrics`), so every validation pass scores the same masked positions and epochs compare fairly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchmetrics
from torchmetrics.text import Perplexity

from lamina.errors import ConfigError, DataError
from lamina.tasks.base import BaseTask, check_options

IGNORE = -100  # label of positions that are not scored (torch's cross-entropy default ignore_index)


def mask_tokens(ids: torch.Tensor, eligible: torch.Tensor, mask_id: int, random_ids: torch.Tensor,
                generator: torch.Generator, mask_prob: float = 0.15, mask_token_frac: float = 0.8,
                random_token_frac: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption. ids (B, T), eligible (B, T) bool (positions that may be selected), random_ids (R,)
    the ids a random replacement is drawn from -> (corrupted ids (B, T), labels (B, T): the original id at
    selected positions, IGNORE elsewhere). Draws on the CPU from `generator`, then moves to ids.device."""
    B, T = ids.shape
    u = torch.rand(B, T, 2, generator=generator)  # (B, T, 2): selection draw, then the 80/10/10 draw
    pick = torch.randint(len(random_ids), (B, T), generator=generator)  # (B, T) index into random_ids
    u, pick = u.to(ids.device), pick.to(ids.device)
    selected = eligible & (u[..., 0] < mask_prob)  # (B, T)
    to_mask = selected & (u[..., 1] < mask_token_frac)
    to_random = selected & (u[..., 1] >= mask_token_frac) & (u[..., 1] < mask_token_frac + random_token_frac)
    out = torch.where(to_mask, torch.full_like(ids, mask_id), ids)
    out = torch.where(to_random, random_ids.to(ids.device)[pick], out)
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE))
    return out, labels


class MaskedLMTask(BaseTask):
    name = "masked_lm"
    default_monitor = ("val/loss", "min")
    OPTIONS = ("mask_prob", "mask_token_frac", "random_token_frac", "seed", "label_smoothing")

    def __init__(self, vocab_size: int, mask_id: int, special_ids=(), pad_id: int = 0, mask_prob: float = 0.15,
                 mask_token_frac: float = 0.8, random_token_frac: float = 0.1, seed: int = 0,
                 label_smoothing: float = 0.0):
        self.vocab_size, self.mask_id, self.pad_id = int(vocab_size), int(mask_id), int(pad_id)
        for name, v in (("mask_prob", mask_prob), ("mask_token_frac", mask_token_frac),
                        ("random_token_frac", random_token_frac)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v <= 1.0:
                raise ConfigError(f"task.{name}: expected a number in [0, 1], got {v!r}")
        if not 0.0 < mask_prob:
            raise ConfigError(f"task.mask_prob: expected a number in (0, 1], got {mask_prob!r}")
        if mask_token_frac + random_token_frac > 1.0:
            raise ConfigError(f"task.mask_token_frac + task.random_token_frac must be <= 1, got "
                              f"{mask_token_frac} + {random_token_frac}")
        if not 0 <= self.mask_id < self.vocab_size:
            raise DataError(f"masked_lm: mask id {mask_id} is outside the vocabulary [0, {vocab_size})")
        self.mask_prob, self.mask_token_frac, self.random_token_frac = mask_prob, mask_token_frac, random_token_frac
        self.label_smoothing = float(label_smoothing)
        self.special_ids = torch.tensor(sorted({int(i) for i in special_ids} | {self.mask_id, self.pad_id}),
                                        dtype=torch.long)
        vocab = torch.arange(self.vocab_size)
        self.random_ids = vocab[~torch.isin(vocab, self.special_ids)]  # (R,) replacement candidates
        if len(self.random_ids) == 0:
            raise DataError(f"masked_lm: every id of the {vocab_size}-token vocabulary is special; nothing to predict")
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)  # training masks
        self.eval_generator = torch.Generator().manual_seed(self.seed + 1)  # re-seeded per evaluation

    # ----- runner protocol ----------------------------------------------------------------------
    @classmethod
    def from_facts(cls, facts, options: dict) -> "MaskedLMTask":
        check_options("option of task masked_lm", options, cls.OPTIONS)
        meta = facts.meta
        for key in ("vocab_size", "mask_id"):
            if key not in meta:
                raise DataError(f"data set '{facts.name}' has no {key} in its meta; masked_lm needs a "
                                f"tokenized data set with a <mask> token (e.g. text_mlm)")
        return cls(meta["vocab_size"], meta["mask_id"], meta.get("special_ids", ()), meta.get("pad_id", 0),
                   **options)

    @classmethod
    def model_options(cls, facts, entry=None) -> dict:
        meta = facts.meta
        return {"vocab_size": int(meta["vocab_size"]), "block_size": int(meta["block_size"])}

    @classmethod
    def check_model(cls, model, facts) -> None:
        kind = getattr(model, "output_kind", "next_token")
        if kind != "masked_lm":
            raise ConfigError(f"model.name: {getattr(model, 'model_name', type(model).__name__)} is not a masked "
                              f"language model (output_kind {kind!r}); use bert_mlm_mini")

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    # ----- the task -----------------------------------------------------------------------------
    def eligible(self, ids: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """(B, T) bool: positions inside each sequence that hold a non-special token."""
        ok = ~torch.isin(ids, self.special_ids.to(ids.device))
        if lengths is not None:
            ok &= torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
        return ok

    def corrupt(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        ids = batch["ids"]
        return mask_tokens(ids, self.eligible(ids, batch.get("lengths")), self.mask_id, self.random_ids,
                           generator, self.mask_prob, self.mask_token_frac, self.random_token_frac)

    def forward(self, model, batch):
        """Mask the batch, encode it, and score the selected positions: logits (N_selected, V).
        The labels of those positions are left in batch["labels"] (N_selected,) for loss and metrics."""
        inputs, labels = self.corrupt(batch, self.generator if model.training else self.eval_generator)
        kwargs = {"lengths": batch["lengths"]} if "lengths" in batch else {}
        h = model.forward_features(inputs, **kwargs)  # (B, T, C)
        sel = labels != IGNORE  # (B, T)
        batch["labels"] = labels[sel]  # (N,)
        return model.forward_head(h[sel])  # (N, V)

    def loss(self, outputs, batch):
        # Sum / max(N, 1): a batch where nothing was selected gives loss 0, not NaN.
        n = max(outputs.shape[0], 1)
        return F.cross_entropy(outputs.float(), batch["labels"], reduction="sum",
                               label_smoothing=self.label_smoothing) / n

    def train_stats(self, outputs, batch):
        correct = (outputs.detach().argmax(-1) == batch["labels"]).sum()
        return {"correct": correct, "masked": torch.tensor(outputs.shape[0], device=outputs.device)}

    def summarize_train(self, sums: dict, n: int) -> dict:
        return {"acc": float(sums["correct"]) / max(float(sums["masked"]), 1.0)} if sums else {}

    def make_metrics(self):
        self.eval_generator.manual_seed(self.seed + 1)  # every evaluation masks the same positions
        return torchmetrics.MetricCollection({
            "acc": torchmetrics.Accuracy(task="multiclass", num_classes=self.vocab_size),
            "ppl": Perplexity(),
        })

    def update_metrics(self, metrics, outputs, batch):
        if outputs.shape[0] == 0:
            return
        out = outputs.float()
        metrics["acc"].update(out, batch["labels"])
        metrics["ppl"].update(out[None], batch["labels"][None])  # Perplexity wants (B, T, V)

    def predict(self, outputs):
        probs = outputs.float().softmax(-1)
        conf, label = probs.max(-1)
        return {"label": label, "confidence": conf}
