"""Scaling-law sweeps: train one model family at several sizes (and data amounts) under a compute rule the user
chooses, then fit the loss as a power law in parameters and tokens.

    sizes = parse_sizes("n_layer=1,n_embd=32,n_head=2; n_layer=2,n_embd=64,n_head=4; ...")   (or a YAML file)
    result = scaling_sweep(cfg, sizes, tokens=[1e6, 4e6], out="runs/shakespeare-scaling")
    fit_size_law(N, L)         L(N) = E + A / N^alpha            (Kaplan et al. 2020, at one data amount)
    fit_chinchilla(N, D, L)    L(N, D) = E + A / N^alpha + B / D^beta   (Hoffmann et al. 2022, all runs jointly)
    fit_pure_power(N, L)       L = A / N^alpha, no floor (a straight line in log-log, for comparison)

The compute rule is explicit: `tokens=[...]` trains every size for each fixed token budget D; `compute=[...]`
gives every size D = C / (6 N) tokens for each FLOP budget C (an IsoFLOP profile per budget). Steps follow from
the tokens: steps = round(D / (batch x block x accumulate)); D recorded is what the run saw (steps x batch x block
x accumulate). Each run's learning-rate schedule is the config's, stretched to end at that run's own last step
(Hoffmann et al.'s finding: a cosine longer than the run overstates the loss of short runs); the warmup is the
config's, capped at a tenth of the run. One evaluation at the end, on the whole validation split (exact, not a
random-batch estimate).

N is the non-embedding parameter count, Kaplan's convention: every parameter except the token and position
embedding tables and the vocabulary projection (`lm_head`, the unembedding; tied to the token table in GPT).
Total parameters are recorded too. C = 6 N D (Kaplan's estimate; it leaves out the attention-score FLOPs,
~ 6 n_layer n_ctx d_model per token, which are not small for tiny models with a 64-token context).

Fitting: scipy.optimize.curve_fit of log L (not L): the residuals are then relative errors, which is what
Hoffmann et al. fit (Huber on log L) and keeps a model with loss 3.5 from outweighing one at 1.6; a small grid of
starting points, since E and alpha trade off and the objective has several basins. The 95% intervals come from
a seeded bootstrap over the runs (resample the points with replacement, refit; percentile interval) and, where
the fit has spare degrees of freedom, from curve_fit's covariance (t quantile). R^2 and residuals are in loss
units. Fewer points than parameters: no fit, and one line saying so.

Resumable: a run finished in the output folder (out/points/<key>.json, keyed by a hash of its full config) is
not trained again; re-running the same command continues where it stopped. Nothing here prints: `progress`
receives one event per run.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lamina.config import RunConfig, read_yaml, to_dict, validate
from lamina.config.io import parse_value
from lamina.config.schema import MODEL_SOURCE_KEYS
from lamina.errors import ConfigError, LaminaError
from lamina.io import atomic_write_text

DEFAULT_BOOTSTRAP = 1000  # resamples: enough for a stable 2.5/97.5 percentile pair
WARMUP_CAP = 0.1  # a run's warmup is at most this fraction of its steps (a 100-step warmup would be a 50-step run)
RESERVED = MODEL_SOURCE_KEYS  # model keys that choose the model, not its size


# ----- sizes and budgets ------------------------------------------------------------------------------------
def size_label(size: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in size.items())


def _size_entry(raw, where: str) -> dict:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: expected a mapping of model options such as {{n_layer: 2, n_embd: 64}}, "
                          f"got {raw!r}")
    out = {}
    for k, v in raw.items():
        key = str(k).strip().removeprefix("model.")
        if not key or "." in key:
            raise ConfigError(f"{where}: '{k}' is not a model option (sizes set model options such as n_layer)")
        if key in RESERVED:
            raise ConfigError(f"{where}: model.{key} picks the model, not its size; set it in the config")
        out[key] = v
    return out


def parse_sizes(spec: str | Path | Sequence[dict]) -> list[dict]:
    """Model-size overrides, one dict per size, from a list of dicts, a YAML file with a `sizes:` list of
    mappings, or an inline spec `n_layer=1,n_embd=32;n_layer=2,n_embd=64` (values parsed as YAML scalars)."""
    if not isinstance(spec, (str, Path)):
        sizes = [_size_entry(s, f"sizes[{i}]") for i, s in enumerate(spec)]
    elif Path(spec).suffix.lower() in (".yaml", ".yml") or Path(spec).is_file():
        raw = read_yaml(spec)
        items = raw.get("sizes")
        if not isinstance(items, list):
            raise ConfigError(f"{spec}: expected a `sizes:` list of mappings, e.g. sizes: [{{n_layer: 1, n_embd: 32}}]")
        sizes = [_size_entry(s, f"{spec}: sizes[{i}]") for i, s in enumerate(items)]
    else:
        sizes = []
        for i, part in enumerate(p for p in str(spec).split(";") if p.strip()):
            entry = {}
            for item in part.split(","):
                if "=" not in item:
                    raise ConfigError(f"sizes: '{item.strip()}' in size {i + 1} is not KEY=VALUE; write sizes as "
                                      "'n_layer=1,n_embd=32;n_layer=2,n_embd=64' or a YAML file")
                k, v = item.split("=", 1)
                entry[k.strip()] = parse_value(v.strip())
            sizes.append(_size_entry(entry, f"sizes: size {i + 1}"))
    if not sizes:
        raise ConfigError("sizes: empty; give at least one model size, e.g. 'n_layer=1,n_embd=32;n_layer=2,n_embd=64'")
    return sizes


@dataclass(frozen=True)
class Budget:
    """One data amount under the sweep's rule: `tokens` (D fixed) or `compute` (C fixed, D = C / 6N)."""

    rule: str
    value: float

    def tokens(self, n_params: int) -> float:
        return self.value if self.rule == "tokens" else self.value / (6.0 * n_params)

    @property
    def symbol(self) -> str:
        return "D" if self.rule == "tokens" else "C"

    @property
    def tag(self) -> str:
        return f"{self.symbol}{self.value:.3g}".replace("+", "")

    def __str__(self) -> str:
        return f"{self.symbol}={self.value:.3g}"


def make_budgets(tokens: Sequence[float] | None = None, compute: Sequence[float] | None = None) -> list[Budget]:
    if (tokens is None) == (compute is None):
        raise ConfigError("budget: choose one compute rule: tokens=[...] (fixed token budgets) or compute=[...] "
                          "(FLOP budgets, D = C / 6N per size)")
    rule, values = ("tokens", tokens) if tokens is not None else ("compute", compute)
    values = list(values)
    if not values:
        raise ConfigError(f"{rule}: empty; give at least one budget, e.g. {rule}=[1e6]")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"{rule}: expected positive budgets, got {v!r}")
    return [Budget(rule, float(v)) for v in sorted(set(float(v) for v in values))]


def steps_for(tokens: float, tokens_per_step: int) -> int:
    """Optimizer steps that see about `tokens` tokens; at least one step's worth of tokens is required."""
    steps = int(round(tokens / tokens_per_step))
    if steps < 1:
        raise ConfigError(f"budget too small: {tokens:.3g} tokens is less than one step of {tokens_per_step} "
                          "tokens (batch x block x accumulate); give a larger budget or a smaller data.batch_size")
    return steps


# ----- parameter counts -------------------------------------------------------------------------------------
def embedding_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Token and position embedding tables and the vocabulary projection (`lm_head`), each tensor once."""
    from lamina.nn import LearnedPositionalEmbedding

    found: dict[int, torch.nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, (torch.nn.Embedding, LearnedPositionalEmbedding)):
            found.update((id(p), p) for p in m.parameters())
    head = getattr(model, "lm_head", None)
    if isinstance(head, torch.nn.Module):
        found.update((id(p), p) for p in head.parameters())
    return list(found.values())


def count_parameters(model: torch.nn.Module) -> dict:
    """{"total", "embedding", "non_embedding"}: tied tensors counted once (model.parameters() dedups)."""
    total = sum(p.numel() for p in model.parameters())
    emb = sum(p.numel() for p in embedding_parameters(model))
    return {"total": total, "embedding": emb, "non_embedding": total - emb}


# ----- fitting ------------------------------------------------------------------------------------------------
def _fit_log(fn, X, L, starts, lower, upper):
    """Least squares of log fn(X, p) against log L from each start; (ssr, params, cov) of the best or None."""
    from scipy.optimize import curve_fit

    logL = np.log(L)
    lo, hi = np.asarray(lower, float), np.asarray(upper, float)
    best = None
    for p0 in starts:
        p0 = np.clip(np.asarray(p0, float), lo + 1e-9, np.where(np.isfinite(hi), hi - 1e-9, np.inf))
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            try:
                p, cov = curve_fit(lambda x, *q: np.log(fn(x, *q)), X, logL, p0=p0, bounds=(lo, hi), maxfev=5000)
            except (RuntimeError, ValueError, FloatingPointError):
                continue
            ssr = float(np.sum((np.log(fn(X, *p)) - logL) ** 2))
        if math.isfinite(ssr) and (best is None or ssr < best[0]):
            best = (ssr, p, cov)
    return best


def _t975(dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


def _fit_report(fn, X, L, starts, lower, upper, names, scale, distinct, bootstrap, seed) -> dict:
    """Fit, covariance and bootstrap intervals; `scale(p)` maps the normalized parameters to the reported ones
    (amplitudes back to raw N and D); `distinct(idx)` says whether a resample still pins every parameter."""
    n, k = len(L), len(names)
    best = _fit_log(fn, X, L, starts, lower, upper)
    if best is None:
        return {"skipped": "the fit did not converge from any starting point"}
    ssr, p, cov = best
    pred = fn(X, *p)
    resid = L - pred
    ss_tot = float(np.sum((L - L.mean()) ** 2))
    out = {"params": dict(zip(names, map(float, scale(p)))), "n_points": n, "dof": n - k,
           "r2": 1.0 - float(np.sum(resid ** 2)) / ss_tot if ss_tot > 0 else None,
           "rmse": float(np.sqrt(np.mean(resid ** 2))), "residuals": [float(r) for r in resid],
           "rmse_log": math.sqrt(ssr / n)}
    at_bound = [nm for nm, v, lo, hi in zip(names, p, lower, upper)
                if v <= lo * (1 + 1e-6) + 1e-9 or v >= hi * (1 - 1e-6)]
    if at_bound:
        out["at_bound"] = at_bound
    exps = [i for i, nm in enumerate(names) if nm in ("alpha", "beta", "E")]
    if n <= k:
        out["note"] = f"{n} points for {k} parameters: an exact fit, no residuals to derive an interval from"
        return out
    if not at_bound and np.all(np.isfinite(np.diag(cov))):  # the linearization means nothing at a bound
        q = _t975(n - k)
        half = {i: q * math.sqrt(cov[i, i]) for i in exps}
        out["ci95_covariance"] = {names[i]: [float(p[i] - half[i]), float(p[i] + half[i])] for i in exps}
    if bootstrap:
        rng = np.random.default_rng(seed)
        draws = []
        for _ in range(int(bootstrap)):
            idx = rng.integers(0, n, n)
            if not distinct(idx):
                continue
            Xb = X[..., idx]
            b = _fit_log(fn, Xb, L[idx], [p], lower, upper)
            if b is not None:
                draws.append(b[1])
        out["bootstrap"] = {"resamples": int(bootstrap), "fitted": len(draws), "seed": seed}
        if len(draws) >= 20:
            d = np.array(draws)
            out["ci95_bootstrap"] = {names[i]: [float(np.percentile(d[:, i], 2.5)), float(np.percentile(d[:, i], 97.5))]
                                     for i in exps}
    return out


def _starts_E(L) -> list[float]:
    return [0.0, 0.5 * float(L.min()), 0.9 * float(L.min())]


def fit_size_law(N: Sequence[float], L: Sequence[float], bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict:
    """L(N) = E + A N^-alpha (Kaplan et al. 2020 with an irreducible floor E). Parameters E, A, alpha (A in raw N
    units); `skipped` with the reason when there are fewer distinct sizes than the 3 parameters."""
    N, L = np.asarray(N, float), np.asarray(L, float)
    if len(set(N.tolist())) < 3:
        return {"skipped": f"L = E + A N^-alpha has 3 parameters; {len(set(N.tolist()))} distinct sizes cannot pin "
                           "them (need at least 3)"}
    N0 = float(np.exp(np.mean(np.log(N))))  # fit in N / N0: A is then a loss at the middle size (well scaled)
    x = N / N0

    def fn(x, E, A, a):
        return E + A * x ** (-a)

    starts = [(E0, max(float(L.mean()) - E0, 1e-3), a0) for E0 in _starts_E(L) for a0 in (0.1, 0.3, 0.7)]
    r = _fit_report(fn, x, L, starts, [0.0, 1e-9, 1e-3], [np.inf, np.inf, 5.0], ["E", "A", "alpha"],
                    lambda p: (p[0], p[1] * N0 ** p[2], p[2]), lambda idx: len(set(idx.tolist())) >= 3,
                    bootstrap, seed)
    r["form"] = "E + A * N^-alpha"
    return r


def fit_chinchilla(N: Sequence[float], D: Sequence[float], L: Sequence[float], bootstrap: int = DEFAULT_BOOTSTRAP,
                   seed: int = 0) -> dict:
    """L(N, D) = E + A N^-alpha + B D^-beta (Hoffmann et al. 2022, approach 3) over every run. Needs at least 5
    points, 3 distinct N and 2 distinct D (with one D, B and E are one constant)."""
    N, D, L = (np.asarray(v, float) for v in (N, D, L))
    nN, nD, pts = len(set(N.tolist())), len(set(D.tolist())), len(set(zip(N.tolist(), D.tolist())))
    if nD < 2 or nN < 3 or pts < 5:
        return {"skipped": f"L = E + A N^-alpha + B D^-beta has 5 parameters; it needs at least 5 distinct runs over "
                           f"3 sizes and 2 data amounts (got {pts} runs, {nN} sizes, {nD} data amounts)"}
    N0, D0 = float(np.exp(np.mean(np.log(N)))), float(np.exp(np.mean(np.log(D))))
    X = np.stack([N / N0, D / D0])

    def fn(X, E, A, a, B, b):
        return E + A * X[0] ** (-a) + B * X[1] ** (-b)

    half = max(float(L.mean()), 1e-3) / 2
    starts = [(E0, max(half - E0 / 2, 1e-3), a0, max(half - E0 / 2, 1e-3), b0)
              for E0 in _starts_E(L) for a0 in (0.2, 0.5) for b0 in (0.2, 0.5)]

    def distinct(idx):
        n_, d_ = N[idx], D[idx]
        pairs = set(zip(n_.tolist(), d_.tolist()))
        return len(set(n_.tolist())) >= 3 and len(set(d_.tolist())) >= 2 and len(pairs) >= 5

    r = _fit_report(fn, X, L, starts, [0.0, 1e-9, 1e-3, 1e-9, 1e-3], [np.inf, np.inf, 5.0, np.inf, 5.0],
                    ["E", "A", "alpha", "B", "beta"],
                    lambda p: (p[0], p[1] * N0 ** p[2], p[2], p[3] * D0 ** p[4], p[4]), distinct, bootstrap, seed)
    r["form"] = "E + A * N^-alpha + B * D^-beta"
    return r


def fit_pure_power(N: Sequence[float], L: Sequence[float], bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict:
    """L = A N^-alpha, no floor (Kaplan et al.'s L(N) form): ordinary least squares of log L on log N, R^2 in log
    space, 95% intervals on alpha from the slope's standard error (t quantile) and from the same bootstrap."""
    N, L = np.asarray(N, float), np.asarray(L, float)
    n = len(set(N.tolist()))
    if n < 2:
        return {"skipped": "L = A N^-alpha needs at least 2 distinct sizes"}
    x, y = np.log(N), np.log(L)
    slope, icpt = np.polyfit(x, y, 1)
    resid = y - (icpt + slope * x)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    out = {"form": "A * N^-alpha", "params": {"A": float(math.exp(icpt)), "alpha": float(-slope)}, "n_points": len(N),
           "r2_log": 1.0 - float(np.sum(resid ** 2)) / ss_tot if ss_tot > 0 else None}
    if len(N) > 2:
        se = math.sqrt(float(np.sum(resid ** 2)) / (len(N) - 2) / float(np.sum((x - x.mean()) ** 2)))
        q = _t975(len(N) - 2)
        out["ci95_ols"] = {"alpha": [float(-slope - q * se), float(-slope + q * se)]}
    if bootstrap and n > 2:
        rng = np.random.default_rng(seed)
        draws = []
        for _ in range(int(bootstrap)):
            idx = rng.integers(0, len(N), len(N))
            if len(set(x[idx].tolist())) >= 2:
                draws.append(-np.polyfit(x[idx], y[idx], 1)[0])
        out["bootstrap"] = {"resamples": int(bootstrap), "fitted": len(draws), "seed": seed}
        if len(draws) >= 20:
            out["ci95_bootstrap"] = {"alpha": [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]}
    return out


def predict(fit: dict, N, D=None):
    """The fitted loss at N (and D for the joint form)."""
    p = fit["params"]
    N = np.asarray(N, float)
    if "B" in p:
        return p["E"] + p["A"] * N ** -p["alpha"] + p["B"] * np.asarray(D, float) ** -p["beta"]
    if "E" in p:
        return p["E"] + p["A"] * N ** -p["alpha"]
    return p["A"] * N ** -p["alpha"]


# ----- the sweep --------------------------------------------------------------------------------------------
@dataclass
class PlannedRun:
    size: dict
    budget: Budget
    cfg: RunConfig
    params: dict
    steps: int
    tokens: int
    key: str

    @property
    def label(self) -> str:
        return size_label(self.size)


def _config_key(run: dict) -> str:
    """Hash of everything that shapes the result (not the folder it lands in, nor the progress bar)."""
    d = {k: v for k, v in run.items() if k not in ("name", "logging")}
    d["trainer"] = {k: v for k, v in d["trainer"].items() if k != "progress"}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _slug(size: dict) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "", "_".join(f"{k}{v}" for k, v in size.items()))[:60] or "size"


def plan_sweep(cfg: RunConfig, sizes: Sequence[dict], budgets: Sequence[Budget]) -> list[PlannedRun]:
    """Every (size, budget) run's config, parameter counts and steps, all checked before anything trains."""
    from lamina.runs import build_run_model, data_facts, load_data, task_class

    if not sizes:
        raise ConfigError("sizes: empty; give at least one model size")
    if cfg.model.pretrained:
        raise ConfigError("model.pretrained: a scaling sweep trains each size from scratch; remove model.pretrained")
    if cfg.schedule.name == "step":
        raise ConfigError("schedule.name: step decays by epochs, not by the run's length; use cosine, linear, "
                          "onecycle or constant for a scaling sweep")
    bundle = load_data(cfg)
    task_cls = task_class(cfg, bundle)
    facts = data_facts(bundle, task_cls)
    block = facts.meta.get("block_size") if facts.task == "language_modeling" else None
    if not block:
        raise ConfigError(f"data.name: a scaling sweep counts tokens (steps x batch x block); data set "
                          f"'{cfg.data.name}' is {facts.task}, not a token stream; use a language-model data set")
    tokens_per_step = cfg.data.batch_size * int(block) * cfg.trainer.accumulate
    base = to_dict(cfg)
    plans, checked = [], []
    for i, size in enumerate(sizes):
        raw = json.loads(json.dumps(base))
        raw["model"].update(size)
        try:
            probe = validate(raw)
            with torch.device("meta"):  # shapes only: no memory, no init time
                counts = count_parameters(build_run_model(probe, facts))
        except LaminaError as e:
            raise type(e)(f"size {i + 1} ({size_label(size)}): {e.args[0]}") from None
        if counts["non_embedding"] < 1:
            raise ConfigError(f"size {i + 1} ({size_label(size)}): no parameters outside the embeddings")
        checked.append((size, raw, counts))
    for b in budgets:  # budget by budget: a sweep stopped half-way already holds whole curves in N
        for size, raw, counts in checked:
            try:
                steps = steps_for(b.tokens(counts["non_embedding"]), tokens_per_step)
            except ConfigError as e:
                raise ConfigError(f"{b} for size {size_label(size)}: {e.args[0]}") from None
            run = json.loads(json.dumps(raw))
            run["trainer"].update(max_steps=steps, max_epochs=1, val_every=1, progress=False)
            run["trainer"]["early_stopping"]["patience"] = None
            run["data"]["steps_per_epoch"] = steps * cfg.trainer.accumulate  # one epoch = the whole run
            run["schedule"]["warmup_steps"] = min(run["schedule"]["warmup_steps"], int(WARMUP_CAP * steps))
            run["logging"].update(tensorboard=False, plots=False)
            key = _config_key(run)
            run["name"] = f"{_slug(size)}-{b.tag}-{key[:8]}"
            plans.append(PlannedRun(size, b, validate(run), counts, steps, steps * tokens_per_step, key))
    return plans


def _point(p: PlannedRun, res, seconds: float) -> dict:
    s = res.summary
    final = s.get("final") or {}
    n = p.params["non_embedding"]
    return {"key": p.key, "size": p.size, "label": p.label, "rule": p.budget.rule, "budget": p.budget.value,
            "N": n, "N_total": p.params["total"], "N_embedding": p.params["embedding"],
            "steps": s["steps"], "D": p.tokens, "C": 6.0 * n * p.tokens,
            "val_loss": final.get("val/loss"), "val_ppl": final.get("val/ppl"), "train_loss": final.get("train/loss"),
            "seconds": seconds, "train_seconds": s.get("train_time_s"), "run_dir": str(s["run_dir"])}


def scaling_sweep(cfg: RunConfig, sizes: Sequence[dict], *, tokens: Sequence[float] | None = None,
                  compute: Sequence[float] | None = None, out: str | Path | None = None,
                  bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                  progress: Callable[[dict], None] | None = None) -> dict:
    """Train `cfg` at every size under every budget (skipping runs already finished in `out`), fit, and write
    out/scaling.json and out/scaling.png. `progress(event)` gets {"phase": "start" | "done", "index", "total",
    "label", "budget", ...the point on "done", "resumed": bool}. Returns the scaling.json content plus "out"."""
    from lamina.runs import train

    budgets = make_budgets(tokens, compute)
    sizes = parse_sizes(sizes)
    out = Path(out or Path(cfg.logging.root) / f"{cfg.name or cfg.data.name}-scaling")
    cfg = cfg.model_copy(deep=True)
    cfg.logging.root = str(out / "runs")
    plans = plan_sweep(cfg, sizes, budgets)
    points_dir = out / "points"
    points_dir.mkdir(parents=True, exist_ok=True)
    points = []
    for i, p in enumerate(plans):
        record = points_dir / f"{p.key}.json"
        event = {"index": i, "total": len(plans), "label": p.label, "budget": str(p.budget),
                 "N": p.params["non_embedding"], "D": p.tokens, "steps": p.steps}
        if record.is_file():
            try:
                pt = json.loads(record.read_text())
            except (OSError, ValueError):
                pt = None
            if isinstance(pt, dict) and pt.get("key") == p.key and pt.get("val_loss") is not None:
                points.append(pt)
                if progress:
                    progress({**pt, **event, "phase": "done", "resumed": True})
                continue
        if progress:
            progress({**event, "phase": "start"})
        run_dir = Path(p.cfg.logging.root) / p.cfg.name
        if run_dir.exists():  # a run of this sweep that stopped before its record was written: start it over
            shutil.rmtree(run_dir)
        t0 = time.perf_counter()
        res = train(p.cfg, run_dir=run_dir)
        pt = _point(p, res, time.perf_counter() - t0)
        atomic_write_text(record, json.dumps(pt, indent=2))
        points.append(pt)
        if progress:
            progress({**pt, **event, "phase": "done", "resumed": False})
    result = {"model": cfg.model.name, "data": cfg.data.name, "rule": budgets[0].rule,
              "budgets": [b.value for b in budgets], "sizes": [dict(s) for s in sizes],
              "tokens_per_step": plans[0].tokens // plans[0].steps, "batch_size": cfg.data.batch_size,
              "accumulate": cfg.trainer.accumulate, "schedule": cfg.schedule.name,
              "n_convention": "non-embedding parameters (Kaplan et al. 2020); C = 6 N D",
              "points": points, "fits": fit_sweep(points, budgets[0].rule, bootstrap, seed),
              "bootstrap_seed": seed}
    atomic_write_text(out / "scaling.json", json.dumps(result, indent=2))
    plot_scaling(result, out / "scaling.png", title=f"{cfg.data.name} / {cfg.model.name}: scaling")
    result["out"] = str(out)
    return result


def fit_sweep(points: list[dict], rule: str, bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict:
    """Per budget: L(N) (fixed-token budgets) or the lowest-loss size (compute budgets: IsoFLOP profiles, where D
    falls as N grows, so E + A N^-alpha does not apply); over every run: the joint Chinchilla form."""
    pts = [p for p in points if p.get("val_loss") is not None and math.isfinite(p["val_loss"])]
    per = []
    for budget in sorted({p["budget"] for p in pts}):
        group = sorted((p for p in pts if p["budget"] == budget), key=lambda p: p["N"])
        N, L = [p["N"] for p in group], [p["val_loss"] for p in group]
        best = min(group, key=lambda p: p["val_loss"])
        row = {"budget": budget, "n_points": len(group), "best": {"N": best["N"], "D": best["D"],
                                                                  "val_loss": best["val_loss"], "label": best["label"]}}
        if rule == "tokens":
            row["size_law"] = fit_size_law(N, L, bootstrap, seed)
            row["pure_power"] = fit_pure_power(N, L, bootstrap, seed)
        else:
            row["size_law"] = {"skipped": "a compute budget is an IsoFLOP profile (D = C / 6N falls as N grows), not "
                                          "L(N) at fixed data; see the joint fit"}
        per.append(row)
    joint = fit_chinchilla([p["N"] for p in pts], [p["D"] for p in pts], [p["val_loss"] for p in pts],
                           bootstrap, seed)
    return {"per_budget": per, "joint": joint}


# ----- plot -------------------------------------------------------------------------------------------------
def plot_scaling(result: dict, path: str | Path, title: str = "") -> Path:
    """Log-log loss vs N, one colour per budget, with the fitted curves; with several budgets a second panel:
    loss vs D (token budgets) or vs C (compute budgets), one line per size, with the joint fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    from lamina.plots import save_figure

    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 2.2, not 2.2 x 10^0, on a log axis spanning less than a decade

    def finish(a, xlabel, legend_at):
        a.set_xscale("log")
        a.set_yscale("log")
        a.yaxis.set_major_formatter(plain)
        a.yaxis.set_minor_formatter(plain)
        a.set_xlabel(xlabel)
        a.set_ylabel("validation loss (nats/token)")
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=8, loc=legend_at)  # losses fall to the right: the upper right corner is free

    pts, fits, rule = result["points"], result["fits"], result["rule"]
    budgets = sorted({p["budget"] for p in pts})
    joint = fits.get("joint", {})
    has_joint = "params" in joint
    two = len(budgets) > 1
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(11 if two else 5.8, 4.2), squeeze=False)
    ax = axes[0][0]
    colours = plt.cm.viridis(np.linspace(0.05, 0.85, max(len(budgets), 1)))
    sym = "D" if rule == "tokens" else "C"
    allN = [p["N"] for p in pts]
    grid = np.geomspace(min(allN) / 1.3, max(allN) * 1.3, 80) if allN else np.array([])
    for colour, budget in zip(colours, budgets):
        group = sorted((p for p in pts if p["budget"] == budget), key=lambda p: p["N"])
        fit = next((f["size_law"] for f in fits.get("per_budget", []) if f["budget"] == budget), {})
        label = f"{sym} = {budget:.3g}"
        ax.plot([p["N"] for p in group], [p["val_loss"] for p in group], "o", color=colour)
        if "params" in fit:
            q = fit["params"]
            label += f": {q['E']:.2f} + {q['A']:.3g} N^-{q['alpha']:.3f}"
            ax.plot(grid, predict(fit, grid), "-", color=colour, lw=1.2)
        elif has_joint:  # the joint fit along this budget's line: fixed D, or D = C / 6N
            D = np.full_like(grid, group[0]["D"]) if rule == "tokens" else budget / (6 * grid)
            ax.plot(grid, predict(joint, grid, D), "--", color=colour, lw=1.0)
        ax.plot([], [], "o-" if "params" in fit else "o", color=colour, label=label)  # one legend entry per budget
    finish(ax, "non-embedding parameters N", "best")
    if two:  # token budgets: loss vs D per size; compute budgets: loss vs C per size (the frontier's view)
        ax2 = axes[0][1]
        xkey = "D" if rule == "tokens" else "C"
        labels = sorted({p["label"] for p in pts}, key=lambda lb: next(p["N"] for p in pts if p["label"] == lb))
        cs = plt.cm.plasma(np.linspace(0.05, 0.85, max(len(labels), 1)))
        for colour, lb in zip(cs, labels):
            group = sorted((p for p in pts if p["label"] == lb), key=lambda p: p[xkey])
            n = group[0]["N"]
            ax2.plot([p[xkey] for p in group], [p["val_loss"] for p in group], "o-", color=colour, ms=4,
                     label=f"N = {n:,}")
            if has_joint:
                xs = np.geomspace(group[0][xkey] / 1.3, group[-1][xkey] * 1.3, 40)
                D = xs if rule == "tokens" else xs / (6 * n)
                ax2.plot(xs, predict(joint, np.full_like(xs, n), D), ":", color=colour, lw=1.0)
        if has_joint:
            q = joint["params"]
            ax2.set_title(f"joint fit (dotted): {q['E']:.2f} + {q['A']:.3g}/N^{q['alpha']:.3f} + "
                          f"{q['B']:.3g}/D^{q['beta']:.3f}", fontsize=9)
        finish(ax2, "training tokens D" if rule == "tokens" else "training compute C = 6ND (FLOPs)", "upper right")
        ticks = sorted({p[xkey] for p in pts}) if rule == "tokens" else budgets
        if len(ticks) <= 8:  # within a decade or two, label the budgets themselves
            ax2.set_xticks(ticks, [f"{t:.2g}" for t in ticks])
            ax2.xaxis.set_minor_formatter(NullFormatter())
    return save_figure(fig, path, title)
