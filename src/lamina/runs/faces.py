"""Enrol and match faces with a trained face run (task face): `enroll`, `identify`, `verify`.

* enroll(run, folder): a folder of sub-folders, one per person, images of any size (PGM, PNG, JPEG, BMP), as the
  run's training data was read. Each person's template is the renormalised mean of their unit embeddings.
  The gallery also stores an acceptance threshold: the cosine that 1% (`far`) of impostor pairs among the
  enrolled images exceed, so a face from nobody enrolled comes back "unknown" about as often as that rate
  promises. Written as JSON (never a pickle), atomically.
* identify(run, gallery, images): the nearest templates of each image; the best is a match when its cosine
  reaches the threshold.
* verify(run, a, b): the cosine of two images' embeddings and whether it reaches a threshold (given, or the
  FAR-1% threshold of the run's validation split, else its test split).

Galleries are files users pass around: reading one checks its size before parsing, its version, that it was
made with a model of the same embedding width and input, and that every template is finite.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from lamina.errors import ConfigError, DataError
from lamina.io import atomic_write_text

GALLERY_VERSION = 1
MAX_GALLERY_BYTES = 256 * 2**20  # ~100k people at 128-d as JSON text
MAX_IMAGES_PER_CALL = 10_000  # identify/verify: what one request may cost


def _face_run(path):
    from lamina.runs.open import open_task_run
    from lamina.tasks.faces import FaceTask

    return open_task_run(path, FaceTask, "a face run (task face)", "configs/orl_faces_arcface.yaml")


def _embed(run, x: torch.Tensor) -> torch.Tensor:
    """Unit embeddings of images x (N, C, H, W) in [0, 1], after the run's deterministic transforms (normalize)."""
    from lamina.data.transforms import eval_transforms
    from lamina.tasks.faces import embed_all

    norm = eval_transforms(run.cfg.data.augment)
    if norm is not None:
        x = norm({"x": x}, None)["x"]
    return embed_all(run.model, x, run.device)


def _embed_split(run, data) -> torch.Tensor:
    """_embed over a split: its tensors, or batch by batch through its loader when streamed from files."""
    from lamina.data.sample import is_streamed, split_batches
    from lamina.data.transforms import eval_transforms
    from lamina.tasks.faces import embed_all

    if not is_streamed(data):
        return _embed(run, data.x)
    norm = eval_transforms(run.cfg.data.augment)
    return torch.cat([embed_all(run.model, b["x"], run.device) for b in split_batches(data, 256, transform=norm)])


def _embed_files(run, files) -> torch.Tensor:
    from lamina.data.faces import read_faces

    meta = run.facts.meta
    return _embed(run, read_faces(files, tuple(meta["image_size"]), bool(meta["grayscale"])))


def impostor_threshold(emb: torch.Tensor, y: torch.Tensor, far: float) -> float | None:
    """The cosine that a fraction `far` of impostor pairs (different people) exceed; None without enough pairs."""
    from lamina.tasks.faces import pair_scores

    s, genuine = pair_scores(emb, y)
    imp = s[~genuine]
    if len(imp) * far < 1:
        return None
    return float(torch.quantile(imp.double(), 1.0 - far))


def enroll(run_path, folder, out, far: float = 0.01, on_person=None) -> dict:
    from lamina.data.faces import person_folders

    if not 0.0 < far < 1.0:
        raise ConfigError(f"--far: expected a false-accept rate in (0, 1), got {far}")
    run = _face_run(run_path)
    people = person_folders(folder)
    names, templates, counts, embs, ys = [], [], [], [], []
    for i, (name, files) in enumerate(people):
        e = _embed_files(run, files)
        names.append(name)
        counts.append(len(files))
        templates.append(torch.nn.functional.normalize(e.mean(0), dim=-1))
        embs.append(e)
        ys.append(torch.full((len(e),), i))
        if on_person is not None:
            on_person(name, len(files))
    thr = impostor_threshold(torch.cat(embs), torch.cat(ys), far) if len(people) > 1 else None
    gallery = {"lamina_gallery": GALLERY_VERSION, "run": str(run.folder.path), "model": run.cfg.model.name,
               "embed_dim": int(templates[0].numel()), "image_size": list(run.facts.meta["image_size"]),
               "grayscale": bool(run.facts.meta["grayscale"]), "far": far, "threshold": thr,
               "people": [{"name": n, "images": c, "template": [round(v, 6) for v in t.tolist()]}
                          for n, c, t in zip(names, counts, templates)]}
    atomic_write_text(out, json.dumps(gallery))
    return {"gallery": str(out), "people": len(names), "images": sum(counts), "threshold": thr, "far": far}


def read_gallery(path, run) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: gallery not found; make one with `lamina faces enroll RUN FOLDER --out {p.name}`")
    if p.stat().st_size > MAX_GALLERY_BYTES:
        raise DataError(f"{p}: {p.stat().st_size / 2**20:.0f} MB; galleries are at most "
                        f"{MAX_GALLERY_BYTES // 2**20} MB")
    try:
        g = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{p}: not a lamina face gallery (invalid JSON: {e})") from None
    if not isinstance(g, dict) or g.get("lamina_gallery") != GALLERY_VERSION:
        raise DataError(f"{p}: not a lamina face gallery (version {GALLERY_VERSION}); make one with `lamina faces "
                        "enroll`")
    dim = int(run.model.num_features)
    if g.get("embed_dim") != dim or list(g.get("image_size", [])) != list(run.facts.meta["image_size"]):
        raise DataError(f"{p}: enrolled with {g.get('model')} ({g.get('embed_dim')}-d, images "
                        f"{g.get('image_size')}); this run's model is {run.cfg.model.name} ({dim}-d, images "
                        f"{run.facts.meta['image_size']}); enrol again with this run")
    people = g.get("people")
    if not isinstance(people, list) or not people:
        raise DataError(f"{p}: the gallery enrols nobody")
    try:
        t = torch.tensor([q["template"] for q in people], dtype=torch.float32)
        names = [str(q["name"]) for q in people]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{p}: malformed gallery entry ({type(e).__name__}: {e})") from None
    if t.shape != (len(people), dim) or not torch.isfinite(t).all():
        raise DataError(f"{p}: templates must be {dim} finite numbers each")
    thr = g.get("threshold")
    if thr is not None and not (isinstance(thr, (int, float)) and math.isfinite(thr)):
        raise DataError(f"{p}: threshold must be a number, got {thr!r}")
    return {"names": names, "templates": torch.nn.functional.normalize(t, dim=-1), "threshold": thr}


def _files(images) -> list[Path]:
    if len(images) > MAX_IMAGES_PER_CALL:
        raise ConfigError(f"{len(images)} images in one call; at most {MAX_IMAGES_PER_CALL:,}")
    out = []
    for f in images:
        p = Path(f).expanduser()
        if not p.is_file():
            raise DataError(f"{p}: image not found")
        out.append(p)
    return out


def identify(run_path, gallery, images, top_k: int = 3, threshold: float | None = None) -> list[dict]:
    if not 1 <= top_k <= 100:
        raise ConfigError(f"--top-k: expected 1 .. 100, got {top_k}")
    run = _face_run(run_path)
    g = read_gallery(gallery, run)
    thr = g["threshold"] if threshold is None else float(threshold)
    files = _files(images)
    scores = _embed_files(run, files) @ g["templates"].t()  # (N, people)
    rows = []
    for f, s in zip(files, scores):
        best, idx = s.topk(min(top_k, len(g["names"])))
        cands = [{"name": g["names"][int(i)], "score": round(float(b), 4)} for b, i in zip(best, idx)]
        match = cands[0]["name"] if thr is None or cands[0]["score"] >= thr else None
        rows.append({"image": str(f), "match": match, "threshold": thr, "candidates": cands})
    return rows


def run_threshold(run, far: float = 0.01) -> float | None:
    """The FAR threshold of the run's validation split (else its test split): pairs of different people."""
    bundle = run.data()
    data = bundle.val if bundle.val is not None else bundle.test
    if data is None:
        return None
    return impostor_threshold(_embed_split(run, data), data.y, far)


def verify(run_path, a, b, threshold: float | None = None) -> dict:
    run = _face_run(run_path)
    e = _embed_files(run, _files([a, b]))
    score = float(e[0] @ e[1])
    source = "given"
    if threshold is None:
        threshold, source = run_threshold(run), "FAR 1% on the run's validation (or test) split"
        if threshold is None:
            raise ConfigError("--threshold: the run's data has too few impostor pairs to set one; pass a cosine")
    return {"a": str(a), "b": str(b), "score": round(score, 4), "threshold": round(float(threshold), 4),
            "threshold_from": source, "same_person": score >= threshold}


__all__ = ["enroll", "identify", "impostor_threshold", "read_gallery", "run_threshold", "verify"]
