"""Audio features: PCM WAV reading and log-mel spectrograms on `torch.stft`.

    wave (..., N) samples in [-1, 1]
      -> |STFT|^2: Hann window (periodic) of n_fft, hop `hop_length`, centred frames (zero padding of n_fft // 2
         on both sides, librosa >= 0.10's default), (..., n_fft // 2 + 1, frames)
      -> mel filterbank (n_mels, n_fft // 2 + 1) @ power -> (..., n_mels, frames)
      -> dB: 10 log10(max(S, amin)), floored at (per-example max - top_db)        (librosa.power_to_db, ref=1)
      -> transposed to frames-first (..., frames, n_mels)

Mel scales (`htk`):
* Slaney (default, htk=False; librosa's and the Auditory Toolbox's): linear below 1 kHz, mel = 3 f / 200; above,
  logarithmic: mel = 15 + 27 ln(f / 1000) / ln(6.4).
* HTK (htk=True): mel = 2595 log10(1 + f / 700).
Filters are triangles between n_mels + 2 points evenly spaced in mel from fmin to fmax, evaluated at the FFT bin
frequencies; norm="slaney" scales each to unit area (2 / (f_{i+2} - f_i)), norm=None leaves peaks at 1. This is
`librosa.filters.mel` (parity-tested against it when librosa is installed, and against hand values always).

Why our own and not torchaudio / librosa: torchaudio's wheels are tied to one torch build (not usable with this
torch), and librosa pulls numba/llvmlite in for a 40-line filterbank. The STFT itself is torch's, so features can
be computed on the GPU inside a model as well as at data-preparation time. WAV decoding is the stdlib `wave`
module (PCM 8/16/24/32-bit); resampling, when asked for, is scipy's polyphase `resample_poly`.

Frames are frames-first, (..., T, n_mels), so a batch of padded spectrograms (B, T, n_mels) is cut to its
longest recording along dim 1 by the in-memory loader's `pad_trim`, like padded token ids (B, T).
"""

from __future__ import annotations

import math
import os
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from lamina.errors import DataError

PathLike = str | os.PathLike

# Slaney's mel scale: 200/3 Hz per mel below 1 kHz, log spacing of ln(6.4)/27 per mel above.
_F_SP = 200.0 / 3.0
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP  # 15
_LOGSTEP = math.log(6.4) / 27.0


# ------------------------------------------------------------------------------------------------ WAV


def read_wav(path: PathLike, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """(samples float32 (N,) in [-1, 1], sample rate). Channels are averaged; 8-bit is unsigned, the rest signed.

    `sample_rate`: resample to this rate (scipy's resample_poly) when the file's rate differs.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: WAV file not found")
    try:
        with wave.open(str(p), "rb") as w:
            channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError, OSError) as e:
        raise DataError(f"{p}: not a PCM WAV file ({e})") from None
    if width not in (1, 2, 3, 4):
        raise DataError(f"{p}: unsupported WAV sample width {8 * width} bits; expected 8, 16, 24 or 32-bit PCM")
    if len(raw) < n * channels * width:
        raise DataError(f"{p}: truncated WAV file: header says {n} frames, found {len(raw) // (channels * width)}")
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 3:  # 24-bit little-endian: sign-extend into int32
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v) / float(1 << 23)).astype(np.float32)
    else:
        dtype, scale = ("<i2", 32768.0) if width == 2 else ("<i4", 2147483648.0)
        x = (np.frombuffer(raw, dtype).astype(np.float64) / scale).astype(np.float32)
    x = x.reshape(-1, channels).mean(axis=1, dtype=np.float32) if channels > 1 else x
    if sample_rate is not None and int(sample_rate) != rate:
        from scipy.signal import resample_poly

        frac = Fraction(int(sample_rate), rate)
        x = resample_poly(x, frac.numerator, frac.denominator).astype(np.float32)
        rate = int(sample_rate)
    return x, rate


# ------------------------------------------------------------------------------------------- mel scale


def hz_to_mel(f, htk: bool = False) -> np.ndarray:
    """Hz -> mel, Slaney (default) or HTK formula; see the module docstring."""
    f = np.asarray(f, dtype=np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + f / 700.0)
    mel = f / _F_SP
    log_part = _MIN_LOG_MEL + np.log(np.maximum(f, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(f >= _MIN_LOG_HZ, log_part, mel)


def mel_to_hz(m, htk: bool = False) -> np.ndarray:
    """mel -> Hz, the inverse of `hz_to_mel`."""
    m = np.asarray(m, dtype=np.float64)
    if htk:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    f = m * _F_SP
    log_part = _MIN_LOG_HZ * np.exp(_LOGSTEP * (np.maximum(m, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(m >= _MIN_LOG_MEL, log_part, f)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int = 40, fmin: float = 0.0, fmax: float | None = None,
                   htk: bool = False, norm: str | None = "slaney") -> torch.Tensor:
    """Triangular mel filters, float32 (n_mels, n_fft // 2 + 1); equals librosa.filters.mel with the same arguments."""
    fmax = sample_rate / 2.0 if fmax is None else float(fmax)
    if n_mels < 1 or n_fft < 2:
        raise DataError(f"mel filterbank: need n_mels >= 1 and n_fft >= 2, got n_mels={n_mels}, n_fft={n_fft}")
    if not 0.0 <= fmin < fmax <= sample_rate / 2.0:
        raise DataError(f"mel filterbank: need 0 <= fmin < fmax <= sample_rate / 2 = {sample_rate / 2}, "
                        f"got fmin={fmin}, fmax={fmax}")
    if norm not in ("slaney", None):
        raise DataError(f"mel filterbank: norm must be 'slaney' or None, got {norm!r}")
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, 1 + n_fft // 2)  # (F,)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(fmin, htk), hz_to_mel(fmax, htk), n_mels + 2), htk)  # (M + 2,)
    fdiff = np.diff(mel_f)  # (M + 1,)
    ramps = mel_f[:, None] - fft_freqs[None, :]  # (M + 2, F)
    lower = -ramps[:-2] / fdiff[:-1, None]  # rising edge of filter i: (f - f_i) / (f_{i+1} - f_i)
    upper = ramps[2:] / fdiff[1:, None]  # falling edge: (f_{i+2} - f) / (f_{i+2} - f_{i+1})
    weights = np.maximum(0.0, np.minimum(lower, upper))  # (M, F)
    if norm == "slaney":
        weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]  # unit area per filter
    return torch.from_numpy(weights.astype(np.float32))


# ---------------------------------------------------------------------------------------- spectrograms


def power_spectrogram(wave_: torch.Tensor, n_fft: int, hop_length: int) -> torch.Tensor:
    """|STFT|^2 of (..., N) samples: (..., n_fft // 2 + 1, 1 + N // hop_length); Hann window, centred frames."""
    if wave_.shape[-1] < 1:
        raise DataError("spectrogram: the recording has no samples")
    lead = wave_.shape[:-1]
    x = wave_.reshape(-1, wave_.shape[-1]).float()
    pad = n_fft // 2  # centring with zeros (librosa >= 0.10's pad_mode="constant"); works for any length
    x = torch.nn.functional.pad(x, (pad, pad))
    window = torch.hann_window(n_fft, periodic=True, dtype=x.dtype, device=x.device)
    spec = torch.stft(x, n_fft, hop_length=hop_length, win_length=n_fft, window=window, center=False,
                      return_complex=True)  # (B, F, frames)
    power = spec.real.square() + spec.imag.square()
    return power.reshape(*lead, *power.shape[-2:])


def power_to_db(power: torch.Tensor, amin: float = 1e-10, top_db: float | None = 80.0) -> torch.Tensor:
    """10 log10(max(S, amin)) (ref = 1), floored at each example's max - top_db over its last two dims."""
    db = 10.0 * torch.log10(power.clamp(min=amin))
    if top_db is not None:
        peak = db.amax(dim=(-2, -1), keepdim=True)
        db = torch.maximum(db, peak - float(top_db))
    return db


class LogMel(nn.Module):
    """(..., N) samples -> log-mel frames (..., 1 + N // hop_length, n_mels) in dB; the filterbank is a buffer.

    Defaults suit 8 kHz speech (FSDD): 32 ms windows (n_fft 256), 16 ms hop, 40 mel bands up to 4 kHz.
    """

    def __init__(self, sample_rate: int = 8000, n_fft: int = 256, hop_length: int = 128, n_mels: int = 40,
                 fmin: float = 0.0, fmax: float | None = None, htk: bool = False, norm: str | None = "slaney",
                 top_db: float | None = 80.0):
        super().__init__()
        if hop_length < 1:
            raise DataError(f"log-mel: hop_length must be >= 1, got {hop_length}")
        self.sample_rate, self.n_fft, self.hop_length, self.top_db = sample_rate, n_fft, hop_length, top_db
        self.register_buffer("fb", mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax, htk, norm), persistent=False)

    def num_frames(self, num_samples) -> int | torch.Tensor:
        """Frames a recording of `num_samples` gets (centred framing): 1 + N // hop_length for an even n_fft."""
        return 1 + (num_samples + 2 * (self.n_fft // 2) - self.n_fft) // self.hop_length

    def forward(self, wave_: torch.Tensor) -> torch.Tensor:
        mel = self.fb.to(wave_.device) @ power_spectrogram(wave_, self.n_fft, self.hop_length)  # (..., M, T)
        return power_to_db(mel, top_db=self.top_db).transpose(-2, -1)  # (..., T, M)


def log_mel_batch(waves: list[np.ndarray], logmel: LogMel, max_frames: int | None = None,
                  chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Recordings of different lengths -> (frames float32 (N, T, n_mels) zero-padded, lengths int64 (N,)).

    Recordings are processed in chunks zero-padded to the chunk's longest: with centred zero-padded framing the
    valid frames are exactly those of each recording on its own (frames past a recording's end are dropped; the
    per-example dB floor uses only its own frames). `max_frames` keeps the first frames of longer recordings.
    """
    if not waves:
        raise DataError("log-mel: no recordings given")
    lengths = torch.tensor([int(logmel.num_frames(len(w))) for w in waves], dtype=torch.int64)
    if max_frames is not None:
        lengths = lengths.clamp(max=int(max_frames))
    n_mels = logmel.fb.shape[0]
    out = torch.zeros(len(waves), int(lengths.max()), n_mels)
    order = np.argsort([len(w) for w in waves], kind="stable")  # similar lengths per chunk: little padding
    for c in range(0, len(waves), chunk):
        idx = order[c:c + chunk]
        longest = max(len(waves[i]) for i in idx)
        batch = torch.zeros(len(idx), longest)
        for j, i in enumerate(idx):
            batch[j, :len(waves[i])] = torch.from_numpy(np.asarray(waves[i], np.float32))
        mel = logmel.fb @ power_spectrogram(batch, logmel.n_fft, logmel.hop_length)  # (b, M, T)
        own = torch.tensor([int(logmel.num_frames(len(waves[i]))) for i in idx])  # (b,) frames of each recording
        db = power_to_db(mel, top_db=None)
        if logmel.top_db is not None:  # each recording's dB floor from its own frames only
            valid = torch.arange(db.shape[-1])[None] < own[:, None]  # (b, T)
            peak = db.masked_fill(~valid[:, None, :], float("-inf")).amax(dim=(1, 2), keepdim=True)  # (b, 1, 1)
            db = torch.maximum(db, peak - float(logmel.top_db))
        db = db.transpose(1, 2)  # (b, T, M)
        for j, i in enumerate(idx):
            t = int(lengths[i])
            out[i, :t] = db[j, :t]
    return out, lengths


__all__ = ["read_wav", "hz_to_mel", "mel_to_hz", "mel_filterbank", "power_spectrogram", "power_to_db", "LogMel",
           "log_mel_batch"]
