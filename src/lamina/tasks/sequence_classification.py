"""Sequence classification: padded token ids -> one class per sequence (sentiment, topic, speaker, ...).

Loss, training stats, metrics (accuracy, macro-F1) and predictions are ClassificationTask's; what this task
adds is the batch adapter for token models and the runner protocol. A batch holds

    ids (B, T) int64 right-padded token ids, lengths (B,) real tokens per row, y (B,) class ids
    (optional) attention_mask (B, T) instead of lengths, token_type_ids (B, T) for sentence pairs

and the model is called as `model(ids, lengths=lengths)` (or `attention_mask=`), the sequence-classifier
contract that lstm_classifier and the bert_* classifiers share (output_kind "sequence": logits (B, K)).
"""

from __future__ import annotations

from lamina.errors import ConfigError, DataError
from lamina.tasks.base import BaseTask, check_options
from lamina.tasks.classification import ClassificationTask


class SequenceClassificationTask(ClassificationTask):
    name = "sequence_classification"
    default_monitor = ("val/acc", "max")
    OPTIONS = ("label_smoothing",)

    @classmethod
    def check_data(cls, bundle) -> None:  # the data set's own kind (token ids), not classification's images
        BaseTask.check_data.__func__(cls, bundle)

    @classmethod
    def num_outputs(cls, bundle) -> int:
        return BaseTask.num_outputs.__func__(cls, bundle)

    @classmethod
    def from_facts(cls, facts, options: dict) -> "SequenceClassificationTask":
        check_options("option of task sequence_classification", options, cls.OPTIONS)
        n = facts.num_classes or facts.num_outputs
        if not n or int(n) < 2:
            raise DataError(f"data set '{facts.name}' has {n} classes; sequence classification needs at least 2")
        return cls(int(n), **options)

    @classmethod
    def model_options(cls, facts, entry=None) -> dict:
        meta = facts.meta
        return {"vocab_size": int(meta["vocab_size"]), "block_size": int(meta["block_size"]),
                "num_classes": int(facts.num_classes or facts.num_outputs)}

    @classmethod
    def check_model(cls, model, facts) -> None:
        kind = getattr(model, "output_kind", "next_token")
        if kind != "sequence":
            raise ConfigError(f"model.name: {getattr(model, 'model_name', type(model).__name__)} does not classify "
                              f"sequences (output_kind {kind!r}); use bert_mini, bert_minilm_l6 or lstm_classifier")

    def forward(self, model, batch):
        kwargs = {}
        if "lengths" in batch:
            kwargs["lengths"] = batch["lengths"]
        elif "attention_mask" in batch:
            kwargs["attention_mask"] = batch["attention_mask"]
        if "token_type_ids" in batch:
            kwargs["token_type_ids"] = batch["token_type_ids"]
        return model(batch["ids"], **kwargs)  # (B, num_classes)
