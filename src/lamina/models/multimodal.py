"""Multimodal models: a CLIP-style dual encoder, and a fusion classifier over any subset of image, text and audio.

DualEncoder (clip_tiny, clip_small), after CLIP (Radford et al. 2021):

    image (B, C, H, W) -> image tower (any registered image model, built with num_classes=0) (B, Fi)
                       -> image_proj (no bias) -> L2 normalise                                   (B, E)
    text (B, L), text_mask (B, L) -> TextTransformer: wte + wpe -> n x pre-LN Block (bidirectional attention,
                       padding keys masked) -> ln_f -> pool: masked mean, or the last real token ("eos")  (B, W)
                       -> text_proj (no bias) -> L2 normalise                                    (B, E)
    logits_per_image = s * img @ txt.T (B, B);  logits_per_text = logits_per_image.T;  s = exp(logit_scale)

  `logit_scale` is learned, starts at log(1 / 0.07) and is capped at log(100) where it is used (CLIP clamps the
  parameter after each step; clamping at the point of use needs no hook in the training loop and gives the same
  scale; above the cap the parameter gets no gradient). The symmetric InfoNCE loss lives in
  lamina.tasks.contrastive. Zero-shot classification: `zero_shot_classifier(prompts)` encodes every prompt of
  every class, averages each class's L2-normalised prompt embeddings and normalises again (CLIP's prompt
  ensembling), giving a (K, E) matrix; `zero_shot_logits(image, classes)` scores images against it.

FusionClassifier (fusion_classifier):

    image (B, C, H, W)                  -> image tower (registered image model, num_classes=0) -> Linear -> LN
    text (B, L) [, text_mask]           -> word bag (masked mean) or TextTransformer           -> Linear -> LN
    audio (B, T, n_mels) [, audio_mask] -> AudioConvEncoder (1-D convs over time)              -> Linear -> LN
    -> (B, P, D) for the P modalities given -> fuse: masked mean, or one learned query attending over them
       (+ modality-type embeddings) -> (B, D) -> dropout -> head (B, num_classes)          (LN = LayerNorm)

  Any non-empty subset of the model's modalities may be passed; none is an InputShapeError. Modality dropout
  (train mode only): each sample drops each modality with probability `modality_dropout`, always keeping at
  least one, so the head learns to answer from whatever subset arrives (Neverova et al. 2015's ModDrop).

Multimodal contract (what the registry-wide tests and tools use instead of the single-input `input_spec`):
* keyword inputs; `modalities` (tuple of names); `input_specs`: per-sample shape of each keyword input, None for
  free dims, e.g. {"image": (1, None, None), "text": (None,), "text_mask": (None,)}
* `example_inputs(batch)` -> a dict of random keyword inputs that the model accepts
* masks are bool, True = a real position; when a mask is not given, text positions equal to `pad_id` (0) are
  padding and every audio frame is real
The fusion classifier also has the classifier contract (forward_features / forward_head / reset_classifier /
num_features / num_classes), taking keyword inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from lamina.errors import InputShapeError, ModelError, unknown_name
from lamina.models.contract import build_model, example_input
from lamina.models.gpt import Block
from lamina.models.registry import create_model, get_entry, register_model
from lamina.nn import FeedForward, LearnedPositionalEmbedding, MultiHeadAttention, init_weights, make_norm
from lamina.nn.init import init_transformer_

MODALITIES = ("image", "text", "audio")
TEXT_POOLS = ("mean", "eos")
TEXT_ENCODERS = ("bag", "transformer")
FUSIONS = ("mean", "attention")
_INT_DTYPES = (torch.int64, torch.int32)


def _positive(name: str, family: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelError(f"{family}: {name} must be a positive integer, got {value!r}")


def _image_tower(family: str, name: str, in_chans: int, options: dict) -> nn.Module:
    """A registered image model without its head: forward(x) -> pooled features (B, num_features)."""
    if get_entry(name).input_kind != "image":
        raise ModelError(f"{family}: image_tower must be an image model (small_cnn, cnn_medium, resnet18, ...), "
                         f"got '{name}' ({get_entry(name).input_kind} input)")
    return create_model(name, num_classes=0, in_chans=in_chans, **dict(options))


def _shape(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} tensor of shape {tuple(t.shape)}"


# ------------------------------------------------------------------------------------------------ text


class TextTransformer(nn.Module):
    """Token ids (B, L) + mask (B, L) -> pooled (B, width): a small bidirectional pre-LN transformer encoder.

    GPT-2's block (lamina.models.gpt.Block) with non-causal attention; padding keys are masked out, so a
    sequence's output does not depend on how much padding follows it. Init: GPT-2's N(0, 0.02^2), residual
    projections scaled by 1/sqrt(2 n_layer).
    """

    def __init__(self, vocab_size: int, max_len: int, width: int, n_layer: int, n_head: int, pool: str = "mean",
                 dropout: float = 0.0, pad_id: int = 0, name: str = "text transformer"):
        super().__init__()
        if pool not in TEXT_POOLS:
            raise ModelError(unknown_name(f"{name} pool", pool, TEXT_POOLS))
        if width % n_head:
            raise ModelError(f"{name}: width ({width}) must be divisible by the number of heads ({n_head})")
        self.vocab_size, self.max_len, self.width, self.pool, self.pad_id, self.name = (
            vocab_size, max_len, width, pool, pad_id, name)
        self.wte = nn.Embedding(vocab_size, width)
        self.wpe = LearnedPositionalEmbedding(max_len, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(attn=MultiHeadAttention(width, n_head, dropout=dropout, causal=False),
                  mlp=FeedForward(width, 4 * width, activation="gelu"),
                  ln_1=make_norm("layer", width), ln_2=make_norm("layer", width), dropout=dropout)
            for _ in range(n_layer))
        self.ln_f = make_norm("layer", width)
        init_transformer_(self, n_layer)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.max_len:
            raise InputShapeError(f"{self.name} handles at most max_len={self.max_len} tokens, got {ids.shape[1]}")
        x = self.drop(self.wpe(self.wte(ids)))  # (B, L, W)
        for blk in self.blocks:
            x = blk(x, key_padding_mask=mask)  # (B, L, W)
        x = self.ln_f(x)
        if self.pool == "eos":  # the last real token (right padding): CLIP's EOS pooling
            last = (mask.sum(1) - 1).clamp(min=0)  # (B,)
            return x[torch.arange(len(x), device=x.device), last]  # (B, W)
        m = mask.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        return (x * m).sum(1) / m.sum(1).clamp(min=1.0)  # masked mean (B, W)


class BagOfEmbeddings(nn.Module):
    """Token ids (B, L) + mask -> masked mean of token embeddings (B, width): order-free, fast, enough for words."""

    def __init__(self, vocab_size: int, width: int):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.wte.weight, std=0.02)
        self.width = width

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(self.wte.weight.dtype)  # (B, L, 1)
        return (self.wte(ids) * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, W)


def _text_inputs(model_name: str, text: torch.Tensor, mask: torch.Tensor | None, pad_id: int,
                 vocab_size: int) -> torch.Tensor:
    """Validate (B, L) token ids and return the (B, L) bool mask (default: ids != pad_id)."""
    if text.dim() != 2 or text.dtype not in _INT_DTYPES:
        raise InputShapeError(f"model {model_name} expects text as token ids of shape (B, L) and dtype int64, "
                              f"got {_shape(text)}")
    if mask is None:
        mask = text != pad_id
    elif mask.dtype != torch.bool or mask.shape != text.shape:
        raise InputShapeError(f"model {model_name} expects text_mask as a bool tensor of the text's shape "
                              f"{tuple(text.shape)} (True = real token), got {_shape(mask)}")
    if text.device.type == "cpu" and text.numel():  # free on CPU; on an accelerator it would sync every step
        lo, hi = int(text.min()), int(text.max())
        if lo < 0 or hi >= vocab_size:
            raise InputShapeError(f"model {model_name}: token id {lo if lo < 0 else hi} is outside the vocabulary "
                                  f"[0, {vocab_size}); build the model with the data set's vocab_size")
    return mask


# ------------------------------------------------------------------------------------------ dual encoder


@dataclass
class CLIPConfig:
    in_chans: int = 1  # grayscale Fashion-MNIST / digits
    image_tower: str = "small_cnn"  # any registered image model; built with num_classes=0 (pooled features)
    image_options: dict = field(default_factory=dict)  # its config overrides, e.g. {channels: [32, 64, 128]}
    vocab_size: int = 64  # a small word vocabulary (captions built from class names); the data set passes its own
    max_len: int = 32  # longest caption in tokens (learned positions)
    text_width: int = 128  # 2 layers x 128 wide x 4 heads: captions are short, ~0.4M text parameters
    text_layers: int = 2
    text_heads: int = 4
    text_pool: str = "mean"  # masked mean over tokens; "eos" reads the last real token as CLIP does
    dropout: float = 0.0  # text tower; little data noise to regularise against at this scale
    embed_dim: int = 64  # shared embedding width E (CLIP: 512); 64 is plenty for 10-class captions
    init_temperature: float = 0.07  # CLIP's initial softmax temperature: logit_scale = log(1 / 0.07)
    max_logit_scale: float = 100.0  # CLIP's cap on exp(logit_scale): keeps training stable
    pad_id: int = 0  # id of the padding token (when no text_mask is given)

    def __post_init__(self):
        for name in ("in_chans", "vocab_size", "max_len", "text_width", "text_layers", "text_heads", "embed_dim"):
            _positive(name, "clip", getattr(self, name))
        if self.text_pool not in TEXT_POOLS:
            raise ModelError(unknown_name("clip text_pool", self.text_pool, TEXT_POOLS))
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"clip: dropout must be in [0, 1), got {self.dropout}")
        if not (self.init_temperature > 0.0 and 1.0 <= 1.0 / self.init_temperature <= self.max_logit_scale):
            raise ModelError(f"clip: init_temperature must be in [1 / max_logit_scale, 1] = "
                             f"[{1.0 / max(self.max_logit_scale, 1e-12):.4g}, 1], got {self.init_temperature}")
        if self.text_width % self.text_heads:
            raise ModelError(f"clip: text_width ({self.text_width}) must be divisible by text_heads "
                             f"({self.text_heads})")
        self.image_options = dict(self.image_options or {})


class DualEncoder(nn.Module):
    output_kind = "similarity"  # forward -> (logits_per_image (B, B), logits_per_text (B, B))

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.modalities = ("image", "text")
        self.image_tower = _image_tower("clip", cfg.image_tower, cfg.in_chans, cfg.image_options)
        self.text_tower = TextTransformer(cfg.vocab_size, cfg.max_len, cfg.text_width, cfg.text_layers,
                                          cfg.text_heads, cfg.text_pool, cfg.dropout, cfg.pad_id, "clip text tower")
        self.image_proj = nn.Linear(self.image_tower.num_features, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=self.image_tower.num_features ** -0.5)  # CLIP's proj init
        nn.init.normal_(self.text_proj.weight, std=cfg.text_width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        self.vocab_size, self.max_len, self.embed_dim = cfg.vocab_size, cfg.max_len, cfg.embed_dim
        self.input_specs = {"image": tuple(self.image_tower.input_spec), "text": (None,), "text_mask": (None,)}

    @property
    def _name(self) -> str:
        return getattr(self, "model_name", "clip")

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) capped at max_logit_scale (a 0-dim tensor)."""
        return self.logit_scale.clamp(max=math.log(self.cfg.max_logit_scale)).exp()

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> L2-normalised (B, E)."""
        if image.dim() != 4 or not image.is_floating_point() or image.shape[1] != self.cfg.in_chans:
            raise InputShapeError(f"model {self._name} expects image of shape (B, {self.cfg.in_chans}, H, W) "
                                  f"and a float dtype, got {_shape(image)}")
        return F.normalize(self.image_proj(self.image_tower(image)), dim=-1)

    def encode_text(self, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) token ids [+ (B, L) bool mask] -> L2-normalised (B, E)."""
        mask = _text_inputs(self._name, text, text_mask, self.cfg.pad_id, self.vocab_size)
        return F.normalize(self.text_proj(self.text_tower(text, mask)), dim=-1)

    def similarity(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarities (Bi, Bt) of normalised embeddings."""
        return self.scale() * image_emb @ text_emb.t()

    def forward(self, image: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits_per_image (B, B), logits_per_text (B, B)); row i of the first scores image i vs all texts."""
        img, txt = self.encode_image(image), self.encode_text(text, text_mask)
        if len(img) != len(txt):
            raise InputShapeError(f"model {self._name}: {len(img)} images but {len(txt)} texts; pairs must align")
        logits_per_image = self.similarity(img, txt)  # (B, B)
        return logits_per_image, logits_per_image.t()

    @torch.no_grad()
    def zero_shot_classifier(self, prompts) -> torch.Tensor:
        """One entry per class: token ids (P_k, L) (padding = pad_id) or a pair (ids, mask). -> (K, E), unit rows.

        Each class's prompt embeddings are L2-normalised, averaged and normalised again (prompt ensembling).
        """
        if len(prompts) == 0:
            raise InputShapeError(f"model {self._name}: zero_shot_classifier needs prompts for at least one class")
        ids, masks, counts = [], [], []
        for k, p in enumerate(prompts):
            t, m = p if isinstance(p, (tuple, list)) else (p, None)
            t = torch.as_tensor(t)
            if t.dim() == 1:
                t = t[None]
            if t.dim() != 2 or t.shape[0] == 0:
                raise InputShapeError(f"model {self._name}: prompts of class {k} must be token ids (P, L) with P >= 1, "
                                      f"got shape {tuple(t.shape)}")
            m = _text_inputs(self._name, t, None if m is None else torch.as_tensor(m).reshape(t.shape), self.cfg.pad_id,
                             self.vocab_size)
            ids.append(t)
            masks.append(m)
            counts.append(t.shape[0])
        L = max(t.shape[1] for t in ids)
        dev = self.logit_scale.device
        all_ids = torch.cat([F.pad(t, (0, L - t.shape[1]), value=self.cfg.pad_id) for t in ids]).to(dev)
        all_mask = torch.cat([F.pad(m, (0, L - m.shape[1]), value=False) for m in masks]).to(dev)
        emb = self.encode_text(all_ids, all_mask)  # (sum P_k, E), unit rows
        classes = torch.stack([e.mean(0) for e in emb.split(counts)])  # (K, E)
        return F.normalize(classes, dim=-1)

    def zero_shot_logits(self, image: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) against a (K, E) class matrix -> (B, K) scaled cosine logits."""
        return self.similarity(self.encode_image(image), classes)

    def example_inputs(self, batch: int = 2) -> dict[str, torch.Tensor]:
        L = min(self.max_len, 12)
        text = torch.randint(1, self.vocab_size, (batch, L))
        mask = torch.ones(batch, L, dtype=torch.bool)
        mask[0, L // 2:] = False  # one padded caption
        return {"image": example_input(self.image_tower, batch), "text": text, "text_mask": mask}


CLIP_SIZES: dict[str, CLIPConfig] = {
    "clip_tiny": CLIPConfig(),
    # 28x28 inputs: a third conv stage (32/64/128, one conv each: half cnn_medium's cost per image, which
    # matters when every step also runs the text tower), wider shared space.
    "clip_small": CLIPConfig(image_options={"channels": (32, 64, 128)}, embed_dim=128),
}


@register_model("multimodal", input_kind="multimodal")
def clip_tiny(**kwargs) -> DualEncoder:
    """CLIP-style dual encoder: small_cnn image tower + 2-layer text transformer, 64-d shared space."""
    return build_model("clip_tiny", DualEncoder, CLIP_SIZES["clip_tiny"], kwargs)


@register_model("multimodal", input_kind="multimodal")
def clip_small(**kwargs) -> DualEncoder:
    """CLIP-style dual encoder: 3-stage CNN image tower (32/64/128) + 2-layer text transformer, 128-d shared space."""
    return build_model("clip_small", DualEncoder, CLIP_SIZES["clip_small"], kwargs)


# ------------------------------------------------------------------------------------------------ audio


class AudioConvEncoder(nn.Module):
    """Log-mel frames (B, T, n_mels) [+ mask (B, T)] -> (B, channels[-1]).

    Per stage: Conv1d over time (n_mels input channels, `kernel` frames) -> BN -> ReLU -> zero the padding frames
    -> max-pool 2 (ceil mode, so a 1-frame input still works); the output is the masked mean over the remaining
    frames. In eval mode a recording's output does not depend on how much padding follows it: padding frames are
    zeros, which is what the convolution's own zero padding sees, and after a ReLU a pooled zero never wins over a
    real value.
    """

    def __init__(self, n_mels: int, channels: tuple[int, ...], kernel: int = 5):
        super().__init__()
        stages, cin = [], n_mels
        for c in channels:
            stages.append(nn.Sequential(nn.Conv1d(cin, c, kernel, padding=kernel // 2, bias=False), nn.BatchNorm1d(c),
                                        nn.ReLU(inplace=True)))
            cin = c
        self.stages = nn.ModuleList(stages)
        self.n_mels, self.num_features = n_mels, cin
        init_weights(self, "relu")

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = x.transpose(1, 2)  # (B, n_mels, T)
        m = mask[:, None].to(h.dtype)  # (B, 1, T)
        h = h * m
        for stage in self.stages:
            h = stage(h) * m  # (B, C, T): conv-BN-ReLU, padding frames back to 0 (BN's shift made them nonzero)
            h = F.max_pool1d(h, 2, ceil_mode=True)  # (B, C, ceil(T / 2)); h >= 0, so a padding 0 never wins
            m = F.max_pool1d(m, 2, ceil_mode=True)  # a pooled position is real if any of its frames was
        return (h * m).sum(-1) / m.sum(-1).clamp(min=1.0)  # masked mean over time (B, C)


# ------------------------------------------------------------------------------------------------ fusion


@dataclass
class FusionConfig:
    num_classes: int = 10  # digits; the data set passes its own
    modalities: tuple[str, ...] = MODALITIES  # encoders to build; any non-empty subset of them works at forward
    width: int = 128  # shared width D every modality is projected to
    fusion: str = "mean"  # masked mean over the modalities present; "attention": a learned query attends over them
    fusion_heads: int = 4  # attention fusion only
    modality_dropout: float = 0.3  # train mode: drop each modality per sample with this probability (>= 1 kept)
    dropout: float = 0.1  # before the head
    # image
    in_chans: int = 1
    image_tower: str = "small_cnn"  # any registered image model, built with num_classes=0
    image_options: dict = field(default_factory=dict)
    # text
    vocab_size: int = 64
    max_len: int = 32
    text_encoder: str = "bag"  # "bag": masked mean of word embeddings (words carry the meaning); or "transformer"
    text_width: int = 64
    text_layers: int = 1  # transformer only
    text_heads: int = 4  # transformer only
    pad_id: int = 0
    # audio
    n_mels: int = 40  # log-mel bands of the audio features (lamina.data.audio.LogMel's default)
    audio_channels: tuple[int, ...] = (64, 128, 128)  # one conv stage each, each halving the frame rate
    audio_kernel: int = 5  # frames per conv (5 x 16 ms hops = 80 ms, about a phoneme)

    def __post_init__(self):
        self.modalities = tuple(self.modalities)
        if not self.modalities:
            raise ModelError(f"fusion: modalities must name at least one of {', '.join(MODALITIES)}")
        for m in self.modalities:
            if m not in MODALITIES:
                raise ModelError(unknown_name("fusion modality", m, MODALITIES))
        if len(set(self.modalities)) != len(self.modalities):
            raise ModelError(f"fusion: modalities repeat a name: {list(self.modalities)}")
        self.modalities = tuple(m for m in MODALITIES if m in self.modalities)  # canonical order
        for name in ("width", "in_chans", "vocab_size", "max_len", "text_width", "text_layers", "text_heads",
                     "n_mels", "audio_kernel", "fusion_heads"):
            _positive(name, "fusion", getattr(self, name))
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ModelError(f"fusion: num_classes must be a non-negative integer, got {self.num_classes!r}")
        if self.fusion not in FUSIONS:
            raise ModelError(unknown_name("fusion method", self.fusion, FUSIONS))
        if self.text_encoder not in TEXT_ENCODERS:
            raise ModelError(unknown_name("fusion text_encoder", self.text_encoder, TEXT_ENCODERS))
        for name in ("modality_dropout", "dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ModelError(f"fusion: {name} must be in [0, 1), got {getattr(self, name)}")
        self.audio_channels = tuple(int(c) for c in self.audio_channels)
        if not self.audio_channels or min(self.audio_channels) < 1:
            raise ModelError(f"fusion: audio_channels must be a non-empty tuple of positive ints, "
                             f"got {self.audio_channels}")
        if self.fusion == "attention" and self.width % self.fusion_heads:
            raise ModelError(f"fusion: width ({self.width}) must be divisible by fusion_heads ({self.fusion_heads})")
        self.image_options = dict(self.image_options or {})


class FusionClassifier(nn.Module):
    output_kind = "sequence"  # one label per sample: (B, num_classes)

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.cfg = cfg
        self.modalities = cfg.modalities
        D = cfg.width
        encoders, widths = {}, {}
        if "image" in cfg.modalities:
            encoders["image"] = _image_tower("fusion", cfg.image_tower, cfg.in_chans, cfg.image_options)
            widths["image"] = encoders["image"].num_features
        if "text" in cfg.modalities:
            encoders["text"] = (BagOfEmbeddings(cfg.vocab_size, cfg.text_width) if cfg.text_encoder == "bag" else
                                TextTransformer(cfg.vocab_size, cfg.max_len, cfg.text_width, cfg.text_layers,
                                                cfg.text_heads, "mean", 0.0, cfg.pad_id, "fusion text encoder"))
            widths["text"] = cfg.text_width
        if "audio" in cfg.modalities:
            encoders["audio"] = AudioConvEncoder(cfg.n_mels, cfg.audio_channels, cfg.audio_kernel)
            widths["audio"] = encoders["audio"].num_features
        self.encoders = nn.ModuleDict(encoders)
        self.proj = nn.ModuleDict({m: nn.Sequential(nn.Linear(widths[m], D), nn.LayerNorm(D)) for m in encoders})
        init_weights(self.proj, "identity")
        if cfg.fusion == "attention":
            self.type_emb = nn.Parameter(torch.zeros(len(self.modalities), D))  # which modality a token is
            self.query = nn.Parameter(torch.zeros(1, 1, D))
            nn.init.normal_(self.type_emb, std=0.02)
            nn.init.normal_(self.query, std=0.02)
            self.attn = MultiHeadAttention(D, cfg.fusion_heads)
            init_weights(self.attn, "identity")
            self.norm = nn.LayerNorm(D)
        self.num_features, self.num_classes = D, cfg.num_classes
        self.drop = nn.Dropout(cfg.dropout)
        self.head = self._new_head(cfg.num_classes)
        specs = {"image": (cfg.in_chans, None, None), "text": (None,), "text_mask": (None,),
                 "audio": (None, cfg.n_mels), "audio_mask": (None,)}
        self.input_specs = {k: v for k, v in specs.items() if k.split("_")[0] in self.modalities}

    @property
    def _name(self) -> str:
        return getattr(self, "model_name", "fusion_classifier")

    def _new_head(self, num_classes: int) -> nn.Module:
        head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        return init_weights(head, "identity")

    # ----- per-modality encoders -------------------------------------------------------------------
    def _encode(self, name: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        cfg = self.cfg
        if name == "image":
            if x.dim() != 4 or not x.is_floating_point() or x.shape[1] != cfg.in_chans:
                raise InputShapeError(f"model {self._name} expects image of shape (B, {cfg.in_chans}, H, W) and a "
                                      f"float dtype, got {_shape(x)}")
            feats = self.encoders["image"](x)
        elif name == "text":
            mask = _text_inputs(self._name, x, mask, cfg.pad_id, cfg.vocab_size)
            feats = self.encoders["text"](x, mask)
        else:
            if x.dim() != 3 or not x.is_floating_point() or x.shape[2] != cfg.n_mels or x.shape[1] < 1:
                raise InputShapeError(f"model {self._name} expects audio as log-mel frames of shape "
                                      f"(B, T, {cfg.n_mels}) and a float dtype, got {_shape(x)}")
            if mask is None:
                mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            elif mask.dtype != torch.bool or mask.shape != x.shape[:2]:
                raise InputShapeError(f"model {self._name} expects audio_mask as a bool tensor of shape (B, T) = "
                                      f"{tuple(x.shape[:2])} (True = real frame), got {_shape(mask)}")
            feats = self.encoders["audio"](x, mask)
        return self.proj[name](feats)  # (B, D)

    def modality_keep(self, batch: int, n: int, device=None) -> torch.Tensor:
        """(batch, n) bool: which of the n given modalities each sample keeps. All in eval mode; in train mode each
        is dropped with probability `modality_dropout`, and a sample that lost all keeps one picked at random."""
        keep = torch.ones(batch, n, dtype=torch.bool, device=device)
        p = self.cfg.modality_dropout
        if not self.training or p == 0.0 or n == 1:
            return keep
        keep = torch.rand(batch, n, device=device) >= p
        rescue = F.one_hot(torch.randint(0, n, (batch,), device=device), n).bool()  # (batch, n)
        return torch.where(keep.any(1, keepdim=True), keep, rescue)

    def forward_features(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None,
                         text_mask: torch.Tensor | None = None, audio: torch.Tensor | None = None,
                         audio_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Any non-empty subset of the model's modalities -> fused features (B, D)."""
        given = {"image": (image, None), "text": (text, text_mask), "audio": (audio, audio_mask)}
        present = [m for m in MODALITIES if given[m][0] is not None]
        for m in MODALITIES:
            if given[m][0] is None and given[m][1] is not None:
                raise InputShapeError(f"model {self._name}: {m}_mask given without {m}")
        if not present:
            raise InputShapeError(f"model {self._name} got no input; pass at least one of "
                                  f"{', '.join(self.modalities)}")
        extra = [m for m in present if m not in self.modalities]
        if extra:
            raise InputShapeError(f"model {self._name} has no {extra[0]} encoder; its modalities are "
                                  f"{', '.join(self.modalities)}")
        sizes = {m: len(given[m][0]) for m in present}
        if len(set(sizes.values())) != 1:
            raise InputShapeError(f"model {self._name}: modalities differ in batch size: {sizes}")
        tokens = torch.stack([self._encode(m, *given[m]) for m in present], dim=1)  # (B, P, D)
        B, P, _ = tokens.shape
        keep = self.modality_keep(B, P, tokens.device)  # (B, P)
        if self.cfg.fusion == "mean":
            w = keep.unsqueeze(-1).to(tokens.dtype)  # (B, P, 1)
            return (tokens * w).sum(1) / w.sum(1)  # (B, D); every row keeps >= 1 modality
        idx = torch.tensor([self.modalities.index(m) for m in present], device=tokens.device)
        kv = tokens + self.type_emb[idx]  # (B, P, D)
        fused = self.attn(self.query.expand(B, 1, -1), kv=kv, key_padding_mask=keep)  # (B, 1, D)
        return self.norm(fused.squeeze(1))  # (B, D)

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return feats if pre_logits else self.head(self.drop(feats))  # (B, num_classes)

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, audio: torch.Tensor | None = None,
                audio_mask: torch.Tensor | None = None) -> torch.Tensor:
        """-> logits (B, num_classes) from whichever modalities are given (at least one)."""
        return self.forward_head(self.forward_features(image, text, text_mask, audio, audio_mask))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = self._new_head(num_classes)

    def example_inputs(self, batch: int = 2) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if "image" in self.modalities:
            out["image"] = example_input(self.encoders["image"], batch)
        if "text" in self.modalities:
            L = min(self.cfg.max_len, 6)
            out["text"] = torch.randint(1, self.cfg.vocab_size, (batch, L))
            out["text_mask"] = torch.ones(batch, L, dtype=torch.bool)
            out["text_mask"][0, L // 2:] = False
        if "audio" in self.modalities:
            T = 20
            out["audio"] = torch.randn(batch, T, self.cfg.n_mels)
            out["audio_mask"] = torch.ones(batch, T, dtype=torch.bool)
            out["audio_mask"][0, T // 2:] = False
        return out


@register_model("multimodal", input_kind="multimodal")
def fusion_classifier(**kwargs) -> FusionClassifier:
    """Fusion classifier over any subset of image (small CNN), text (word bag) and audio (log-mel conv) inputs."""
    return build_model("fusion_classifier", FusionClassifier, FusionConfig(), kwargs)
