"""Multimodal data sets built from real, offline data.

fashion_captions (task "contrastive"): Fashion-MNIST images paired with natural-language captions made from the
class names (3 synonyms or so per class) and 8 caption templates. Validation and test captions, and the zero-shot
prompts, use 5 *held-out* templates that never occur in training (new word orders of known words), so zero-shot
accuracy measures transfer to unseen phrasings, not recall of training strings:

    train: "a grayscale picture of the sneaker."      held-out: "this is a photo of the running shoe."

    splits: image float32 (N, 1, 28, 28) in [0, 1]; text int64 (N, L) word ids, right-padded; text_len (N,);
            y int64 (N,) the class (used for class-aware retrieval and zero-shot accuracy, never by the loss)
    meta["prompts"]: {"ids": (Q, L), "lens": (Q,), "class": (Q,)}: every held-out template x every name of
            every class, what `ContrastiveTask` turns into a zero-shot classifier

fsdd_fusion (task "fusion"): the Free Spoken Digit Dataset (3,000 recordings, 6 speakers) with, for each
recording, an image of the same digit (sklearn's 8x8 digits, drawn at random from the same class with a fixed
seed; the image pools of train/val/test are disjoint, so no test image is seen in training) and the digit's
word as text ("seven"; `text_noise` replaces it by another digit's word with that probability, so that text
alone is not a perfect oracle):

    audio float32 (N, T, n_mels) log-mel frames standardised per band with train statistics, zero-padded;
    audio_len (N,); image float32 (N, 1, 8, 8) = pixels / 16; text int64 (N, 1); text_len (N,); y int64 (N,)

  split="standard": FSDD's own split, recordings with index 0-4 are test; index 5-9 are validation (ours).
  split="speaker": every recording of `test_speaker` is test (an unseen voice); index 0-4 of the others are val.
  `modalities` keeps a subset of the tensors (unimodal baselines train on the same samples).

  Group metadata (fairness audits, lamina.trust.fairness): meta["groups"] always maps each speaker id to its
  name and, from root/speakers.csv when present, its accent / gender / language:
      {"tensor": "speaker", "speaker": ["george", ...], "accent": ["GRC/Greek", ...], "gender": [...], ...}
  (lists indexed by speaker id; ids number the speakers in sorted name order). `groups=True` adds the per-sample
  id as an int64 tensor "speaker" (N,) to every split (off by default: the splits keep their tensors as before;
  the fusion task ignores tensors that are not modalities).

Vocabulary: whole words (lowercase, punctuation split off) with lamina's five special ids first (<pad>=0,
<unk>=1, <s>, </s>=3, <mask>; see lamina.data.tokenizers); captions end in </s> so EOS pooling can find them.
A word-level vocabulary fits captions generated from ~40 distinct words better than BPE would.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from lamina.data.audio import LogMel, log_mel_batch, read_wav
from lamina.data.base import DataBundle, TensorData
from lamina.data.builtin import FASHION_MNIST_ROOT, fashion_mnist, shared_data_dir
from lamina.data.files import PathLike, registered
from lamina.data.splits import split_indices
from lamina.data.tokenizers import EOS_ID, PAD_ID, SPECIALS, UNK_ID
from lamina.errors import DataError, unknown_name

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def words(text: str) -> list[str]:
    """Lowercase words and single punctuation marks: "A T-shirt." -> ["a", "t", "-", "shirt", "."]."""
    return _WORD.findall(text.lower())


class WordVocab:
    """lamina's special tokens, then the sorted distinct words; unknown words map to <unk>."""

    def __init__(self, itos: list[str]):
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, texts) -> "WordVocab":
        return cls(list(SPECIALS) + sorted({w for t in texts for w in words(t)} - set(SPECIALS)))

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, eos: bool = True) -> list[int]:
        return [self.stoi.get(w, UNK_ID) for w in words(text)] + ([EOS_ID] if eos else [])

    def decode(self, ids) -> str:
        return " ".join(self.itos[i] for i in ids if i not in (PAD_ID, EOS_ID))

    def pad(self, texts, max_len: int | None = None, eos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids (N, max_len) int64 and lengths (N,); a text longer than max_len is a DataError."""
        rows = [self.encode(t, eos) for t in texts]
        longest = max(len(r) for r in rows)
        max_len = longest if max_len is None else max_len
        if longest > max_len:
            raise DataError(f"text of {longest} tokens is longer than max_len={max_len}")
        ids = torch.full((len(rows), max_len), PAD_ID, dtype=torch.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.int64)
        return ids, torch.tensor([len(r) for r in rows], dtype=torch.int64)


# ----------------------------------------------------------------------------------- fashion captions

FASHION_NAMES: list[list[str]] = [
    ["t-shirt", "top", "tee"],
    ["trouser", "pair of trousers", "pair of pants"],
    ["pullover", "sweater", "jumper"],
    ["dress", "gown"],
    ["coat", "jacket"],
    ["sandal", "summer sandal"],
    ["shirt", "button shirt", "blouse"],
    ["sneaker", "running shoe", "trainer"],
    ["bag", "handbag", "purse"],
    ["ankle boot", "boot"],
]
TRAIN_TEMPLATES = [
    "a photo of a {}.",
    "a {} on a plain background.",
    "an image of a {}.",
    "a grayscale picture of the {}.",
    "a product photo of a {}.",
    "a small, low resolution photo of a {}.",
    "this is a {}.",
    "a {}, seen from the front.",
]
# Held out for validation/test captions and zero-shot prompts: unseen templates made of words seen in training.
PROMPT_TEMPLATES = [
    "a picture of a {}.",
    "a low resolution image of the {}.",
    "this is a photo of the {}.",
    "the {} on a background.",
    "a grayscale photo of a small {}.",
]


def fill(template: str, name: str) -> str:
    """Template + class name, with "a" -> "an" before a vowel: fill("a photo of a {}.", "ankle boot")."""
    return re.sub(r"\ba (?=[aeiou])", "an ", template.format(name))


def _captions(y: np.ndarray, names: list[list[str]], templates: list[str], rng: np.random.Generator) -> list[str]:
    t = rng.integers(0, len(templates), len(y))
    pick = rng.random(len(y))  # which synonym: floor(u * n_names) per sample
    return [fill(templates[ti], names[c][int(u * len(names[c]))]) for c, ti, u in zip(y.tolist(), t.tolist(), pick)]


def caption_vocab(names: list[list[str]] = FASHION_NAMES, templates: list[str] = TRAIN_TEMPLATES) -> WordVocab:
    """Every word any training caption can contain (independent of which captions a seed draws)."""
    return WordVocab.build(fill(t, n) for t in templates for ns in names for n in ns)


def prompt_set(vocab: WordVocab, names: list[list[str]], templates: list[str], max_len: int) -> dict:
    """Zero-shot prompts as plain lists (they go into data.json): ids (Q, L), lens (Q,), class (Q,)."""
    texts, cls = [], []
    for k, ns in enumerate(names):
        for t in templates:
            for n in ns:
                texts.append(fill(t, n))
                cls.append(k)
    ids, lens = vocab.pad(texts, max_len)
    return {"ids": ids.tolist(), "lens": lens.tolist(), "class": cls, "texts": texts}


@registered("fashion_captions", "Fashion-MNIST images paired with templated captions (8 train / 5 held-out "
            "templates); CLIP-style contrastive training + zero-shot prompts", "contrastive",
            f"{FASHION_MNIST_ROOT} (Debian package dataset-fashion-mnist)")
def fashion_captions(*, val_fraction: float = 5000 / 60000, test_fraction: float | None = None, seed: int = 0,
                     root: PathLike = FASHION_MNIST_ROOT, limit: int | None = None,
                     test_limit: int | None = None) -> DataBundle:
    """Splits as fashion_mnist's (official 10,000 test images); captions drawn with `seed`. See the module doc.

    `limit` keeps the first `limit` training images, `test_limit` the first `test_limit` test images (quick runs).
    """
    base = fashion_mnist(val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, root=root, limit=limit)
    if test_limit is not None:
        if int(test_limit) < 1:
            raise DataError(f"fashion_captions: test_limit must be a positive integer, got {test_limit!r}")
        base.test = base.test.subset(torch.arange(min(int(test_limit), len(base.test))))
    vocab = caption_vocab()
    unknown = sorted({w for t in PROMPT_TEMPLATES for n in sum(FASHION_NAMES, []) for w in words(fill(t, n))}
                     - set(vocab.itos))
    if unknown:  # a held-out template must be a new arrangement of known words, else zero-shot sees <unk>
        raise DataError(f"fashion_captions: prompt words not in the training vocabulary: {unknown}")
    rng = np.random.default_rng(seed)
    splits, max_len = {}, 0
    texts = {}
    for split in ("train", "val", "test"):
        data = getattr(base, split)
        if data is None:
            continue
        y = data.y.numpy()
        texts[split] = _captions(y, FASHION_NAMES, TRAIN_TEMPLATES if split == "train" else PROMPT_TEMPLATES, rng)
        max_len = max(max_len, max(len(vocab.encode(t)) for t in texts[split]))
    prompts = prompt_set(vocab, FASHION_NAMES, PROMPT_TEMPLATES, None)
    max_len = max(max_len, max(prompts["lens"]))
    prompts = prompt_set(vocab, FASHION_NAMES, PROMPT_TEMPLATES, max_len)
    for split, t in texts.items():
        data = getattr(base, split)
        ids, lens = vocab.pad(t, max_len)
        splits[split] = TensorData(image=data.x, text=ids, text_len=lens, y=data.y)
    meta = {"loader": "fashion_captions", "pixel_max": 255.0, "classes": list(base.class_names),
            "class_names": FASHION_NAMES, "train_templates": TRAIN_TEMPLATES, "prompt_templates": PROMPT_TEMPLATES,
            "vocab": vocab.itos, "vocab_size": len(vocab), "max_len": max_len, "pad_id": PAD_ID,
            "prompts": prompts, "pad_trim": {"text": "text_len"},
            "input_shapes": {"image": [1, 28, 28], "text": [max_len]}, "modalities": ["image", "text"]}
    return DataBundle("fashion_captions", splits["train"], splits.get("val"), splits.get("test"), "contrastive",
                      (1, 28, 28), 10, list(base.class_names), meta)


# ----------------------------------------------------------------------------------------- FSDD fusion

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FSDD_MODALITIES = ("image", "text", "audio")
_FSDD_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")


def fsdd_index(root: Path) -> list[tuple[Path, int, str, int]]:
    """(path, digit, speaker, index) of every recording in root/recordings, sorted by file name."""
    rec = root / "recordings"
    if not rec.is_dir():
        raise DataError(f"{rec}: FSDD recordings not found; pass path= (the folder holding recordings/) or set "
                        "LAMINA_SHARED_DATA to the shared data folder")
    out = []
    for f in sorted(rec.glob("*.wav")):
        m = _FSDD_NAME.match(f.name)
        if m is None:
            raise DataError(f"{f}: not an FSDD recording name; expected {{digit}}_{{speaker}}_{{index}}.wav")
        out.append((f, int(m.group(1)), m.group(2), int(m.group(3))))
    if not out:
        raise DataError(f"{rec}: no .wav recordings")
    return out


def fsdd_split(index: list[tuple[Path, int, str, int]], split: str, test_speaker: str) -> np.ndarray:
    """0 = train, 1 = val, 2 = test per recording (see the module docstring)."""
    idx = np.array([r[3] for r in index])
    speakers = np.array([r[2] for r in index])
    if split == "standard":
        return np.where(idx < 5, 2, np.where(idx < 10, 1, 0))
    if split == "speaker":
        if test_speaker not in set(speakers.tolist()):
            raise DataError(f"fsdd_fusion: {unknown_name('test_speaker', test_speaker, set(speakers.tolist()))}")
        return np.where(speakers == test_speaker, 2, np.where(idx < 5, 1, 0))
    raise DataError(f"fsdd_fusion: {unknown_name('split', split, ('standard', 'speaker'))}")


def fsdd_groups(root: Path, index: list[tuple[Path, int, str, int]]) -> dict:
    """Per-speaker group tables (see the module docstring); speakers.csv columns other than `speaker` become
    attributes; a speaker missing from the file gets "unknown"."""
    import csv

    names = sorted({r[2] for r in index})
    out: dict = {"tensor": "speaker", "speaker": names}
    table = root / "speakers.csv"
    if table.is_file():
        with open(table, newline="") as f:
            rows = {r["speaker"].strip(): r for r in csv.DictReader(f) if r.get("speaker")}
        cols = [c for c in (next(iter(rows.values())).keys() if rows else []) if c and c != "speaker"]
        for c in cols:
            out[c] = [(rows[n].get(c) or "unknown").strip() if n in rows else "unknown" for n in names]
    return out


def _paired_images(labels: np.ndarray, part: np.ndarray, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """For each sample (label, split part), a random sklearn digit image of that label from that part's pool."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = torch.from_numpy(np.asarray(raw.images, np.float32) / 16.0).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.from_numpy(np.asarray(raw.target, np.int64))
    pools = split_indices(len(y), 0.2, 0.2, seed, stratify=y)  # disjoint train / val / test image pools
    rng = np.random.default_rng(seed + 1)
    pick = np.empty(len(labels), np.int64)
    for p, pool in enumerate(pools):
        pool = pool.numpy()
        for d in range(10):
            cand = pool[y.numpy()[pool] == d]
            rows = np.flatnonzero((part == p) & (labels == d))
            pick[rows] = rng.choice(cand, len(rows), replace=True)
    return images[pick], pick


@registered("fsdd_fusion", "spoken digits (FSDD audio) + an image of the same digit (sklearn digits) + the digit "
            "word; any subset of modalities", "fusion", "../shared/data/fsdd (or $LAMINA_SHARED_DATA) + scikit-learn")
def fsdd_fusion(*, path: PathLike | None = None, modalities=FSDD_MODALITIES, split: str = "standard",
                test_speaker: str = "theo", text_noise: float = 0.0, n_mels: int = 40, n_fft: int = 256,
                hop_length: int = 128, max_seconds: float = 1.5, seed: int = 0, groups: bool = False) -> DataBundle:
    """See the module docstring. Audio: 8 kHz, 32 ms Hann windows, 16 ms hop, Slaney mel scale and filter norm."""
    mods = [modalities] if isinstance(modalities, str) else list(modalities)
    if not mods:
        raise DataError(f"fsdd_fusion: modalities is empty; pick one or more of {', '.join(FSDD_MODALITIES)}")
    for m in mods:
        if m not in FSDD_MODALITIES:
            raise DataError(f"fsdd_fusion: {unknown_name('modality', m, FSDD_MODALITIES)}")
    mods = [m for m in FSDD_MODALITIES if m in mods]
    if not 0.0 <= float(text_noise) < 1.0:
        raise DataError(f"fsdd_fusion: text_noise must be in [0, 1), got {text_noise!r}")
    if float(max_seconds) <= 0:
        raise DataError(f"fsdd_fusion: max_seconds must be positive, got {max_seconds!r}")
    root = Path(path).expanduser() if path is not None else shared_data_dir() / "fsdd"
    index = fsdd_index(root)
    part = fsdd_split(index, split, test_speaker)
    labels = np.array([r[1] for r in index], np.int64)
    tensors: dict[str, torch.Tensor] = {"y": torch.from_numpy(labels)}
    meta: dict = {"loader": "fsdd_fusion", "modalities": mods, "classes": [str(d) for d in range(10)],
                  "split": split, "num_outputs": 10, "pad_trim": {}, "input_shapes": {}}
    if "audio" in mods:
        sr = 8000
        logmel = LogMel(sr, n_fft, hop_length, n_mels)
        waves = [read_wav(r[0], sample_rate=sr)[0] for r in index]
        max_frames = int(logmel.num_frames(int(round(float(max_seconds) * sr))))
        frames, lens = log_mel_batch(waves, logmel, max_frames)  # (N, T, M) dB, zero-padded
        valid = torch.arange(frames.shape[1])[None] < lens[:, None]  # (N, T)
        train_frames = frames[torch.from_numpy(part == 0)][valid[torch.from_numpy(part == 0)]]  # (frames, M)
        mean, std = train_frames.mean(0), train_frames.std(0).clamp(min=1e-5)
        tensors["audio"] = torch.where(valid[..., None], (frames - mean) / std, torch.zeros(()))
        tensors["audio_len"] = lens
        meta.update(sample_rate=sr, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels, mel_scale="slaney",
                    mel_norm="slaney", max_frames=max_frames, audio_mean=mean.tolist(), audio_std=std.tolist())
        meta["pad_trim"]["audio"] = "audio_len"
        meta["input_shapes"]["audio"] = [max_frames, n_mels]
    if "image" in mods:
        tensors["image"], _ = _paired_images(labels, part, seed)
        meta.update(pixel_max=16.0)
        meta["input_shapes"]["image"] = [1, 8, 8]
    if "text" in mods:
        rng = np.random.default_rng(seed + 2)
        shown = labels.copy()
        noisy = rng.random(len(labels)) < float(text_noise)
        shown[noisy] = (labels[noisy] + rng.integers(1, 10, int(noisy.sum()))) % 10  # another digit, uniformly
        vocab = WordVocab.build(DIGIT_WORDS)
        tensors["text"], tensors["text_len"] = vocab.pad([DIGIT_WORDS[d] for d in shown], eos=False)
        meta.update(vocab=vocab.itos, vocab_size=len(vocab), max_len=int(tensors["text"].shape[1]), pad_id=PAD_ID,
                    text_noise=float(text_noise))
        meta["pad_trim"]["text"] = "text_len"
        meta["input_shapes"]["text"] = [int(tensors["text"].shape[1])]
    meta["groups"] = fsdd_groups(root, index)
    if groups:
        sid = {name: i for i, name in enumerate(meta["groups"]["speaker"])}
        tensors["speaker"] = torch.tensor([sid[r[2]] for r in index], dtype=torch.int64)
    parts = [TensorData(**{k: v[torch.from_numpy(part == p)] for k, v in tensors.items()}) for p in range(3)]
    meta["speakers"] = {name: sorted({r[2] for r, q in zip(index, part) if q == p})
                        for p, name in enumerate(("train", "val", "test"))}
    first = meta["input_shapes"][mods[0]]
    return DataBundle("fsdd_fusion", parts[0], parts[1], parts[2], "fusion", tuple(first), 10,
                      [str(d) for d in range(10)], meta)


__all__ = ["WordVocab", "words", "fill", "caption_vocab", "prompt_set", "fashion_captions", "fsdd_fusion",
           "fsdd_index", "fsdd_split", "fsdd_groups", "FASHION_NAMES", "TRAIN_TEMPLATES", "PROMPT_TEMPLATES",
           "DIGIT_WORDS"]
