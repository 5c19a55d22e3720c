"""Language modeling: next-token cross-entropy over every position; perplexity and next-token accuracy."""

from __future__ import annotations

import torch.nn.functional as F
import torchmetrics
from torchmetrics.text import Perplexity

from lamina.errors import ConfigError, DataError
from lamina.tasks.base import BaseTask


class LanguageModelingTask(BaseTask):
    name = "language_modeling"
    default_monitor = ("val/loss", "min")
    trains_new_head = False  # the output layer is the pretrained vocabulary projection (often tied)
    supports_context_parallel = True

    def __init__(self, vocab_size: int, label_smoothing: float = 0.0, ignore_index: int = -100):
        self.vocab_size, self.label_smoothing, self.ignore_index = int(vocab_size), label_smoothing, ignore_index

    # ----- building a run: token streams cut into windows ----------------------------------------------
    @classmethod
    def check_data(cls, bundle) -> None:
        if bundle.task != cls.name or "ids" not in bundle.train.tensors:
            raise ConfigError(f"task.name: {cls.name} does not fit data set '{bundle.name}' (task {bundle.task})")

    @classmethod
    def num_outputs(cls, bundle) -> int:
        return int(bundle.meta["vocab_size"])

    @classmethod
    def from_facts(cls, facts, options: dict) -> "LanguageModelingTask":
        return cls(facts.num_outputs)  # no label smoothing: perplexities stay comparable with other LMs

    @classmethod
    def model_options(cls, facts, entry) -> dict:
        if entry.input_kind != "tokens":
            raise ConfigError(f"model.name: data set '{facts.name}' is a token stream; use a token model "
                              f"(gpt, gpt_mini, ...), not {entry.name}")
        return {"vocab_size": facts.num_outputs, "block_size": int(facts.meta["block_size"])}

    @classmethod
    def check_model(cls, model, facts) -> None:
        kind = getattr(model, "output_kind", "next_token")
        name = getattr(model, "model_name", type(model).__name__)
        if kind != "next_token":
            raise ConfigError(f"model.name: {name} is not a language model (it predicts one label per "
                              f"{'sequence' if kind == 'sequence' else 'token'}); use gpt, char_lstm, ...")
        if model.block_size < facts.meta["block_size"]:
            raise ConfigError(f"model.block_size: {model.block_size} is shorter than data.block_size "
                              f"{facts.meta['block_size']}")

    def train_loader(self, bundle, data_cfg, seed: int, device):
        from lamina.data.windows import RandomWindowLoader

        block, ids = bundle.meta["block_size"], bundle.train.tensors["ids"]
        steps = data_cfg.steps_per_epoch or max(1, len(ids) // (data_cfg.batch_size * block))
        return RandomWindowLoader(ids, block, data_cfg.batch_size, steps, seed=seed, device=device)

    def eval_loader(self, data, bundle, data_cfg, device):
        from lamina.data.windows import SequentialWindowLoader

        return SequentialWindowLoader(data.tensors["ids"], bundle.meta["block_size"], data_cfg.eval_batch_size,
                                      device=device)

    def tokens_per_sample(self, facts) -> int:
        return int(facts.meta["block_size"])

    def generate(self, model, facts, prompt: str, device, *, tokenizer=None, on_text=None, progress=None,
                 max_new_tokens=200, temperature=1.0, top_k=None, top_p=None, greedy=False, seed=0, stop=None) -> str:
        """Sampled continuation of `prompt` (character vocabulary of the run); `on_text` streams each piece, which
        is its progress (`progress` is not called: one prompt, no bar between the streamed characters)."""
        import torch

        from lamina.data.files import decode_text, encode_text
        from lamina.models.generation import generate as _generate

        meta = facts.meta
        if not prompt:
            raise DataError("prompt: empty; give at least one character, e.g. --prompt 'ROMEO:'")
        idx = encode_text(meta, prompt)[None]
        stop_ids = tuple(encode_text(meta, stop).tolist()) if stop else ()
        model = model.to(device).eval()
        g = torch.Generator(device=device).manual_seed(seed)
        cb = (lambda tok: on_text(decode_text(meta, tok.reshape(-1)[:1]))) if on_text else None
        out = _generate(model, idx.to(device), max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        greedy=greedy, stop_tokens=stop_ids, generator=g, on_token=cb)
        return decode_text(meta, out[0, idx.shape[1]:].cpu())

    # ----- per batch -----------------------------------------------------------------------------------

    def forward(self, model, batch):
        if batch.get("positions") is not None:  # a context-parallel shard (lamina.engine.context_parallel)
            return model(batch["x"], positions=batch["positions"])  # (B, T, V)
        return model(batch["x"])  # (B, T, V)

    def loss(self, outputs, batch):
        return F.cross_entropy(outputs.float().reshape(-1, outputs.size(-1)), batch["y"].reshape(-1),
                               ignore_index=self.ignore_index, label_smoothing=self.label_smoothing)

    def train_stats(self, outputs, batch):
        return {}

    def summarize_train(self, sums: dict, n: int) -> dict:
        return {}

    def make_metrics(self):
        return torchmetrics.MetricCollection({
            "ppl": Perplexity(ignore_index=self.ignore_index),
            "acc": torchmetrics.Accuracy(task="multiclass", num_classes=self.vocab_size,
                                         ignore_index=self.ignore_index),
        })

    def update_metrics(self, metrics, outputs, batch):
        out = outputs.float()
        metrics["ppl"].update(out, batch["y"])
        metrics["acc"].update(out.reshape(-1, out.size(-1)), batch["y"].reshape(-1))

    def predict(self, outputs):
        probs = outputs.float()[:, -1].softmax(-1)
        conf, label = probs.max(-1)
        return {"label": label, "confidence": conf}
