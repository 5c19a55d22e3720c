"""`transcribe(run, wav)` / `transcribe_files(run, wavs, progress=)`: a CTC speech run (task ctc) turns WAV
recordings into text.

The recording goes through the run's own features (sample rate, log-mel settings and the per-band mean / std of
its training frames, all in the checkpoint's data facts), the model, and greedy and prefix-beam decoding. What a
user hands over is checked first, each a one-line DataError: not a PCM WAV, another sample rate than the model's
(unless `resample`), silence, longer than MAX_SECONDS (the cost of one request is bounded).
"""

from __future__ import annotations

import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lamina.errors import ConfigError, DataError

MAX_SECONDS = 60.0  # one recording: a minute of 8 kHz audio is ~3,700 frames, well within what the model handles
SILENCE_PEAK = 1e-3  # below this peak amplitude (-60 dBFS) there is nothing to transcribe


def check_recording(path: str | Path, sample_rate: int, resample: bool = False) -> Path:
    """The header checks of load_recording (exists, PCM WAV, sample rate, length) without reading the samples."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: WAV file not found")
    try:
        with wave.open(str(p), "rb") as w:
            rate, n = w.getframerate(), w.getnframes()
    except (wave.Error, EOFError, OSError) as e:
        raise DataError(f"{p}: not a PCM WAV file ({e})") from None
    if rate != sample_rate and not resample:
        raise DataError(f"{p}: sample rate {rate} Hz, but the model was trained on {sample_rate} Hz audio; resample "
                        f"it (pass --resample, or e.g. `sox in.wav -r {sample_rate} out.wav`)")
    if rate <= 0 or n / rate > MAX_SECONDS:
        raise DataError(f"{p}: {n / max(rate, 1):.1f} s of audio; transcribe takes recordings of at most "
                        f"{MAX_SECONDS:.0f} s (cut it into pieces)")
    return p


def load_recording(path: str | Path, sample_rate: int, resample: bool = False) -> np.ndarray:
    p = check_recording(path, sample_rate, resample)
    from lamina.data.audio import read_wav

    x, _ = read_wav(p, sample_rate=sample_rate)
    peak = float(np.abs(x).max()) if len(x) else 0.0
    if peak < SILENCE_PEAK:
        raise DataError(f"{p}: the recording is silent (peak amplitude {peak:.1e}); nothing to transcribe")
    return x


def transcribe(run_path: str | Path, wav: str | Path, beam: int | None = None, resample: bool = False) -> dict:
    """One recording: {"file", "seconds", "text" (beam search), "greedy", "beam", "run"}."""
    return transcribe_files(run_path, [wav], beam, resample)[0]


def transcribe_files(run_path: str | Path, wavs: list[str | Path], beam: int | None = None, resample: bool = False,
                     progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """transcribe() for each recording, the run opened once. Every file's header is checked before any is decoded
    (a bad file at the end costs no work); `progress(done, total)` counts recordings decoded."""
    from lamina.data.audio import LogMel
    from lamina.runs.open import open_run
    from lamina.tasks.ctc import CTCTask, greedy_decode, prefix_beam_search

    run = open_run(run_path)
    if not isinstance(run.task, CTCTask):
        raise ConfigError(f"transcribe needs a speech-recognition run (task ctc); {run.folder.path} is {run.facts.task}")
    task = run.task
    width = task.beam if beam is None else int(beam)
    if not 1 <= width <= 256:
        raise ConfigError(f"--beam: expected a width in 1 .. 256, got {width}")
    meta = run.facts.meta
    rate = int(meta["sample_rate"])
    for wav in wavs:
        check_recording(wav, rate, resample)
    logmel = LogMel(rate, int(meta["n_fft"]), int(meta["hop_length"]), int(meta["n_mels"]))
    mean, std = torch.tensor(meta["feature_mean"]), torch.tensor(meta["feature_std"])
    model = run.model.eval()
    dev = next(model.parameters()).device
    out = []
    if progress is not None:
        progress(0, len(wavs))
    for wav in wavs:
        x = load_recording(wav, rate, resample)
        feats = (logmel(torch.from_numpy(x)) - mean) / std  # (T, M)
        with torch.no_grad():
            lengths = torch.tensor([feats.shape[0]], device=dev)
            logits = model(feats[None].to(dev), lengths=lengths)
            n = int(model.output_lengths(lengths).clamp(max=logits.shape[1])[0])
        lp = F.log_softmax(logits[0, :n].float(), -1)
        greedy = task.text(greedy_decode(logits[:, :n], torch.tensor([n]), task.blank)[0])
        best = task.text(prefix_beam_search(lp, width, task.blank))
        out.append({"file": str(wav), "seconds": len(x) / rate, "text": best, "greedy": greedy, "beam": width,
                    "run": str(run.folder.path)})
        if progress is not None:
            progress(len(out), len(wavs))
    return out


__all__ = ["MAX_SECONDS", "check_recording", "load_recording", "transcribe", "transcribe_files"]
