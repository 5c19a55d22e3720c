"""Run plots as PNG (a leaf: matplotlib + numpy, no other lamina import): loss and metric curves per epoch, a
confusion matrix for classification, a continual-learning accuracy matrix, and `save_figure`, the finish every
lamina figure gets (trust, report, runs)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers / CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
    """One panel for loss (train vs val), one per other metric shared by train/val (acc, mae, ...)."""
    epochs = [r["epoch"] for r in history]
    metrics = sorted({k.split("/", 1)[1] for r in history for k in r
                      if "/" in k and k.split("/", 1)[0] in ("train", "val") and not k.endswith("samples_per_s")})
    metrics = ["loss"] + [m for m in metrics if m != "loss"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for split, style in (("train", "-o"), ("val", "-s")):
            ys = [r.get(f"{split}/{m}") for r in history]
            pts = [(e, y) for e, y in zip(epochs, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), style, ms=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_title(m)
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path, title)


def plot_confusion(cm: np.ndarray, class_names: list[str] | None, path: str | Path, title: str = "") -> Path:
    """Row-normalized colours (recall per class), raw counts written in the cells."""
    cm = np.asarray(cm)
    k = cm.shape[0]
    names = class_names or [str(i) for i in range(k)]
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(4.0, 0.55 * k + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), names, rotation=45 if k > 5 else 0, ha="right" if k > 5 else "center")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    ax.set_title(title or f"confusion matrix (acc {np.trace(cm) / max(cm.sum(), 1):.4f})")
    return save_figure(fig, path)


def plot_accuracy_matrix(matrix: list[list[float]], path: str | Path, title: str = "",
                         labels: list[str] | None = None) -> Path:
    """Continual learning: accuracy on experience j (column) after training through experience i (row); the
    diagonal is each experience just learned, the lower triangle what was kept, the upper what was not seen yet."""
    m = np.asarray(matrix, dtype=float)
    rows, cols = m.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * cols + 2.2), max(3.2, 0.7 * rows + 1.6)))
    im = ax.imshow(m, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(cols), labels or [str(j) for j in range(cols)])
    ax.set_yticks(range(rows), [str(i) for i in range(rows)] if rows > 1 else ["joint"])
    ax.set_xlabel("tested on experience")
    ax.set_ylabel("after training on experience")
    for i in range(rows):
        for j in range(cols):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if m[i, j] > 0.6 else "white")
    fig.colorbar(im, ax=ax, fraction=0.046, label="test accuracy")
    return save_figure(fig, path, title)


def plot_stream_comparison(curves: dict[str, list[float]], bounds: dict[str, float], path: str | Path,
                           title: str = "") -> Path:
    """Continual strategies side by side: mean test accuracy over the experiences seen so far, after each
    experience; `bounds` (e.g. joint training) as horizontal lines."""
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    for name, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, "-o", ms=4, label=f"{name} ({ys[-1]:.3f})")
    for name, y in bounds.items():
        ax.axhline(y, ls="--", color="grey", label=f"{name} ({y:.3f})")
    n = max((len(v) for v in curves.values()), default=1)
    ax.set_xticks(range(1, n + 1))
    ax.set_xlabel("experiences trained")
    ax.set_ylabel("mean test accuracy on seen experiences")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, title)


def save_figure(fig, path: str | Path, title: str = "") -> Path:
    """The project's figure finish: optional suptitle, tight layout, 110 dpi PNG, figure closed."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_federated(curves: dict[str, list[float]], path: str | Path, title: str = "") -> Path:
    """Federated learning: test accuracy of the global model after each round (round 0: the initial model), one
    line per setting (strategy and client split, or the centralised baseline)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.9))
    for name, ys in curves.items():
        style = "--" if name == "central" else "-"
        ax.plot(range(len(ys)), ys, style, marker="o", ms=3, label=f"{name} ({ys[-1]:.3f})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy of the global model")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, title)


def plot_detections(image, detections: list[dict], path: str | Path, title: str = "") -> Path:
    """An image (C, H, W) tensor or array with its detections ({"box": [x1, y1, x2, y2], "class", "score"}) drawn."""
    img = np.asarray(image, dtype=np.float32)
    img = img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
    for d in detections:
        x1, y1, x2, y2 = d["box"]
        ax.add_patch(plt.Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, color="red", lw=1.5))
        ax.text(x1, y1 - 1, f"{d['class']} {d['score']:.2f}", color="red", fontsize=7, va="bottom")
    ax.axis("off")
    return save_figure(fig, path, title)



def plot_rl_returns(episodes: list[tuple[int, float, int]], evals: list[dict], path: str | Path,
                    title: str = "") -> Path:
    """Training-episode returns (points, with a running mean of 20) and greedy evaluations (mean ± std) against
    environment steps."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    if episodes:
        steps = np.array([e[0] for e in episodes])
        rets = np.array([e[1] for e in episodes])
        ax.scatter(steps, rets, s=4, alpha=0.25, color="tab:blue", label="training episodes")
        k = min(20, len(rets))
        run = np.convolve(rets, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], run, color="tab:blue", label=f"running mean of {k}")
    if evals:
        s = np.array([e["step"] for e in evals])
        m, sd = np.array([e["mean"] for e in evals]), np.array([e["std"] for e in evals])
        ax.errorbar(s, m, yerr=sd, color="tab:orange", marker="o", ms=3, capsize=2, label="greedy evaluation")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episode return")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path, title)


def frame_strip(frames: list, path: str | Path, title: str = "", max_frames: int = 12, every: int = 1) -> Path:
    """Up to `max_frames` rendered RGB frames (H, W, 3 uint8; captured every `every` steps), evenly chosen, side
    by side in one PNG, each titled with its step."""
    if not frames:
        raise ValueError("no frames to draw")
    idx = np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int)
    fig, axes = plt.subplots(1, len(idx), figsize=(1.6 * len(idx), 1.6), squeeze=False)
    for ax, i in zip(axes[0], idx):
        ax.imshow(frames[i])
        ax.set_title(f"step {i * every}", fontsize=7)
        ax.axis("off")
    return save_figure(fig, path, title)


def plot_rl_seeds(steps, returns, path: str | Path, title: str = "") -> Path:
    """Greedy evaluation returns (seeds x evaluations): each seed thin, the mean bold with a 95% t band."""
    from scipy import stats

    r = np.asarray(returns, dtype=float)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for row in r:
        ax.plot(steps, row, color="tab:blue", alpha=0.25, lw=0.8)
    mu = r.mean(0)
    ax.plot(steps, mu, color="tab:blue", lw=2, label=f"mean of {len(r)} seeds")
    if len(r) > 1:
        half = stats.t.ppf(0.975, len(r) - 1) * r.std(0, ddof=1) / np.sqrt(len(r))
        ax.fill_between(steps, mu - half, mu + half, color="tab:blue", alpha=0.2, label="95% interval")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("greedy return")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path, title)


def write_gif(frames: list, path: str | Path, fps: int = 25) -> Path:
    """RGB frames (H, W, 3 uint8) as an animated GIF that loops, written atomically (temp file + rename)."""
    import os

    from PIL import Image

    if not frames:
        raise ValueError("no frames to write")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    os.replace(tmp, path)
    return path
