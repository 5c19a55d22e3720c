"""Fit a pretrained model to a run's data: input channels, input size and scale, and a new head.

* Channels: a pretrained RGB stem on 1-channel images gets its kernels summed over RGB (a gray image equals the
  same value in all three channels, so the summed conv computes exactly what the RGB conv would on it); other
  channel counts repeat the RGB kernels and rescale them by 3 / C (timm's `adapt_input_conv` rule).
* Scale and size: a forward pre-hook (applied from outside, the model code is untouched) resizes images to
  `input_size` and normalizes them with the pretrained preprocessing's mean/std (lamina.nn.Normalize), at training
  and evaluation.
* Head: `reset_classifier(num_classes)` (the zoo's classifier contract).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lamina.errors import ConfigError
from lamina.nn.preprocess import Normalize


def adapt_input_channels(model: nn.Module, in_chans: int) -> str | None:
    """Change the first Conv2d to take `in_chans` channels (pretrained kernels kept); returns its name."""
    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d):
            if conv.in_channels == in_chans:
                return None
            w = conv.weight.detach()  # (out, 3, k, k)
            if in_chans == 1:
                new_w = w.sum(1, keepdim=True)
            else:
                reps = -(-in_chans // w.shape[1])
                new_w = w.repeat(1, reps, 1, 1)[:, :in_chans] * (w.shape[1] / in_chans)
            new = type(conv)(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
            with torch.no_grad():
                new.weight.copy_(new_w)
                if conv.bias is not None:
                    new.bias.copy_(conv.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
            return name
    raise ConfigError("pretrained: the model has no Conv2d to take the images' channels")


def add_input_preprocessing(model: nn.Module, preprocess: dict | None, input_size: int | None, in_chans: int):
    """A forward pre-hook: resize (B, C, H, W) inputs to input_size and normalize with the pretrained mean/std."""
    pre = preprocess or {}
    mean, std = pre.get("mean"), pre.get("std")
    if mean is not None and in_chans != len(mean):  # gray input: the channel mean of the RGB statistics
        mean, std = [sum(mean) / len(mean)] * in_chans, [sum(std) / len(std)] * in_chans
    normalize = Normalize(mean, std) if mean is not None else None  # not a submodule: the model's tree is unchanged
    mode = pre.get("interpolation", "bilinear")

    def hook(module, args):
        x, *rest = args
        if input_size is not None and x.shape[-1] != input_size:
            x = F.interpolate(x.float(), size=(input_size, input_size), mode=mode, align_corners=False,
                              antialias=mode in ("bilinear", "bicubic") and x.shape[-1] > input_size)
        if normalize is not None:
            x = normalize(x)
        return (x, *rest)

    model.register_forward_pre_hook(hook)
    model.input_preprocessing = {"input_size": input_size, "mean": mean, "std": std}  # shown in summaries


def adapt_pretrained(model: nn.Module, info: dict, facts, input_size: int | None = None) -> nn.Module:
    """The pretrained `model` (from lamina.hub.load) made to fit a run's data facts (see the module docstring)."""
    task, shape = facts.task, tuple(facts.input_shape)
    if task == "sequence_classification":  # a text encoder: the data was tokenized with its own tokenizer
        vocab = int(facts.meta["vocab_size"])
        if getattr(model, "vocab_size", vocab) != vocab or not hasattr(model, "reset_classifier"):
            raise ConfigError(f"model.pretrained: the encoder's vocabulary ({getattr(model, 'vocab_size', '?')}) "
                              f"is not the data's ({vocab}); the data must be tokenized with the pretrained "
                              "tokenizer.json (done automatically for sources that ship one)")
        model.reset_classifier(int(facts.num_classes or facts.num_outputs))
        return model.train()
    if task == "question_answering":  # a BERT encoder gets a fresh span head in place of its own
        from lamina.models.bert import span_qa_from

        vocab = int(facts.meta["vocab_size"])
        if getattr(model, "vocab_size", None) != vocab:
            raise ConfigError(f"model.pretrained: the encoder's vocabulary ({getattr(model, 'vocab_size', '?')}) is "
                              f"not the data's ({vocab}); the data must be tokenized with the pretrained tokenizer.json")
        if getattr(model, "output_kind", None) != "span":
            model = span_qa_from(model)
        return model.train()
    if task == "language_modeling":  # a token LM trains on (more) text, in full or with LoRA: same vocabulary
        return _language_model(model, info, facts)
    if task != "classification" or len(shape) != 3:
        raise ConfigError(f"model.pretrained: fine-tuning from pretrained weights supports image and text "
                          f"classification and language-modeling runs so far (this run: {task}, input {shape})")
    if not hasattr(model, "reset_classifier"):
        raise ConfigError(f"model.pretrained: the {info.get('family')} model has no classifier head to replace")
    adapt_input_channels(model, shape[0])
    add_input_preprocessing(model, info.get("preprocess"), input_size, shape[0])
    model.reset_classifier(int(facts.num_outputs))
    model.train()
    return model


def _tokenizer_chars(path) -> list[str] | None:
    """The id-ordered tokens of a character-level (WordLevel) tokenizer.json, [] for another kind, None if none."""
    if not path:
        return None
    from lamina.hub.hf import _read_json  # same package: the size-capped, one-line-error JSON reader
    from pathlib import Path

    model = _read_json(Path(path)).get("model") or {}
    vocab = model.get("vocab") if model.get("type") == "WordLevel" else None
    if not isinstance(vocab, dict):
        return []
    return [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]


def _language_model(model: nn.Module, info: dict, facts) -> nn.Module:
    """A next-token model kept whole for a language-modeling run: its vocabulary must be the data's (the same
    characters in the same order when both say which) and its context at least the data's block size."""
    vocab, block = int(facts.num_outputs), int(facts.meta["block_size"])
    name = info.get("family") or type(model).__name__
    if getattr(model, "output_kind", "next_token") != "next_token" or getattr(model, "vocab_size", None) != vocab:
        raise ConfigError(f"model.pretrained: a language-modeling run continues a next-token model over the data's "
                          f"{vocab}-token vocabulary; {name} has {getattr(model, 'vocab_size', 'no')} token(s)")
    chars, theirs = facts.meta.get("vocab"), info.get("vocab") or _tokenizer_chars(info.get("tokenizer"))
    if chars is not None and theirs is not None and list(theirs) != list(chars):
        raise ConfigError(f"model.pretrained: {name}'s vocabulary is not the data's characters (same size, other "
                          "tokens or order); train on the text it was trained on, or from scratch")
    if getattr(model, "block_size", block) < block:
        raise ConfigError(f"model.pretrained: {name} handles {model.block_size} positions, fewer than "
                          f"data.block_size={block}")
    return model.train()
