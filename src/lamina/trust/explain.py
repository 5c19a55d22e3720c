"""Explanations: which inputs drive a prediction. Attribution methods on captum, attention rollout, token scores.

    attribute(model, x, target, method)      x (B, ...) float -> attributions of x's shape, for
        saliency              |d f_t / d x|  (Simonyan et al. 2014; abs=False gives the signed gradient)
        integrated_gradients  (x - x0) * mean_a d f_t / d x (x0 + a (x - x0))  (Sundararajan et al. 2017); sums to
                              f_t(x) - f_t(x0) (completeness, `completeness_delta` measures the gap)
        smoothgrad            saliency averaged over noisy copies of x, noise seeded per example (Smilkov et al. 2017)
        gradcam               ReLU(sum_k mean(d f_t / d A_k) A_k) at a conv layer (Selvaraju et al. 2017),
                              bilinearly upsampled to the input size, the same map in every channel
        occlusion             f_t(x) - f_t(x with a window set to 0), averaged over the windows covering a pixel
    attention_rollout(vit, x)   Abnar & Zuidema 2020: per block, heads averaged, 0.5 A + 0.5 I (the residual),
                                rows renormalized, multiplied through the blocks; the cls token's row (or, with
                                mean pooling, the mean row of the patch tokens) over the patch grid
    token_attributions(model, ids, mask, target)   Layer Integrated Gradients on the token-embedding layer of a
                                sequence classifier, summed over the embedding width -> (B, T); padding gets 0
    randomization_check(model, x, target, method)  Adebayo et al. 2018 model-parameter randomization: Spearman
                                rank correlation of the trained model's attributions with a re-initialized copy's
    explain_run(run_dir, method, n)   a trained run's first n test examples -> explain/<method>.png + .npz (+ .html)

Why captum: it is the maintained PyTorch attribution library (Saliency, IntegratedGradients, LayerGradCam,
Occlusion, LayerIntegratedGradients). Written here: attention rollout (captum has none; the ViT exposes its
post-softmax maps, `model.attention_maps(x)`), the randomization check (captum has no sanity checks), smoothgrad's
noise (NoiseTunnel draws it batch-wide: chunks would change it) and the plots. Long calls go `batch_size` examples
at a time, each example's result unchanged, with `progress(done, total)` over the examples. Every method runs
the model in eval mode (BatchNorm statistics and dropout fixed: otherwise IG would not be complete) and restores
the caller's mode afterwards.

Image runs are explained in pixel space, the inputs a user sees: the run's deterministic evaluation transform
(normalize) is wrapped in front of the model (`PixelSpaceModel`), so the baseline x0 = 0 is a black image.
"""

from __future__ import annotations

import contextlib
import copy
import html
import inspect
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lamina.errors import ConfigError, DataError, InputShapeError, ModelError, unknown_name

TargetLike = int | torch.Tensor | list[int] | None


# ----- helpers ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode for the duration (fixed BatchNorm statistics, no dropout), the caller's modes restored after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, t in modes.items():
            m.training = t


def _check_x(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
        got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputShapeError(f"x: expected a float tensor of shape (B, ...) (images (B, C, H, W)), got {got}")
    return x.detach()


def _targets(model: nn.Module, x: torch.Tensor, target: TargetLike, forward: Callable | None = None) -> torch.Tensor:
    """(B,) long class ids: `target` broadcast to the batch, or the model's predicted classes for None."""
    B = x.shape[0]
    if target is None:
        with torch.no_grad():
            out = (forward or model)(x)
        return out.argmax(-1).reshape(B)
    t = torch.as_tensor(target, device=x.device).long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(B)
    if t.numel() != B:
        raise InputShapeError(f"target: expected one class id or {B} (one per example), got {t.numel()}")
    return t.contiguous()


def _check_target_range(out: torch.Tensor, target: torch.Tensor) -> None:
    k = out.shape[-1]
    if int(target.min()) < 0 or int(target.max()) >= k:
        raise DataError(f"target: class ids must be in [0, {k - 1}], got {target.tolist()}")


def _sum_but_batch(a: torch.Tensor) -> torch.Tensor:
    return a.reshape(a.shape[0], -1).sum(1)


def _spans(n: int, batch_size: int | None, progress: Callable[[int, int], None] | None):
    """(start, stop) of each chunk of `batch_size` examples (None: one chunk of all n); `progress(done, total)`
    counts the examples done: at 0, then after each chunk."""
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1):
        raise ConfigError(f"batch_size: expected a positive integer, got {batch_size!r}")
    step = int(batch_size) if batch_size is not None else max(n, 1)
    if progress is not None:
        progress(0, n)
    for start in range(0, n, step):
        stop = min(start + step, n)
        yield start, stop
        if progress is not None:
            progress(stop, n)


# ----- attribution methods ---------------------------------------------------------------------
def _saliency(model, x, target, abs: bool = True) -> torch.Tensor:
    from captum.attr import Saliency

    return Saliency(model).attribute(x, target=target, abs=abs)


def _baseline(x: torch.Tensor, baseline) -> torch.Tensor:
    if baseline is None:
        return torch.zeros_like(x)  # black image in pixel space; the usual IG baseline
    b = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    try:
        return b.expand_as(x).contiguous()
    except RuntimeError:
        raise InputShapeError(f"baseline: shape {tuple(b.shape)} does not broadcast to x's {tuple(x.shape)}") from None


def _integrated_gradients(model, x, target, baseline=None, n_steps: int = 64, method: str = "gausslegendre",
                          internal_batch_size: int | None = 512) -> torch.Tensor:
    from captum.attr import IntegratedGradients

    if int(n_steps) < 1:
        raise ConfigError(f"n_steps: expected a positive integer, got {n_steps}")
    return IntegratedGradients(model).attribute(x, baselines=_baseline(x, baseline), target=target,
                                                n_steps=int(n_steps), method=method,
                                                internal_batch_size=internal_batch_size)


def _smoothgrad(model, x, target, n_samples: int = 25, noise: float = 0.15, abs: bool = True,
                seed: int = 0) -> torch.Tensor:
    """Mean saliency over n_samples copies of each x_i + N(0, (noise * (max x_i - min x_i))^2), the noise level
    relative to each example's range (Smilkov et al.). Example i's noise comes from its own generator seeded
    seed + i (the global RNG untouched): an example gets the same noise whatever batch it is in, so attribute's
    chunks (batch_size) change nothing. Why not captum's NoiseTunnel: it draws one noise tensor for the whole
    batch from the global RNG, so a chunked call would draw different noise."""
    from captum.attr import Saliency

    if int(n_samples) < 1 or noise < 0:
        raise ConfigError(f"smoothgrad: expected n_samples >= 1 and noise >= 0, got {n_samples}, {noise}")
    B, S, rest = x.shape[0], int(n_samples), tuple(x.shape[1:])
    flat = x.detach().reshape(B, -1).float()
    sigma = float(noise) * (flat.max(1).values - flat.min(1).values)
    sigma = torch.where(sigma > 0, sigma, torch.full_like(sigma, float(noise)))  # a constant input: noise itself
    eps = torch.stack([torch.randn((S, *rest), generator=torch.Generator().manual_seed(int(seed) + i))
                       for i in range(B)])  # (B, S, ...), drawn on the CPU: the same numbers on any device
    eps = eps * sigma.reshape(B, 1, *([1] * len(rest)))
    noisy = (x.detach().unsqueeze(1) + eps.to(x.device, x.dtype)).reshape(B * S, *rest).requires_grad_()
    grads = Saliency(model).attribute(noisy, target=target.repeat_interleave(S), abs=abs)
    return grads.reshape(B, S, *rest).mean(1)


def conv_layers(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def find_layer(model: nn.Module, layer: str | nn.Module | None = None) -> nn.Module:
    """Grad-CAM's layer: a module, a module name, or (None) the last nn.Conv2d registered in the model."""
    if isinstance(layer, nn.Module):
        return layer
    convs = conv_layers(model)
    if layer is None:
        if not convs:
            name = getattr(model, "model_name", type(model).__name__)
            raise ModelError(f"gradcam needs a model with an nn.Conv2d layer; {name} has none; use saliency, "
                             f"integrated_gradients, smoothgrad or occlusion (or attention_rollout for a ViT)")
        return list(convs.values())[-1]
    mods = dict(model.named_modules())
    for cand in (layer, f"model.{layer}"):  # PixelSpaceModel wraps the model as .model
        if cand in mods:
            return mods[cand]
    raise ConfigError(unknown_name("layer", layer, [n.removeprefix("model.") for n in convs] or ["<no Conv2d>"]))


def _gradcam(model, x, target, layer: str | nn.Module | None = None) -> torch.Tensor:
    from captum.attr import LayerAttribution, LayerGradCam

    if x.ndim != 4:
        raise InputShapeError(f"gradcam: expected images (B, C, H, W), got shape {tuple(x.shape)}")
    cam = LayerGradCam(model, find_layer(model, layer)).attribute(x, target=target, relu_attributions=True)
    if cam.ndim != 4:
        raise ModelError(f"gradcam: the layer's output has shape {tuple(cam.shape)}, expected (B, K, h, w); "
                         f"pick a conv layer with layer=<name>")
    cam = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")  # (B, 1, H, W)
    return cam.clamp_min(0).expand_as(x).contiguous()  # bilinear of non-negative values stays >= 0; clamp fp dust


def _occlusion(model, x, target, window: int | tuple | None = None, stride: int | tuple | None = None,
               baseline: float = 0.0, perturbations_per_eval: int = 64) -> torch.Tensor:
    """Images: a window x window square over all channels (default ~1/7 of the side, >= 2 px), stride window // 2;
    other inputs (B, F, ...): single features."""
    from captum.attr import Occlusion

    if x.ndim == 4:
        C, H, W = x.shape[1:]
        k = window if window is not None else max(2, min(H, W) // 7)
        k = (k, k) if isinstance(k, int) else tuple(k)
        s = stride if stride is not None else (max(1, k[0] // 2), max(1, k[1] // 2))
        s = (s, s) if isinstance(s, int) else tuple(s)
        if min(k) < 1 or min(s) < 1 or k[0] > H or k[1] > W:
            raise ConfigError(f"occlusion: window {k} and stride {s} must be positive and fit the {H}x{W} image")
        shapes, strides = (C, *k), (C, *s)
    else:
        shapes = tuple(window) if window is not None else (1,) * (x.ndim - 1)
        strides = tuple(stride) if stride is not None else (1,) * (x.ndim - 1)
    return Occlusion(model).attribute(x, sliding_window_shapes=shapes, strides=strides, baselines=baseline,
                                      target=target, perturbations_per_eval=perturbations_per_eval)


METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "saliency": _saliency,
    "integrated_gradients": _integrated_gradients,
    "smoothgrad": _smoothgrad,
    "gradcam": _gradcam,
    "occlusion": _occlusion,
}
SIGNED = {"integrated_gradients", "occlusion"}  # may be negative (evidence against); the others are >= 0


def attribute(model: nn.Module, x: torch.Tensor, target: TargetLike = None, method: str = "integrated_gradients",
              batch_size: int | None = None, progress: Callable[[int, int], None] | None = None,
              **kw) -> torch.Tensor:
    """Attributions (same shape as x) of the logit `target` (int, one per example, or None = predicted class)
    of `model` at x by `method` (a key of METHODS); keyword options go to the method (e.g. n_steps=128 for IG,
    layer="stages.1.0.0" for gradcam, window=4 for occlusion, abs=False for saliency). `batch_size`: attribute
    that many examples per call (None: all at once), each example's result unchanged (every method is per
    example; smoothgrad's noise is seeded per example); `progress(done, total)` counts the examples done."""
    if method not in METHODS:
        raise ConfigError(unknown_name("explain method", method, METHODS))
    x = _check_x(x)
    fn = METHODS[method]
    allowed = set(inspect.signature(fn).parameters) - {"model", "x", "target"}
    bad = sorted(set(kw) - allowed)
    if bad:
        raise ConfigError(f"{method}: unknown option '{bad[0]}'; valid: {', '.join(sorted(allowed)) or 'none'}")
    with _eval_mode(model):
        with torch.no_grad():
            out = model(x)
        t = out.argmax(-1) if target is None else _targets(model, x, target)
        _check_target_range(out, t)
        seed = inspect.signature(fn).parameters.get("seed")
        parts = []
        for a, b in _spans(len(x), batch_size, progress):
            # a seeded method numbers its examples from `seed`: a chunk starting at `a` starts at seed + a
            ckw = {**kw, "seed": int(kw.get("seed", seed.default)) + a} if seed is not None else kw
            parts.append(fn(model, x[a:b].clone().requires_grad_(method != "occlusion"), t[a:b], **ckw).detach())
        return torch.cat(parts) if len(parts) != 1 else parts[0] if parts else torch.zeros_like(x)


def completeness_delta(model: nn.Module, x: torch.Tensor, attributions: torch.Tensor, target: TargetLike = None,
                       baseline=None) -> torch.Tensor:
    """(B,) sum(attributions) - (f_t(x) - f_t(x0)): 0 for exact Integrated Gradients (Sundararajan et al. 2017)."""
    x = _check_x(x)
    with _eval_mode(model), torch.no_grad():
        t = _targets(model, x, target)
        fx = model(x).gather(1, t[:, None])[:, 0]
        f0 = model(_baseline(x, baseline)).gather(1, t[:, None])[:, 0]
    return _sum_but_batch(attributions.to(fx.dtype)) - (fx - f0)


# ----- attention rollout -----------------------------------------------------------------------
def rollout_matrix(maps: list[torch.Tensor], residual: bool = True, head_fusion: str = "mean") -> torch.Tensor:
    """Attention maps [(B, nh, T, T)] * L, first block first -> rollout R = A_L ... A_1, (B, T, T), rows summing
    to 1, where A_l = rownorm(0.5 fuse_heads(att_l) + 0.5 I) (just fuse_heads(att_l) with residual=False).
    R[b, i, j]: how much of input token j reaches output token i through attention and skip connections."""
    fusions = {"mean": lambda a: a.mean(1), "max": lambda a: a.amax(1), "min": lambda a: a.amin(1)}
    if head_fusion not in fusions:
        raise ConfigError(unknown_name("head_fusion", head_fusion, fusions))
    if not maps or any(m.ndim != 4 or m.shape[-1] != m.shape[-2] for m in maps):
        raise InputShapeError(f"attention maps: expected a non-empty list of (B, nh, T, T) tensors, got "
                              f"{[tuple(m.shape) for m in maps]}")
    B, _, T, _ = maps[0].shape
    eye = torch.eye(T, dtype=maps[0].dtype, device=maps[0].device)
    R = eye.expand(B, T, T)
    for att in maps:
        a = fusions[head_fusion](att.detach())  # (B, T, T)
        if residual:
            a = 0.5 * a + 0.5 * eye
        a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
        R = a @ R  # later blocks mix what earlier blocks already mixed
    return R


def attention_rollout(model: nn.Module, x: torch.Tensor, residual: bool = True, head_fusion: str = "mean",
                      grid: bool = True) -> torch.Tensor:
    """Attention rollout of a ViT-like model (one with `attention_maps(x)`) at images x -> (B, gh, gw) over the
    patch grid (grid=False: (B, N)). The explained output is the cls token's (row 0 of R, patch columns) or,
    for mean pooling (no prefix token), the mean over the patch tokens' rows: what the head reads."""
    if not callable(getattr(model, "attention_maps", None)):
        name = getattr(model, "model_name", type(model).__name__)
        raise ModelError(f"attention_rollout needs a model with attention maps (attention_maps(x), the vit family); "
                         f"{name} has none; use saliency, integrated_gradients, smoothgrad, gradcam or occlusion")
    x = _check_x(x)
    with _eval_mode(model), torch.no_grad():
        maps = model.attention_maps(x)
    R = rollout_matrix(maps, residual, head_fusion)  # (B, P + N, P + N)
    P = int(getattr(model, "num_prefix_tokens", 0))
    rel = R[:, 0, P:] if P else R[:, P:, P:].mean(1)  # (B, N)
    if not grid:
        return rel
    N = rel.shape[1]
    pe = getattr(model, "patch_embed", None)
    if pe is not None and hasattr(pe, "grid_size"):
        gh, gw = pe.grid_size(x.shape[-2], x.shape[-1])
    else:
        gh = gw = int(round(math.sqrt(N)))
    if gh * gw != N:
        return rel
    return rel.reshape(-1, gh, gw)


def rollout_to_image(rollout: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, gh, gw) rollout -> x's shape (B, C, H, W): each patch's value on its pixels (nearest upsampling)."""
    up = F.interpolate(rollout[:, None].float(), size=tuple(x.shape[-2:]), mode="nearest")  # (B, 1, H, W)
    return up.expand(x.shape[0], x.shape[1], -1, -1).contiguous()


# ----- token attributions ----------------------------------------------------------------------
def embedding_layer(model: nn.Module) -> nn.Embedding:
    """The token-embedding layer: `model.wte` if it is an nn.Embedding, else the first nn.Embedding of the model
    with vocab_size rows."""
    wte = getattr(model, "wte", None)
    if isinstance(wte, nn.Embedding):
        return wte
    vocab = getattr(model, "vocab_size", None)
    embs = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    for m in embs:
        if vocab is None or m.num_embeddings == vocab:
            return m
    name = getattr(model, "model_name", type(model).__name__)
    raise ModelError(f"token attributions need a token model with an nn.Embedding layer; {name} has none")


def _sequence_forward(model: nn.Module) -> Callable:
    """f(ids, mask) -> logits in the model's own padding convention (attention_mask or lengths)."""
    params = inspect.signature(model.forward).parameters
    if "attention_mask" in params:
        return lambda ids, mask: model(ids, attention_mask=mask)
    if "lengths" in params:
        return lambda ids, mask: model(ids, lengths=mask.long().sum(1))
    return lambda ids, mask: model(ids)


def token_attributions(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       target: TargetLike = None, baseline_id: int | None = None, n_steps: int = 64,
                       layer: nn.Module | None = None, keep_ids: tuple[int, ...] = (), return_delta: bool = False,
                       internal_batch_size: int | None = 512, batch_size: int | None = None,
                       progress: Callable[[int, int], None] | None = None):
    """Per-token Integrated Gradients of a sequence classifier: (B, T) scores, the attribution to each token's
    embedding summed over its width. Baseline: every real token replaced by `baseline_id` (default the model's
    pad id, whose embedding is 0), except padding and the ids in `keep_ids` (e.g. the <s> / </s> markers, as
    captum's BERT tutorial keeps [CLS] / [SEP]); those positions get exactly 0. The scores sum to
    f_t(ids) - f_t(baseline ids) (return_delta=True also returns that gap per example). `batch_size` and
    `progress(done, total)`: as `attribute`."""
    from captum.attr import LayerIntegratedGradients

    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point():
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise InputShapeError(f"input_ids: expected integer token ids of shape (B, T), got {got}")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if mask.shape != input_ids.shape:
        raise InputShapeError(f"attention_mask: expected the shape of input_ids {tuple(input_ids.shape)}, "
                              f"got {tuple(mask.shape)}")
    layer = layer or embedding_layer(model)
    if baseline_id is None:
        baseline_id = getattr(layer, "padding_idx", None)
        baseline_id = int(baseline_id) if baseline_id is not None else int(getattr(getattr(model, "cfg", None),
                                                                                      "pad_id", 0))
    fwd = _sequence_forward(model)
    replace = mask & ~torch.isin(input_ids, torch.as_tensor(list(keep_ids), dtype=input_ids.dtype,
                                                            device=input_ids.device))
    base = torch.where(replace, torch.full_like(input_ids, baseline_id), input_ids)
    with _eval_mode(model):
        with torch.no_grad():
            out = fwd(input_ids, mask)
        t = out.argmax(-1) if target is None else _targets(model, input_ids.float(), target)
        _check_target_range(out, t)
        lig = LayerIntegratedGradients(fwd, layer)
        scores, deltas = [], []
        for a, b in _spans(len(input_ids), batch_size, progress):
            ids_c, base_c, mask_c, t_c = input_ids[a:b], base[a:b], mask[a:b], t[a:b]
            attr = lig.attribute(ids_c, baselines=base_c, target=t_c, additional_forward_args=(mask_c,),
                                 n_steps=int(n_steps), internal_batch_size=internal_batch_size)  # (b, T, C)
            scores.append(attr.sum(-1).detach() * mask_c)  # exactly 0 on padding (x == x0 there already)
            if return_delta:
                with torch.no_grad():
                    f1 = fwd(ids_c, mask_c).gather(1, t_c[:, None])[:, 0]
                    f0 = fwd(base_c, mask_c).gather(1, t_c[:, None])[:, 0]
                deltas.append(scores[-1].sum(1) - (f1 - f0))
    scores = torch.cat(scores)
    return (scores, torch.cat(deltas)) if return_delta else scores


def render_tokens_html(tokens: list[str], scores, title: str = "") -> str:
    """One line of tokens, each with a background: red for positive evidence, blue for negative, alpha ~ |score|."""
    s = np.asarray(scores, dtype=np.float64)
    m = float(np.abs(s).max()) or 1.0
    spans = []
    for tok, v in zip(tokens, s):
        a = abs(v) / m
        rgb = "220,40,40" if v >= 0 else "40,90,220"
        spans.append(f'<span title="{v:+.4g}" style="background:rgba({rgb},{a:.2f});padding:1px 2px;'
                     f'border-radius:2px">{html.escape(tok)}</span>')
    head = f"<div><b>{html.escape(title)}</b></div>" if title else ""
    return f'{head}<div style="font-family:monospace;line-height:1.9;margin-bottom:10px">{"".join(spans)}</div>'


def plot_token_bars(rows: list[tuple[list[str], np.ndarray, str]], path: str | Path, title: str = "",
                    max_tokens: int = 60) -> Path:
    """One bar panel per example: a score per token or feature (first max_tokens), red positive, blue negative."""
    from lamina.plots import plt, save_figure

    fig, axes = plt.subplots(len(rows), 1, figsize=(min(20, 2 + 0.22 * max_tokens), 2.2 * len(rows)), squeeze=False)
    for ax, (tokens, scores, label) in zip(axes[:, 0], rows):
        tokens, scores = tokens[:max_tokens], np.asarray(scores[:max_tokens])
        ax.bar(range(len(scores)), scores, color=["tab:red" if v >= 0 else "tab:blue" for v in scores])
        ax.set_xticks(range(len(tokens)), [t.replace("\n", "\\n") for t in tokens], rotation=90, fontsize=7)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path, title)


# ----- image overlays --------------------------------------------------------------------------
def plot_overlays(x: torch.Tensor, attributions: torch.Tensor, path: str | Path, titles: list[str] | None = None,
                  signed: bool = True, title: str = "", alpha: float = 0.8, cols: int = 8) -> Path:
    """Grid of overlays: each input in gray (channels averaged) under its attribution map (channels summed),
    scaled per image: signed maps by their largest |value|, red (+) / blue (-); unsigned maps min-max, 'jet';
    the overlay's opacity grows with |value|, so the input shows through where the attribution is small."""
    from lamina.plots import plt, save_figure

    x = x.detach().float().cpu()
    a = attributions.detach().float().cpu()
    if x.ndim == 3:
        x = x[:, None]
    if a.ndim == 3:
        a = a[:, None]
    img = x.mean(1).numpy()  # (B, H, W)
    heat = a.sum(1).numpy()  # (B, H, W)
    B = img.shape[0]
    cols = max(1, min(cols, B))
    rows = math.ceil(B / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.1 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= B:
            continue
        g = img[i]
        g = (g - g.min()) / (np.ptp(g) or 1.0)
        ax.imshow(g, cmap="gray", vmin=0, vmax=1)
        if signed:
            h = heat[i] / (float(np.abs(heat[i]).max()) or 1.0)  # [-1, 1], 0 stays 0
        else:
            h = (heat[i] - heat[i].min()) / (float(np.ptp(heat[i])) or 1.0)  # [0, 1]: rollout has a large floor
        rgba = plt.get_cmap("bwr" if signed else "jet")((h + 1) / 2 if signed else h)
        rgba[..., 3] = alpha * np.clip(np.abs(h), 0, 1) ** 0.7  # opaque where it matters, the digit shows elsewhere
        ax.imshow(rgba)
        if titles:
            ax.set_title(titles[i], fontsize=8)
    return save_figure(fig, path, title)


# ----- sanity check: model-parameter randomization ---------------------------------------------
def _has_own_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False))


def parameter_layers(model: nn.Module) -> list[str]:
    """Names of the modules that own parameters, in registration order (input side first, roughly)."""
    return [n for n, m in model.named_modules() if _has_own_params(m)]


@torch.no_grad()
def randomize_weights(model: nn.Module, layers: list[str] | None = None, seed: int = 0) -> nn.Module:
    """A deep copy of `model` with the parameters of `layers` (module names; None = every module) re-drawn:
    the module's own reset_parameters() (PyTorch's default init; BatchNorm also resets its running statistics),
    or, for a module without one (a ViT's pos_embed, cls_token), N(0, std of the trained tensor or 0.02).
    The original model is not touched."""
    new = copy.deepcopy(model)
    mods = dict(new.named_modules())
    names = parameter_layers(new) if layers is None else layers
    unknown = [n for n in names if n not in mods]
    if unknown:
        raise ConfigError(unknown_name("layer", unknown[0], parameter_layers(new)))
    g = torch.Generator().manual_seed(seed)
    devices = [p.device for p in new.parameters() if p.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for n in names:
            m = mods[n]
            if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
                m.reset_parameters()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                    # BN's reset is weight 1, bias 0: the identity. Adebayo et al. re-draw every weight, so do
                    # we, or a BN-heavy net would keep its trained conv outputs' scale pattern.
                    m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=g).to(m.weight))
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g).to(m.bias))
            else:
                for p in m.parameters(recurse=False):
                    std = float(p.float().std()) if p.numel() > 1 else 0.02
                    p.copy_(torch.randn(p.shape, generator=g).to(p) * (std if std > 0 else 0.02))
    return new


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    a, b = a.detach().double().cpu().reshape(-1).numpy(), b.detach().double().cpu().reshape(-1).numpy()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")  # a constant map (e.g. an all-zero Grad-CAM) has no ranking: undefined, not "low"
    return float(spearmanr(a, b).statistic)


def _per_example(f, a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return [f(a[i], b[i]) for i in range(a.shape[0])]


def randomization_check(model: nn.Module, x: torch.Tensor, target: TargetLike = None,
                        method: str = "integrated_gradients", mode: str = "full", seed: int = 0, **kw) -> dict:
    """Model-parameter randomization test (Adebayo et al. 2018, "Sanity checks for saliency maps").

    mode "full": every parameter re-initialized at once; "cascading": from the output layer backwards, one more
    layer re-initialized per step (one entry per step in "cascade"). Per example, the Spearman rank correlation
    of the trained model's attributions with the randomized copy's, on the signed values ("spearman") and on
    their absolute values ("spearman_abs"), averaged over the examples where it is defined (a constant map has no
    ranking: "n_undefined" counts those; all undefined -> None). A method that explains the model gives low
    correlations; one that only reflects the input (an edge detector) stays high. The target is the trained model's
    (predicted, for None) class for both."""
    if mode not in ("full", "cascading"):
        raise ConfigError(unknown_name("randomization mode", mode, ("full", "cascading")))
    x = _check_x(x)
    with _eval_mode(model), torch.no_grad():
        t = _targets(model, x, target)
    ref = attribute(model, x, t, method, **kw)

    def mean(v: list[float]) -> float | None:
        v = [e for e in v if not math.isnan(e)]
        return float(np.mean(v)) if v else None

    def compare(rand: nn.Module) -> dict:
        a = attribute(rand, x, t, method, **kw)
        s, s_abs = _per_example(_spearman, ref, a), _per_example(_spearman, ref.abs(), a.abs())
        return {"spearman": mean(s), "spearman_abs": mean(s_abs), "n_undefined": sum(math.isnan(e) for e in s),
                "per_example": [None if math.isnan(e) else e for e in s]}

    before = [p.detach().clone() for p in model.parameters()]
    if mode == "full":
        rand = randomize_weights(model, seed=seed)
        changed = [not torch.equal(p0, p1) for p0, p1 in zip(before, rand.parameters())]
        out = {"method": method, "mode": mode, **compare(rand)}
    else:
        layers = parameter_layers(model)[::-1]  # output side first
        cascade = []
        for k in range(1, len(layers) + 1):
            rand = randomize_weights(model, layers[:k], seed=seed)
            cascade.append({"randomized_through": layers[k - 1], **compare(rand)})
        changed = [not torch.equal(p0, p1) for p0, p1 in zip(before, rand.parameters())]
        last = cascade[-1]
        out = {"method": method, "mode": mode, **{k: last[k] for k in ("spearman", "spearman_abs", "n_undefined",
                                                                          "per_example")}, "cascade": cascade}
    out["params_randomized"] = float(np.mean(changed)) if changed else 0.0
    if not all(torch.equal(p0, p) for p0, p in zip(before, model.parameters())):  # never expected
        raise RuntimeError("randomization_check changed the model it checks")
    return out


# ----- a trained run ---------------------------------------------------------------------------
class PixelSpaceModel(nn.Module):
    """model(transform(x)): attributions in the input space a user sees (pixels), not after normalization.
    `transform` is a batch transform (lamina.data.transforms contract: dict -> dict acting on "x") or None."""

    def __init__(self, model: nn.Module, transform: Callable | None = None):
        super().__init__()
        self.model = model
        self.transform = transform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform is not None:
            x = self.transform({"x": x})["x"]
        return self.model(x)


IMAGE_METHODS = (*METHODS, "attention_rollout")
VECTOR_METHODS = ("saliency", "integrated_gradients", "smoothgrad", "occlusion")  # tabular runs: (B, F) inputs


def explain_run(run_dir: str | Path, method: str = "integrated_gradients", n: int = 8, split: str = "test",
                which: str = "best", out: str | Path | None = None, batch_size: int = 32,
                progress: Callable[[int, int], None] | None = None, **method_kw) -> dict:
    """Explain the first n examples of a trained run's `split` (target: the predicted class). Writes
    <run>/explain/<method>.png (overlays, or token bars + <method>.html for text) and <method>.npz (inputs,
    attributions, target, pred, label) into the run folder (or `out`); returns a json-able summary, also saved
    as <method>.json. Image runs: any of IMAGE_METHODS, in pixel space; text (sequence classification) runs:
    token attributions (method integrated_gradients); feature-vector (tabular) runs: VECTOR_METHODS, a bar per
    feature. For IG, the completeness gap |sum attr - (f(x) - f(x0))|. The examples are attributed
    `batch_size` at a time (each example's result as in one call: see `attribute`; it also keeps IG's passes
    within its internal batch), and `progress(done, total)` counts them; then a second phase of one step, the
    figure (hundreds of panels take seconds to lay out and save)."""
    from lamina.data.sample import is_streamed
    from lamina.runs import open_run

    t0 = time.perf_counter()
    if int(n) < 1:
        raise ConfigError(f"n: expected a positive integer, got {n}")
    run = open_run(run_dir, which)
    cfg, model, facts, ckpt = run.cfg, run.model, run.facts, run.checkpoint
    kind = facts.task
    if kind not in ("classification", "sequence_classification"):
        raise DataError(f"explain needs a classification or sequence_classification run; {run_dir} is {kind}")
    text = kind == "sequence_classification"
    valid = ("integrated_gradients",) if text else IMAGE_METHODS  # feature vectors: VECTOR_METHODS, checked below
    if method not in valid:
        what = "text (sequence classification) runs" if text else "this run"
        raise ConfigError(f"{unknown_name('explain method', method, valid)} (for {what})")
    bundle, data = run.data(), run.split(split)
    n = min(int(n), len(data))
    device = run.device
    model = model.to(device).eval()
    root = Path(out) if out is not None else run.folder.path / "explain"
    root.mkdir(parents=True, exist_ok=True)
    names = facts.class_names or None
    labels = data.y[:n].long()
    cname = (lambda c: names[c] if names and c < len(names) else str(c))
    summary = {"run": str(run_dir), "checkpoint": str(ckpt), "method": method, "split": split, "n": n}
    if text:
        summary.update(_explain_text(model, data, n, bundle, root, method, cname, device, batch_size=batch_size,
                                     progress=progress, **method_kw))
    elif (len(bundle.input_shape) == 1 if is_streamed(data) else data.x.ndim == 2):
        if method not in VECTOR_METHODS:
            raise ConfigError(f"{unknown_name('explain method', method, VECTOR_METHODS)} (for feature-vector runs)")
        summary.update(_explain_images(cfg, model, data, n, root, method, cname, device, batch_size, progress,
                                       feature_names=bundle.meta.get("feature_names"), **method_kw))
    else:
        summary.update(_explain_images(cfg, model, data, n, root, method, cname, device, batch_size, progress,
                                       **method_kw))
    for i, e in enumerate(summary["examples"]):
        e["label"] = int(labels[i])
        e["label_name"] = cname(int(labels[i]))
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary["json"] = str(root / f"{method}.json")
    (root / f"{method}.json").write_text(json.dumps(summary, indent=2))
    return summary


def _explain_images(cfg, model, data, n, root: Path, method: str, cname, device, batch_size: int | None = None,
                    progress: Callable[[int, int], None] | None = None, feature_names: list[str] | None = None,
                    **kw) -> dict:
    """Images (B, C, H, W) -> overlays; feature vectors (B, F) (standardized tabular data) -> bars per feature."""
    from lamina.data.sample import first_samples
    from lamina.data.transforms import eval_transforms

    x = first_samples(data, n)["x"].float().to(device)  # only these n are read: a streamed split stays on disk
    if x.ndim not in (2, 4):
        raise DataError(f"explain_run: expected images (B, C, H, W) or feature vectors (B, F); this run's inputs "
                        f"are {tuple(x.shape[1:])} per example")
    pm = PixelSpaceModel(model, eval_transforms(cfg.data.augment) if x.ndim == 4 else None).eval()
    with torch.no_grad():
        probs = pm(x).float().softmax(-1)
    conf, pred = probs.max(-1)
    extra: dict = {}
    if method == "attention_rollout":  # one forward pass for all: a single step
        if progress is not None:
            progress(0, n)
        with torch.no_grad():
            xin = pm.transform({"x": x})["x"] if pm.transform is not None else x
        rollout = attention_rollout(model, xin, **kw)
        if progress is not None:
            progress(n, n)
        if rollout.ndim != 3:
            raise ModelError("attention_rollout: the patch tokens do not form a grid; cannot draw an overlay")
        attr = rollout_to_image(rollout, x)
        extra["rollout"] = rollout.cpu().numpy()
    else:
        attr = attribute(pm, x, pred, method, batch_size=batch_size, progress=progress, **kw)
    summary: dict = {}
    arrays = {"x": x.cpu().numpy(), "attributions": attr.float().cpu().numpy(), "target": pred.cpu().numpy(),
              "pred": pred.cpu().numpy(), "label": data.y[:n].cpu().numpy(), "index": np.arange(n), **extra}
    if method == "integrated_gradients":
        delta = completeness_delta(pm, x, attr, pred, kw.get("baseline")).float().cpu()
        with torch.no_grad():
            diff = (pm(x) - pm(_baseline(x, kw.get("baseline")))).gather(1, pred[:, None])[:, 0].float().cpu()
        arrays["completeness_delta"] = delta.numpy()
        summary["ig_completeness"] = {"mean_abs_delta": float(delta.abs().mean()),
                                      "max_abs_delta": float(delta.abs().max()),
                                      "mean_abs_output_diff": float(diff.abs().mean()),
                                      "mean_rel_delta": float((delta.abs() / diff.abs().clamp_min(1e-8)).mean())}
    np.savez_compressed(root / f"{method}.npz", **arrays)
    y = data.y[:n].tolist()
    titles = [f"y={cname(int(a))} pred={cname(int(p))}" for a, p in zip(y, pred.tolist())]
    title = f"{method} ({getattr(model, 'model_name', type(model).__name__)})"
    if x.ndim == 2:
        names = feature_names if feature_names and len(feature_names) == x.shape[1] else \
            [f"x{j}" for j in range(x.shape[1])]
        rows = [(names, attr[i].float().cpu().numpy(), f"#{i} {titles[i]}") for i in range(n)]
        png = _figure(progress, plot_token_bars, rows, root / f"{method}.png", title)
    else:
        png = _figure(progress, plot_overlays, x, attr, root / f"{method}.png", titles, signed=method in SIGNED,
                      title=title)
    summary.update({"png": str(png), "npz": str(root / f"{method}.npz"),
                    "examples": [{"index": i, "target": int(pred[i]), "pred": int(pred[i]),
                                  "pred_name": cname(int(pred[i])), "confidence": float(conf[i])}
                                 for i in range(n)]})
    return summary


def _figure(progress: Callable[[int, int], None] | None, plot: Callable[..., Path], *args, **kw) -> Path:
    """`plot(*args, **kw)` as a phase of one step: laying out and saving a few hundred panels takes seconds."""
    if progress is not None:
        progress(0, 1)
    png = plot(*args, **kw)
    if progress is not None:
        progress(1, 1)
    return png


_MARKERS = ("<s>", "</s>", "[CLS]", "[SEP]")  # sequence markers: kept in the token-attribution baseline


def _special_names(tok) -> dict[int, str]:
    """id -> name of the tokenizer's special tokens (which decode() drops): lamina's <pad> <unk> <s> </s> <mask>,
    or a pretrained tokenizer's [PAD] [UNK] [CLS] [SEP] [MASK]."""
    from lamina.data.tokenizers import SPECIALS, PretrainedTokenizer

    if tok is None:
        return {}
    if isinstance(tok, PretrainedTokenizer):
        return {getattr(tok, a): n for a, n in (("pad_id", "[PAD]"), ("unk_id", "[UNK]"), ("bos_id", "[CLS]"),
                                                 ("eos_id", "[SEP]"), ("mask_id", "[MASK]"))}
    return dict(enumerate(SPECIALS))


def _token_texts(tok, ids: list[int], specials: dict[int, str]) -> list[str]:
    """Each token's text as it appears in the decoded sequence (decode(ids[:i+1]) minus decode(ids[:i]), so a
    byte-level BPE token keeps its leading space), specials by name; a token of only whitespace is shown quoted."""
    if tok is None:
        return [str(i) for i in ids]
    out, kept, prev = [], [], ""
    for i in ids:
        if i in specials:
            out.append(specials[i])
            continue
        kept.append(i)
        text = tok.decode(kept)
        piece = text[len(prev):] if text.startswith(prev) else tok.decode([i])
        prev = text
        out.append(piece if piece.strip() else repr(piece))
    return out


def _explain_text(model, data, n, bundle, root: Path, method: str, cname, device,
                  progress: Callable[[int, int], None] | None = None, **kw) -> dict:
    ids = data.tensors["ids"][:n]
    if "lengths" in data.tensors:
        lengths = data.tensors["lengths"][:n].long()
    elif "attention_mask" in data.tensors:
        lengths = data.tensors["attention_mask"][:n].long().sum(1)
    else:
        lengths = torch.full((n,), ids.shape[1], dtype=torch.long)
    T = int(lengths.max())
    ids = ids[:, :T].to(device)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)
    fwd = _sequence_forward(model)
    with torch.no_grad():
        probs = fwd(ids, mask).float().softmax(-1)
    conf, pred = probs.max(-1)
    tok = (getattr(bundle, "extras", None) or {}).get("tokenizer")
    specials = _special_names(tok)
    kw.setdefault("keep_ids", tuple(i for i, name in specials.items() if name in _MARKERS))
    scores, delta = token_attributions(model, ids, mask, pred, return_delta=True, progress=progress, **kw)
    rows, blocks = [], []
    for i in range(n):
        L = int(lengths[i])
        row_ids = ids[i, :L].tolist()
        tokens = _token_texts(tok, row_ids, specials)
        label = f"#{i} y={cname(int(data.y[i]))} pred={cname(int(pred[i]))} ({float(conf[i]):.2f})"
        rows.append((tokens, scores[i, :L].cpu().numpy(), label))
        blocks.append(render_tokens_html(tokens, scores[i, :L].cpu().numpy(), label))
    html_path = root / f"{method}.html"
    html_path.write_text("<!doctype html><meta charset='utf-8'><title>token attributions</title>"
                         "<p>Integrated Gradients per token (red: evidence for the predicted class, blue: against)"
                         "</p>" + "\n".join(blocks))
    png = _figure(progress, plot_token_bars, rows, root / f"{method}.png", "token attributions (integrated gradients)")
    np.savez_compressed(root / f"{method}.npz", ids=ids.cpu().numpy(), lengths=lengths.numpy(),
                        attributions=scores.float().cpu().numpy(), target=pred.cpu().numpy(),
                        pred=pred.cpu().numpy(), label=data.y[:n].cpu().numpy(),
                        completeness_delta=delta.float().cpu().numpy())
    return {"png": str(png), "npz": str(root / f"{method}.npz"), "html": str(html_path),
            "ig_completeness": {"mean_abs_delta": float(delta.abs().mean()),
                                "max_abs_delta": float(delta.abs().max())},
            "examples": [{"index": i, "target": int(pred[i]), "pred": int(pred[i]),
                          "pred_name": cname(int(pred[i])), "confidence": float(conf[i]),
                          "top_tokens": [rows[i][0][j] for j in np.argsort(-rows[i][1])[:5].tolist()]}
                         for i in range(n)]}
