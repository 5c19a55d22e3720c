"""Sequence to sequence (translation): teacher forcing, label-smoothed cross-entropy, BLEU with sacrebleu.

Batches come from lamina.data.parallel: src (B, S), tgt = <s> y </s> (B, T), right-padded with pad_id.
The model reads tgt[:, :-1] and predicts tgt[:, 1:]; padding positions are ignored by the loss and metrics.

Per-epoch validation reports what is cheap (token loss, perplexity, token accuracy). BLEU needs decoding,
so it runs once at test time (`test_extras`): beam search (beam_size, GNMT length penalty alpha), detokenize
with the run's tokenizer, and sacrebleu's corpus BLEU against the untouched reference strings (its default
13a tokenization: the comparable, "detokenized" BLEU of the WMT tables). The translations are written beside
the run (translations_<split>.txt) so a score can always be checked by eye.

Summarization is the same task with `metric: rouge`: test_extras reports ROUGE-1/2/L F-measure (x100, the
rouge-score package with its Porter stemmer, as the summarization literature reports it); where an example
has several references (SciTLDR's test set) the reference with the best ROUGE-1 F gives that example's three
numbers ("multi-max" in SciTLDR's scripts/cal-rouge.py; rouge-score's score_multi would instead take each
metric's own best reference), then the numbers are averaged over examples. The summaries go to summaries_<split>.txt. `no_repeat_ngram`
blocks repeated n-grams during beam search (summaries of a small model otherwise loop).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchmetrics
from torchmetrics.text import Perplexity

from lamina.errors import ConfigError, DataError, MissingDependencyError
from lamina.tasks.base import BaseTask, check_options


class Seq2SeqTask(BaseTask):
    name = "seq2seq"
    default_monitor = ("val/loss", "min")
    OPTIONS = ("label_smoothing", "beam_size", "alpha", "max_len_a", "max_len_b", "decode_batch_size", "metric",
               "no_repeat_ngram")
    METRICS = ("bleu", "rouge")

    def __init__(self, vocab_size: int, pad_id: int = 0, label_smoothing: float = 0.1, beam_size: int = 4,
                 alpha: float = 0.6, max_len_a: float = 1.5, max_len_b: int = 10, decode_batch_size: int = 128,
                 metric: str = "bleu", no_repeat_ngram: int = 0):
        if metric not in self.METRICS:
            raise ConfigError(f"task.metric: expected one of {', '.join(self.METRICS)}, got {metric!r}")
        if not isinstance(no_repeat_ngram, int) or isinstance(no_repeat_ngram, bool) or no_repeat_ngram < 0:
            raise ConfigError(f"task.no_repeat_ngram: expected an integer >= 0 (0 = off), got {no_repeat_ngram!r}")
        self.metric, self.no_repeat_ngram = metric, no_repeat_ngram
        self.vocab_size, self.pad_id = int(vocab_size), int(pad_id)
        self.label_smoothing = float(label_smoothing)
        if not isinstance(beam_size, int) or beam_size < 1:
            raise ConfigError(f"task.beam_size: expected an integer >= 1, got {beam_size!r}")
        self.beam_size, self.alpha = beam_size, float(alpha)
        # decode at most a * source length + b tokens (fairseq's max_len_a/b): translations are rarely longer
        self.max_len_a, self.max_len_b = float(max_len_a), int(max_len_b)
        self.decode_batch_size = int(decode_batch_size)

    @classmethod
    def from_facts(cls, facts, options: dict) -> "Seq2SeqTask":
        check_options("seq2seq option", options, cls.OPTIONS)
        meta = facts.meta
        return cls(meta["vocab_size"], meta.get("pad_id", 0), **options)

    @classmethod
    def model_options(cls, facts, entry=None) -> dict:
        meta = facts.meta
        return {"vocab_size": int(meta["vocab_size"]), "pad_id": meta.get("pad_id", 0),
                "bos_id": meta.get("bos_id", 2), "eos_id": meta.get("eos_id", 3)}

    @classmethod
    def check_model(cls, model, facts) -> None:
        if getattr(model, "output_kind", None) != "seq2seq":
            raise ConfigError(f"model.name: {getattr(model, 'model_name', type(model).__name__)} is not an "
                              "encoder-decoder model; seq2seq data needs one such as t5_mini")

    # ----- training ------------------------------------------------------------------------------------
    def forward(self, model, batch):
        src = batch["src"]
        return model(src, batch["tgt"][:, :-1], src != self.pad_id)  # (B, T-1, V)

    def loss(self, outputs, batch):
        y = batch["tgt"][:, 1:]
        return F.cross_entropy(outputs.float().reshape(-1, outputs.size(-1)), y.reshape(-1),
                               ignore_index=self.pad_id, label_smoothing=self.label_smoothing)

    def train_stats(self, outputs, batch):
        y = batch["tgt"][:, 1:]
        real = y != self.pad_id
        return {"correct": ((outputs.detach().argmax(-1) == y) & real).sum(), "tokens": real.sum()}

    def summarize_train(self, sums: dict, n: int) -> dict:
        return {"acc": float(sums["correct"]) / max(float(sums["tokens"]), 1.0)}

    def make_metrics(self):
        return torchmetrics.MetricCollection({
            "ppl": Perplexity(ignore_index=self.pad_id),
            "acc": torchmetrics.Accuracy(task="multiclass", num_classes=self.vocab_size, ignore_index=self.pad_id),
        })

    def update_metrics(self, metrics, outputs, batch):
        out, y = outputs.float(), batch["tgt"][:, 1:]
        metrics["ppl"].update(out, y)
        metrics["acc"].update(out.reshape(-1, out.size(-1)), y.reshape(-1))

    def predict(self, outputs):
        probs = outputs.float().softmax(-1)
        conf, label = probs.max(-1)
        return {"label": label, "confidence": conf}

    # ----- decoding and BLEU ---------------------------------------------------------------------------
    @torch.no_grad()
    def translate(self, model, tokenizer, sources: list[str], device=None, max_len: int | None = None,
                  on_batch=None, progress=None) -> list[str]:
        """Beam-search translations of raw source strings, detokenized. `on_batch(n)` after each batch of n;
        `progress(done, total)` counts sentences."""
        from lamina.models.generation import seq2seq_generate

        device = device or next(model.parameters()).device
        model = model.to(device).eval()
        ids = tokenizer.encode_batch(sources)
        cap = max_len or getattr(model, "block_size", 128)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths per batch: less padding
        out: list[str] = [""] * len(ids)
        if progress is not None:
            progress(0, len(ids))
        for b in range(0, len(order), self.decode_batch_size):
            rows = order[b:b + self.decode_batch_size]
            src, src_len = tokenizer.pad([ids[i] for i in rows], eos=True, max_len=cap)
            limit = min(cap, int(self.max_len_a * int(src_len.max()) + self.max_len_b))
            hyp = seq2seq_generate(model, src.to(device), beam_size=self.beam_size, max_len=limit,
                                   alpha=self.alpha, no_repeat_ngram_size=self.no_repeat_ngram)
            for i, text in zip(rows, tokenizer.decode_batch(hyp.cpu())):
                out[i] = text
            if on_batch is not None:
                on_batch(len(rows))
            if progress is not None:
                progress(min(b + len(rows), len(ids)), len(ids))
        return out

    def generate(self, model, facts, prompt: str, device, *, tokenizer=None, on_text=None, progress=None,
                 **sampling) -> str:
        """Translations of the prompt's lines (beam search; sampling options do not apply); `progress(done,
        total)` counts translated lines."""
        from lamina.data.tokenizers import load_tokenizer

        if not prompt.strip():
            raise DataError("prompt: empty; give a sentence to translate, e.g. --prompt 'A dog runs.'")
        lines = [line for line in prompt.splitlines() if line.strip()]
        text = "\n".join(self.translate(model, load_tokenizer(tokenizer), lines, device, progress=progress))
        if on_text:
            on_text(text)
        return text

    def test_extras(self, model, bundle, split: str, device, run_dir: Path | None = None,
                    progress=None) -> dict:
        if self.metric == "rouge":
            return self._rouge_extras(model, bundle, split, device, run_dir, progress)
        try:
            import sacrebleu
        except ImportError:
            raise MissingDependencyError('sacrebleu is needed for BLEU; install it with pip install "lamina[text]"'
                                         ) from None
        sources, refs = bundle.extras["text"][split]
        hyps = self.translate(model, bundle.extras["tokenizer"], sources, device, progress=progress)
        bleu = sacrebleu.corpus_bleu(hyps, [refs])
        chrf = sacrebleu.corpus_chrf(hyps, [refs])
        if run_dir is not None:
            # one line per source; a byte-level model can emit line breaks, which would break the alignment
            lines = [" ".join(h.splitlines()) for h in hyps]
            (Path(run_dir) / f"translations_{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return {f"{split}/bleu": round(bleu.score, 2), f"{split}/chrf": round(chrf.score, 2)}

    def _rouge_extras(self, model, bundle, split: str, device, run_dir: Path | None, progress=None) -> dict:
        sources, refs = bundle.extras["text"][split]
        scorer = rouge_scorer()  # fail before decoding when rouge-score is missing
        hyps = self.translate(model, bundle.extras["tokenizer"], sources, device, progress=progress)
        if run_dir is not None:
            lines = [" ".join(h.splitlines()) for h in hyps]
            (Path(run_dir) / f"summaries_{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return {f"{split}/{k}": v for k, v in rouge_scores(hyps, refs, scorer).items()}


ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def rouge_scorer():
    """rouge-score's scorer for ROUGE-1/2/L with Porter stemming (lazy import: an optional dependency)."""
    try:
        from rouge_score import rouge_scorer as rs
    except ImportError:
        raise MissingDependencyError('rouge-score is needed for ROUGE; install it with pip install "lamina[text]" '
                                     '(or pip install rouge-score)'
                                     ) from None
    return rs.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)


def rouge_scores(hyps: list[str], refs: list, scorer=None) -> dict:
    """Mean ROUGE-1/2/L F-measure x 100 (rounded to 2 places) of hyps against refs; a reference is a string or
    a list of strings, and with several the one with the best ROUGE-1 F (the first on ties) gives all three
    numbers, as SciTLDR's evaluation does. Keys: rouge1, rouge2, rougeL."""
    if len(hyps) != len(refs):
        raise DataError(f"rouge: {len(hyps)} summaries but {len(refs)} references")
    scorer = scorer or rouge_scorer()
    sums = dict.fromkeys(ROUGE_KEYS, 0.0)
    for h, r in zip(hyps, refs):
        r = [r] if isinstance(r, str) else list(r)
        scores = max((scorer.score(t, h) for t in r), key=lambda sc: sc["rouge1"].fmeasure)  # first max wins
        for k in ROUGE_KEYS:
            sums[k] += scores[k].fmeasure
    n = max(len(hyps), 1)
    return {k: round(100.0 * v / n, 2) for k, v in sums.items()}
