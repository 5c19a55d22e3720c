"""Speech recognition data: spoken digit sequences built from real FSDD recordings, for CTC models.

fsdd_sequences (task "ctc"): each utterance is 1..max_digits FSDD recordings of one speaker, joined by short
pauses (0.1-0.4 s of faint noise, as between words spoken with a breath), with a lead-in and a tail. Transcripts
are the digit words ("four zero seven"); tokens are the ten digits (ids 1..10; 0 is CTC's blank).

Speakers are held out: the `test_speakers` (default theo and george: one USA, one Greek accent) appear only in
the test split; the other four speakers' recordings with FSDD index 0-4 build the validation utterances and
index 5-49 the training ones, so no recording is shared between splits. Features: 40 log-mel bands of 32 ms
windows every 16 ms at 8 kHz (lamina.data.audio), normalised per band with the training frames' mean and std
(stored in meta, so `lamina transcribe` applies the same to a new recording).

Batch tensors: x (N, T, 40) zero-padded frames, x_len (N,), y (N, L) token ids padded with 0, y_len (N,).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lamina.data.audio import LogMel, log_mel_batch, read_wav
from lamina.data.base import DataBundle, TensorData
from lamina.data.builtin import shared_data_dir
from lamina.data.files import PathLike, registered
from lamina.data.multimodal import DIGIT_WORDS, fsdd_index
from lamina.errors import DataError

SAMPLE_RATE = 8000
BLANK = 0
VOCAB = ["<blank>", *DIGIT_WORDS]  # token id 1 + d is digit d


def text_of(tokens) -> str:
    """Token ids (no blanks) -> "four zero seven"."""
    return " ".join(VOCAB[int(t)] for t in tokens if int(t) != BLANK)


def compose(recordings: list[np.ndarray], rng: np.random.Generator, pause=(0.1, 0.4), edge=(0.05, 0.2),
            noise: float = 1e-3) -> np.ndarray:
    """One utterance: edge silence, recordings joined by pauses, edge silence; every silence faint white noise
    (a digital zero is not what microphones record, and log-mel's floor would make silence a unique feature)."""
    def gap(lo_hi):
        return (rng.standard_normal(int(rng.uniform(*lo_hi) * SAMPLE_RATE)) * noise).astype(np.float32)

    parts = [gap(edge)]
    for i, r in enumerate(recordings):
        if i:
            parts.append(gap(pause))
        parts.append(r.astype(np.float32))
    parts.append(gap(edge))
    return np.concatenate(parts)


@registered("fsdd_sequences", "spoken digit sequences (1-5 real FSDD recordings of one speaker, with pauses) and "
            "their transcripts; test speakers held out", "ctc", "../shared/data/fsdd (or $LAMINA_SHARED_DATA)")
def fsdd_sequences(*, path: PathLike | None = None, test_speakers=("theo", "george"), train_size: int = 4000,
                   val_size: int = 400, test_size: int = 800, min_digits: int = 1, max_digits: int = 5,
                   n_mels: int = 40, n_fft: int = 256, hop_length: int = 128, seed: int = 0) -> DataBundle:
    """See the module docstring; sizes are numbers of utterances per split (drawn with a seeded generator)."""
    test_speakers = [test_speakers] if isinstance(test_speakers, str) else list(test_speakers)
    if not 1 <= int(min_digits) <= int(max_digits) <= 20:
        raise DataError(f"fsdd_sequences: expected 1 <= min_digits <= max_digits <= 20, got {min_digits}, "
                        f"{max_digits}")
    for name, n in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
        if int(n) < 1 or int(n) > 100_000:  # bound what one config can cost: each utterance is seconds of audio
            raise DataError(f"fsdd_sequences: {name} must be in 1 .. 100000, got {n}")
    root = Path(path).expanduser() if path is not None else shared_data_dir() / "fsdd"
    index = fsdd_index(root)
    speakers = sorted({r[2] for r in index})
    bad = [s for s in test_speakers if s not in speakers]
    if bad or not test_speakers or len(set(test_speakers)) == len(speakers):
        raise DataError(f"fsdd_sequences: test_speakers {test_speakers} must be 1..{len(speakers) - 1} of the "
                        f"FSDD speakers: {', '.join(speakers)}")
    waves = [read_wav(r[0], sample_rate=SAMPLE_RATE)[0] for r in index]
    pools = {"train": [], "val": [], "test": []}  # recording ids per split and speaker
    for i, (_, _, spk, k) in enumerate(index):
        split = "test" if spk in test_speakers else ("val" if k < 5 else "train")
        pools[split].append((spk, i))
    rng = np.random.default_rng(seed + 31337)
    logmel = LogMel(SAMPLE_RATE, n_fft, hop_length, n_mels)
    made = {}
    for split, n in (("train", train_size), ("val", val_size), ("test", test_size)):
        by_spk: dict[str, list[int]] = {}
        for spk, i in pools[split]:
            by_spk.setdefault(spk, []).append(i)
        names = sorted(by_spk)
        utts, targets = [], []
        for _ in range(int(n)):
            spk = names[rng.integers(len(names))]
            k = int(rng.integers(int(min_digits), int(max_digits) + 1))
            ids = [by_spk[spk][j] for j in rng.integers(len(by_spk[spk]), size=k)]
            utts.append(compose([waves[i] for i in ids], rng))
            targets.append([1 + index[i][1] for i in ids])
        frames, lens = log_mel_batch(utts, logmel)
        y = torch.zeros(len(targets), int(max_digits), dtype=torch.int64)
        for j, t in enumerate(targets):
            y[j, :len(t)] = torch.tensor(t)
        made[split] = (frames, lens, y, torch.tensor([len(t) for t in targets]))
    frames, lens = made["train"][0], made["train"][1]
    valid = torch.arange(frames.shape[1])[None] < lens[:, None]
    mean, std = frames[valid].mean(0), frames[valid].std(0).clamp(min=1e-5)  # per band, training frames only
    parts = {}
    for split, (f, ln, y, yl) in made.items():
        v = torch.arange(f.shape[1])[None] < ln[:, None]
        parts[split] = TensorData(x=torch.where(v[..., None], (f - mean) / std, torch.zeros(())), x_len=ln,
                                  y=y, y_len=yl)
    meta = {"loader": "fsdd_sequences", "sample_rate": SAMPLE_RATE, "n_fft": n_fft, "hop_length": hop_length,
            "n_mels": n_mels, "feature_mean": mean.tolist(), "feature_std": std.tolist(), "vocab": VOCAB,
            "vocab_size": len(VOCAB), "blank": BLANK, "max_digits": int(max_digits),
            "pad_trim": {"x": "x_len", "y": "y_len"}, "num_outputs": len(VOCAB),
            "speakers": {"test": sorted(test_speakers), "train": sorted({s for s, _ in pools["train"]})}}
    return DataBundle("fsdd_sequences", parts["train"], parts["val"], parts["test"], "ctc", (None, n_mels),
                      len(VOCAB), VOCAB, meta)


__all__ = ["BLANK", "SAMPLE_RATE", "VOCAB", "compose", "fsdd_sequences", "text_of"]
