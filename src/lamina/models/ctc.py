"""CTC acoustic models: log-mel frames in, a distribution over tokens + blank per (subsampled) frame out.

    ConvBiLSTM (ctc_bilstm)
        x (B, T, n_mels), lengths (B,)
        -> Conv1d(k, stride 2) -> BN -> ReLU -> Conv1d(k) -> BN -> ReLU     (B, T', C), T' = ceil(T / 2)
        -> BiLSTM x layers over the packed batch (padding never enters)     (B, T', 2H)
        -> dropout -> Linear                                                 (B, T', vocab) logits

The stride-2 front end halves the frame rate (16 ms -> 32 ms per output step): still several steps per spoken
digit, which CTC needs (at least one per token plus blanks between repeats), at half the LSTM cost. Padded input
frames are zeroed before each convolution so a sequence's outputs do not depend on how much padding its batch
had. `output_lengths(lengths)` gives T' per sequence for the CTC loss and the decoders.

Contract (output_kind "ctc"): `forward(x, lengths=None) -> logits (B, T', vocab)`; `forward_features(x, lengths)`
-> (B, T', 2H); `forward_head(h)`; `num_features`, `num_classes` (= vocab, blank included), `input_spec`
(None, n_mels). Tasks apply log_softmax; the model returns logits like every other family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lamina.errors import InputShapeError, ModelError
from lamina.models.contract import build_model
from lamina.models.registry import register_model


@dataclass
class CTCConfig:
    n_mels: int = 40  # input features per frame (lamina's log-mel default)
    num_classes: int = 11  # tokens + the blank (spoken digits: 10 + 1)
    channels: int = 128  # conv front end width
    kernel_size: int = 5  # 5 frames = 80 ms of context per conv layer at a 16 ms hop
    hidden: int = 128  # LSTM units per direction
    layers: int = 2  # BiLSTM layers (2 is the usual minimum for CTC on spoken words)
    dropout: float = 0.1  # between LSTM layers and before the head

    def __post_init__(self):
        for k in ("n_mels", "num_classes", "channels", "kernel_size", "hidden", "layers"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ModelError(f"ctc_bilstm: {k} must be a positive integer, got {v!r}")
        if self.num_classes < 2:
            raise ModelError(f"ctc_bilstm: num_classes counts the blank and at least one token, got {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"ctc_bilstm: dropout must be in [0, 1), got {self.dropout!r}")


class ConvBiLSTM(nn.Module):
    output_kind = "ctc"

    def __init__(self, cfg: CTCConfig):
        super().__init__()
        self.cfg = cfg
        self.input_spec = (None, cfg.n_mels)
        k, C = cfg.kernel_size, cfg.channels
        self.conv1 = nn.Conv1d(cfg.n_mels, C, k, stride=2, padding=k // 2, bias=False)
        self.bn1 = nn.BatchNorm1d(C)
        self.conv2 = nn.Conv1d(C, C, k, padding=k // 2, bias=False)
        self.bn2 = nn.BatchNorm1d(C)
        self.rnn = nn.LSTM(C, cfg.hidden, cfg.layers, batch_first=True, bidirectional=True,
                           dropout=cfg.dropout if cfg.layers > 1 else 0.0)
        self.drop = nn.Dropout(cfg.dropout)
        self.num_features = 2 * cfg.hidden
        self.num_classes = cfg.num_classes
        self.head = nn.Linear(self.num_features, cfg.num_classes)
        with torch.no_grad():  # LSTM forget-gate bias 1 (Gers et al. 2000), as lamina's rnn family
            for name, p in self.rnn.named_parameters():
                if name.startswith("bias_ih"):
                    p[cfg.hidden:2 * cfg.hidden].fill_(1.0)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Frames after the stride-2 conv: floor((T + 2 * (k // 2) - k) / 2) + 1."""
        k = self.cfg.kernel_size
        return torch.div(lengths + 2 * (k // 2) - k, 2, rounding_mode="floor") + 1

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 3 or x.shape[-1] != self.cfg.n_mels or not x.is_floating_point():
            raise InputShapeError(f"ctc_bilstm expects float log-mel frames (B, T, {self.cfg.n_mels}), got "
                                  f"{tuple(x.shape)} {x.dtype}")

    def forward_features(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        self._check(x)
        B, T, _ = x.shape
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long, device=x.device)
        mask = (torch.arange(T, device=x.device)[None] < lengths[:, None]).to(x.dtype)  # (B, T)
        h = (x * mask[..., None]).transpose(1, 2)  # (B, M, T)
        h = torch.relu(self.bn1(self.conv1(h)))  # (B, C, T')
        out_len = self.output_lengths(lengths).clamp(min=1, max=h.shape[-1])
        mask2 = (torch.arange(h.shape[-1], device=x.device)[None] < out_len[:, None]).to(h.dtype)
        h = torch.relu(self.bn2(self.conv2(h * mask2[:, None]))) * mask2[:, None]
        h = h.transpose(1, 2)  # (B, T', C)
        packed = pack_padded_sequence(h, out_len.cpu(), batch_first=True, enforce_sorted=False)
        y, _ = self.rnn(packed)
        y, _ = pad_packed_sequence(y, batch_first=True, total_length=h.shape[1])  # (B, T', 2H), zeros past ends
        return y

    def forward_head(self, h: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return h if pre_logits else self.head(self.drop(h))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, lengths))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


@register_model("ctc", input_kind="audio")
def ctc_bilstm(**kwargs) -> ConvBiLSTM:
    """CTC acoustic model: 2 conv layers (stride 2) + 2-layer BiLSTM (128 per direction) on log-mel frames."""
    return build_model("ctc_bilstm", ConvBiLSTM, CTCConfig(), kwargs)


__all__ = ["CTCConfig", "ConvBiLSTM", "ctc_bilstm"]
