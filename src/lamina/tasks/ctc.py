"""Speech recognition with CTC (Graves et al. 2006): frames -> per-frame token distributions -> transcripts.

Batch: x (B, T, n_mels) log-mel frames, x_len (B,), y (B, S) token ids padded with 0 (the blank id, never a
target), y_len (B,). The model's logits (B, T', V) and its `output_lengths(x_len)` give torch's ctc_loss its
inputs; decoding:

* greedy (best path): argmax per frame, merge repeats, drop blanks;
* prefix beam search (Hannun et al. 2014, no language model): keeps the `beam` most probable label prefixes,
  each with its probability of ending in a blank and in a non-blank (so "a a" and "a" stay apart), summed over
  every alignment that collapses to it. With a beam as wide as the search space it returns the most probable
  labelling; tests check it against brute-force enumeration of all alignments.

Metrics: word and character error rates of the decoded transcripts against the references, by torchmetrics
(words: the digit words "four zero seven"; characters: the same text, spaces included). Validation uses greedy
decoding (cheap); the test split adds beam search (test/wer_beam, test/cer_beam).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lamina.errors import ConfigError
from lamina.tasks.base import BaseTask, check_options, refuse_label_smoothing


def greedy_decode(logits: torch.Tensor, lengths: torch.Tensor, blank: int = 0) -> list[list[int]]:
    """Best path per sequence: (B, T, V) scores, (B,) valid frames -> token id lists."""
    best = logits.argmax(-1).cpu()  # (B, T)
    out = []
    for row, n in zip(best, lengths.cpu().tolist()):
        seq, prev = [], None
        for t in row[:n].tolist():
            if t != prev and t != blank:
                seq.append(t)
            prev = t
        out.append(seq)
    return out


def _logsumexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))


def prefix_beam_search(log_probs: torch.Tensor, beam: int = 8, blank: int = 0) -> list[int]:
    """One sequence's (T, V) log-probabilities -> the most probable labelling the beam finds (no LM)."""
    lp = log_probs.float().cpu().tolist()
    beams: dict[tuple, tuple[float, float]] = {(): (0.0, -math.inf)}  # prefix -> (log P ending blank, non-blank)
    V = len(lp[0]) if lp else 0
    for frame in lp:
        nxt: dict[tuple, list[float]] = {}

        def add(prefix, pb, pnb):
            cur = nxt.setdefault(prefix, [-math.inf, -math.inf])
            cur[0], cur[1] = _logsumexp(cur[0], pb), _logsumexp(cur[1], pnb)

        for prefix, (pb, pnb) in beams.items():
            total = _logsumexp(pb, pnb)
            add(prefix, total + frame[blank], -math.inf)  # a blank: the prefix stays, now ending in blank
            last = prefix[-1] if prefix else None
            for c in range(V):
                if c == blank:
                    continue
                p = frame[c]
                if c == last:
                    add(prefix, -math.inf, pnb + p)  # repeat without a blank between: merges into the same token
                    add(prefix + (c,), -math.inf, pb + p)  # after a blank: a new token
                else:
                    add(prefix + (c,), -math.inf, total + p)
        beams = dict(sorted(((k, (v[0], v[1])) for k, v in nxt.items()),
                            key=lambda kv: _logsumexp(*kv[1]), reverse=True)[:beam])
    return list(max(beams.items(), key=lambda kv: _logsumexp(*kv[1]))[0])


class CTCTask(BaseTask):
    name = "ctc"
    default_monitor = ("val/wer", "min")
    OPTIONS = ("label_smoothing", "beam")

    def __init__(self, vocab: list[str], blank: int = 0, beam: int = 8):
        self.vocab, self.blank, self.beam = list(vocab), int(blank), int(beam)

    @classmethod
    def from_facts(cls, facts, options: dict) -> "CTCTask":
        check_options("option of task ctc", options, cls.OPTIONS)
        refuse_label_smoothing(options, "CTC sums over alignments and has no label smoothing")
        beam = options.get("beam", 8)
        if not isinstance(beam, int) or isinstance(beam, bool) or not 1 <= beam <= 256:
            raise ConfigError(f"task.beam: expected an integer beam width in 1 .. 256, got {beam!r}")
        meta = facts.meta
        return cls(meta["vocab"], meta.get("blank", 0), beam)

    @classmethod
    def model_options(cls, facts, entry=None) -> dict:
        return {"n_mels": int(facts.meta["n_mels"]), "num_classes": int(facts.meta["vocab_size"])}

    @classmethod
    def check_model(cls, model, facts) -> None:
        if getattr(model, "output_kind", None) != "ctc":
            raise ConfigError(f"model.name: {getattr(model, 'model_name', type(model).__name__)} is not a CTC "
                              "acoustic model; use ctc_bilstm")

    # ----- per batch -------------------------------------------------------------------------------------
    def forward(self, model, batch):
        logits = model(batch["x"], lengths=batch["x_len"])  # (B, T', V)
        batch["out_len"] = model.output_lengths(batch["x_len"]).clamp(max=logits.shape[1])
        return logits

    def loss(self, outputs, batch) -> torch.Tensor:
        lp = F.log_softmax(outputs.float(), dim=-1).transpose(0, 1)  # (T', B, V), what ctc_loss takes
        return F.ctc_loss(lp, batch["y"], batch["out_len"], batch["y_len"], blank=self.blank, reduction="mean",
                          zero_infinity=True)

    def train_stats(self, outputs, batch):
        return {}

    def summarize_train(self, sums: dict, n: int) -> dict:
        return {}

    def text(self, tokens) -> str:
        return " ".join(self.vocab[t] for t in tokens if t != self.blank)

    def references(self, batch) -> list[str]:
        return [self.text(row[:n].tolist()) for row, n in zip(batch["y"].cpu(), batch["y_len"].cpu().tolist())]

    def make_metrics(self):
        from torchmetrics import MetricCollection
        from torchmetrics.text import CharErrorRate, WordErrorRate

        return MetricCollection({"wer": WordErrorRate(), "cer": CharErrorRate()})

    def update_metrics(self, metrics, outputs, batch):
        hyp = [self.text(s) for s in greedy_decode(outputs, batch["out_len"], self.blank)]
        metrics.update(hyp, self.references(batch))

    def predict(self, outputs):
        return {"logits": outputs}

    # ----- run building ----------------------------------------------------------------------------------
    def test_extras(self, model, bundle, split: str, device, run_dir=None, progress=None) -> dict:
        """Beam-search error rates on the split (greedy is what val/test wer report)."""
        from torchmetrics.text import CharErrorRate, WordErrorRate
        from lamina.data import make_loader

        data = getattr(bundle, split)
        wer, cer = WordErrorRate(), CharErrorRate()
        was = model.training
        model.eval()
        loader = make_loader(data, 256, device=device, trim=bundle.meta.get("pad_trim"))
        if progress is not None:
            progress(0, len(loader))
        with torch.no_grad():
            for i, batch in enumerate(loader):
                logits = self.forward(model, batch)
                lp = F.log_softmax(logits.float(), -1)
                hyp = [self.text(prefix_beam_search(lp[i, :n], self.beam, self.blank))
                       for i, n in enumerate(batch["out_len"].tolist())]
                refs = self.references(batch)
                wer.update(hyp, refs)
                cer.update(hyp, refs)
                if progress is not None:
                    progress(i + 1, len(loader))
        model.train(was)
        return {f"{split}/wer_beam": float(wer.compute()), f"{split}/cer_beam": float(cer.compute())}


__all__ = ["CTCTask", "greedy_decode", "prefix_beam_search"]
