"""What a run cost: wall time, energy and CO2e around training, and the model's FLOPs. `runs.train` uses it:

    meter = CostMeter(cfg.cost, dist)        in prepare: CodeCarbon probes the hardware in a thread while data loads
    meter.count_flops(model, task, ...)      in fit, before training: one eval forward, one train forward/backward
    with meter.tracking(): trainer.fit(...)  CodeCarbon's offline tracker around fit, on rank 0 only
    summary["cost"] = meter.result(samples_seen, wall_time_s, resumed)

Energy is CodeCarbon's (`OfflineEmissionsTracker`: no network, nothing written; the grid's CO2e per kWh of
`cost.country`). CodeCarbon reads a power counter where the machine has one and otherwise fills in a model, so
every figure is marked: CPU energy from RAPL / Intel Power Gadget / powermetrics / Windows EMI counters is
"measured", from a TDP times load (or a constant) model "estimated"; GPU energy from the driver (NVML, AMD SMI) is
"measured"; RAM energy is always a model, "estimated". The run's total is "measured", "estimated" or "mixed",
with one line saying which part is which. A single process tracks itself (`tracking_mode="process"`: on a shared
machine another user's load is not billed to the run); under torchrun rank 0 tracks its whole node (every local
rank), not other nodes. Why CodeCarbon: it knows the power interfaces of CPUs and GPUs and the grid intensities
of ~200 countries; a well-kept library fits here. It is optional (`pip install "lamina[cost]"`): without it the
run trains and the summary says energy was not measured and why.

FLOPs are `torch.utils.flop_counter.FlopCounterMode`'s: 2 per multiply-add of matmuls, convolutions and
attention; elementwise ops, norms and the optimizer are not counted. Forward FLOPs per sample: one validation
batch in eval mode, without gradients. Training FLOPs per sample: one training batch's forward + loss + backward
(gradients of the trainable parameters, as a training step computes them; an objective's extra passes, such as
attack steps or a teacher's forward, included), in train mode; training FLOPs = that x the samples seen over
all ranks. The batches are this rank's share of a global batch, on the training device, taken before training
with the model's weights, .grad, buffers (BatchNorm statistics), train/eval mode, the RNG and the loaders' state
left as they were: the run trains exactly as it would without the count.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping

import torch

from lamina.config.schema import CostConfig

INSTALL_HINT = 'pip install "lamina[cost]"'
FLOP_METHOD = ("torch.utils.flop_counter.FlopCounterMode (2 FLOPs per multiply-add of matmuls, convolutions, "
               "attention): forward = one validation batch in eval mode; training = one training batch's forward + "
               "loss + backward in train mode, per sample, x samples seen on all ranks; counted before training "
               "with weights, grads, buffers, RNG and loader state restored")
EVAL_SAMPLES = 256  # forward FLOPs are per sample: a few hundred samples give the same figure as a 1024-batch
PROBE_TIMEOUT_S = 60.0  # CodeCarbon's hardware probe normally takes ~1-2 s (CPU model, TDP table, NVML)
MEASURED_CPU_MODES = {"intel_rapl": "RAPL counters", "intel_power_gadget": "Intel Power Gadget",
                      "powermetrics": "powermetrics", "windows_emi": "Windows energy meter"}


# ----- FLOPs -------------------------------------------------------------------------------------------
def batch_size(batch: Mapping) -> int:
    """Samples in a dict batch (the Trainer's rule: len of y, else of the first tensor)."""
    return len(batch["y"]) if "y" in batch else len(next(iter(batch.values())))


def _head(batch: Mapping, n: int) -> dict:
    """The first n samples of a batch (tensors whose first dimension is the batch's)."""
    b = batch_size(batch)
    if n >= b:
        return dict(batch)
    return {k: v[:n] if isinstance(v, torch.Tensor) and v.ndim and len(v) == b else v for k, v in batch.items()}


def _to(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _rng_devices(device: torch.device) -> list[int]:
    return [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []


def peek_batch(loader) -> dict | None:
    """The loader's first batch, with the loader's own generator and the global RNG as they were (a shuffled
    loader draws its epoch's order from them): the run's data order does not change."""
    state = loader.state_dict() if hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict") else None
    gen = getattr(loader, "generator", None)
    gen_state = gen.get_state() if isinstance(gen, torch.Generator) else None
    try:
        with torch.random.fork_rng(devices=[]):
            it = iter(loader)
            batch = next(it, None)
            del it  # a DataLoader's workers stop here
        return batch
    finally:
        if state is not None:
            loader.load_state_dict(state)
        if gen_state is not None:
            gen.set_state(gen_state)


def flops_per_sample(model: torch.nn.Module, task, batch: Mapping, *, train: bool, autocast=None) -> float:
    """FLOPs of one pass over `batch` divided by its size. train=False: `task.forward` in eval mode without
    gradients. train=True: `task.forward` + `task.loss` + the gradients of every trainable parameter
    (`torch.autograd.grad`, so no `.grad` is written) in train mode. The weights, `.grad`, every buffer
    (BatchNorm running statistics and counts), train/eval mode and the RNG (dropout) are left as found."""
    from torch.utils.flop_counter import FlopCounterMode

    n = batch_size(batch)
    was_training = model.training
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    try:
        with torch.random.fork_rng(devices=_rng_devices(device)), FlopCounterMode(display=False) as counter:
            model.train(train)
            with torch.set_grad_enabled(train), (autocast() if autocast else contextlib.nullcontext()):
                outputs = task.forward(model, batch)
                loss = task.loss(outputs, batch) if train else None
            if train:
                params = [p for p in model.parameters() if p.requires_grad]
                if params and loss.requires_grad:
                    torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)
    return counter.get_total_flops() / max(n, 1)


# ----- energy ------------------------------------------------------------------------------------------
def _silence() -> None:
    """CodeCarbon prints INFO/WARNING lines to stderr (its tracker sets its logger's level on construction) and
    may warn: both off, for CodeCarbon only. Process-wide and kept: its scheduler threads log during training."""
    import warnings

    logging.getLogger("codecarbon").setLevel(logging.CRITICAL + 1)
    warnings.filterwarnings("ignore", module=r"codecarbon(\.|$)")


def _physical_gpu(device: torch.device) -> list | None:
    """NVML's id of the run's one GPU (CUDA_VISIBLE_DEVICES maps torch's index to it); None: every visible GPU."""
    if device.type != "cuda":
        return None
    index = device.index or 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible:
        return [int(visible[index])] if index < len(visible) and visible[index].isdigit() else None
    return [index]


def _new_tracker(country: str, tracking_mode: str, gpu_ids, output_dir: str):
    """(tracker, None) or (None, why not). Keyword arguments this CodeCarbon version lacks are left out."""
    try:
        from codecarbon import OfflineEmissionsTracker
        from codecarbon.emissions_tracker import BaseEmissionsTracker
    except ImportError:
        return None, f"codecarbon is not installed: {INSTALL_HINT}"
    accepted = set(inspect.signature(OfflineEmissionsTracker.__init__).parameters)
    accepted |= set(inspect.signature(BaseEmissionsTracker.__init__).parameters)
    kwargs = {"country_iso_code": country, "log_level": "error", "tracking_mode": tracking_mode,
              "measure_power_secs": 15, "allow_multiple_runs": True, "output_dir": output_dir,
              "project_name": "lamina", "gpu_ids": gpu_ids}
    if "output_methods" in accepted:
        kwargs["output_methods"] = []  # CodeCarbon >= 3: no CSV, API, logger or Prometheus output
    else:
        kwargs["save_to_file"] = False
    if gpu_ids is None:
        kwargs.pop("gpu_ids")
    _silence()
    try:
        tracker = OfflineEmissionsTracker(**{k: v for k, v in kwargs.items() if k in accepted})
        _silence()
        probe = getattr(tracker, "get_detected_hardware", None)
        if probe is not None:
            probe()  # CPU model, TDP table, NVML: the slow part of start(), done here in the probe thread
    except Exception as e:  # noqa: BLE001 - a tracker that cannot start costs the run its energy figure only
        return None, f"codecarbon could not start ({type(e).__name__}: {e})"
    return tracker, None


def _component_sources(tracker, data, tracking_mode: str) -> dict:
    """{"cpu"|"gpu"|"ram": {"kwh", "power_w", "source", "method"}} from the tracker's hardware objects."""
    linux = sys.platform.startswith("linux")
    found: dict[str, list[tuple[str, str]]] = {}
    for hw in getattr(tracker, "_hardware", []):
        kind = type(hw).__name__
        if kind == "CPU":
            mode = getattr(hw, "_mode", "")
            if mode in MEASURED_CPU_MODES:
                found.setdefault("cpu", []).append(("measured", MEASURED_CPU_MODES[mode]))
                continue
            tdp = getattr(hw, "_tdp", None)
            tdp = f"{tdp:g} W TDP" if isinstance(tdp, (int, float)) else "TDP"
            counter = "no RAPL" if linux else "no power counter"
            what = ("this process's load" if tracking_mode == "process" else "machine load")
            how = f"{tdp} x {what}" if mode == "cpu_load" else f"constant share of {tdp}"
            found.setdefault("cpu", []).append(("estimated", f"{how} ({counter})"))
        elif kind == "GPU":
            found.setdefault("gpu", []).append(("measured", "driver power/energy counters (NVML / AMD SMI)"))
        elif kind == "RAM":
            watts = getattr(data, "ram_power", None)
            w = f"{watts:.0f} W " if isinstance(watts, (int, float)) else ""
            scope = "process" if tracking_mode == "process" else "machine"
            found.setdefault("ram", []).append(("estimated", f"{w}model ({scope} memory)"))
        elif kind in ("AppleSiliconChip", "Raspberry"):
            part = str(getattr(hw, "chip_part", "cpu")).lower()
            found.setdefault("gpu" if part == "gpu" else "ram" if part == "ram" else "cpu", []).append(
                ("measured", "powermetrics" if kind == "AppleSiliconChip" else "PMIC"))
        else:  # a device CodeCarbon added since: claim no measurement we cannot name
            found.setdefault("cpu", []).append(("estimated", f"{kind} (not identified)"))
    out = {}
    for part, entries in sorted(found.items(), key=lambda kv: ("cpu", "gpu", "ram").index(kv[0])):
        sources = {s for s, _ in entries}
        out[part] = {"kwh": _num(getattr(data, f"{part}_energy", None)),
                     "power_w": _num(getattr(data, f"{part}_power", None)),
                     "source": sources.pop() if len(sources) == 1 else "mixed",
                     "method": "; ".join(m for _, m in entries)}
    return out


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def overall_source(sources: Iterable[str]) -> str:
    """'measured' / 'estimated' when every figure is, 'mixed' otherwise; 'not measured' for none."""
    s = set(sources)
    if not s:
        return "not measured"
    return s.pop() if len(s) == 1 and s <= {"measured", "estimated"} else "mixed"


class CostMeter:
    """One run's cost: CodeCarbon's tracker around fit (rank 0) and the FLOP count. Construct it early (the
    hardware probe runs in a thread meanwhile), `count_flops` before training, `tracking()` around fit,
    `result()` for summary["cost"]."""

    def __init__(self, cfg: CostConfig | None = None, dist=None):
        self.cfg = cfg or CostConfig()
        self.rank = getattr(dist, "rank", 0)
        world = getattr(dist, "world_size", 1)
        self.tracking_mode = "process" if world == 1 else "machine"
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        self.scope = ("this process" if world == 1 else
                      "rank 0's machine (all its local ranks)" + (f"; {world - local} of {world} ranks on other "
                                                                   "machines not counted" if local < world else ""))
        device = getattr(dist, "device", torch.device("cpu"))
        self.gpu_ids = _physical_gpu(device) if world == 1 else None
        if self.gpu_ids:
            self.scope += f", GPU {self.gpu_ids[0]}"
        self.flops: dict = {"note": "cost.flops=false"} if not self.cfg.flops else {"note": "not counted"}
        self._tracker = None
        self._data = None
        self._t0 = self._tracked_s = None
        self._note = None  # why there is no energy figure
        self._warn = False  # the note deserves a warning (energy was asked for)
        self._thread = None
        self.overhead: dict[str, float] = {}  # seconds the run spent on its cost outside what is tracked
        if not self.cfg.energy:
            self._note = "cost.energy=false"
        elif self.rank != 0:
            self._note = f"rank {self.rank}: rank 0 tracks the energy"
        else:
            self._thread = threading.Thread(target=self._probe, name="lamina-cost-probe", daemon=True)
            self._thread.start()

    def _probe(self) -> None:
        # output_dir: the system's temp folder, never the cwd (with no output method CodeCarbon writes nothing;
        # Intel Power Gadget's log would go there)
        self._tracker, note = _new_tracker(self.cfg.country, self.tracking_mode, self.gpu_ids, tempfile.gettempdir())
        if note:
            self._note, self._warn = note, True

    # ----- FLOPs ---------------------------------------------------------------------------------------
    def count_flops(self, model: torch.nn.Module, task, train_loader, eval_loader=None, device=None, autocast=None,
                    dp_size: int = 1, world_size: int = 1) -> dict:
        """Forward and training FLOPs per sample (rank 0; see the module docstring). Never raises: a model the
        counter cannot run records why."""
        if not self.cfg.flops or self.rank != 0:
            if self.rank != 0 and self.cfg.flops:
                self.flops = {"note": f"rank {self.rank}: rank 0 counts the FLOPs"}
            return self.flops
        device = torch.device(device) if device is not None else torch.device("cpu")
        t0 = time.perf_counter()
        try:
            model.to(device)  # what Trainer.setup does first: the count runs where training will
            train_batch = peek_batch(train_loader)
            eval_batch = peek_batch(eval_loader) if eval_loader is not None else None
            if train_batch is None:
                self.flops = {"note": "the training loader yielded no batch"}
                return self.flops
            tb = _to(_head(train_batch, -(-batch_size(train_batch) // max(dp_size, 1))), device)
            eb = eval_batch if eval_batch is not None else train_batch
            eb = _to(_head(eb, min(EVAL_SAMPLES, -(-batch_size(eb) // max(world_size, 1)))), device)
            fwd = flops_per_sample(model, task, eb, train=False, autocast=autocast)
            step = flops_per_sample(model, task, tb, train=True, autocast=autocast)
            self.flops = {"forward_per_sample": fwd, "train_per_sample": step,
                          "eval_batch": batch_size(eb), "train_batch": batch_size(tb),
                          "eval_split": "val" if eval_batch is not None else "train", "method": FLOP_METHOD}
        except torch.cuda.OutOfMemoryError:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            self.flops = {"note": "not counted: one batch's forward/backward ran out of memory outside training"}
        except Exception as e:  # noqa: BLE001 - the count is a report, never a reason for the run to fail
            self.flops = {"note": f"not counted: {type(e).__name__}: {e}"[:300]}
        self.overhead["flop_count_s"] = time.perf_counter() - t0
        return self.flops

    # ----- energy --------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None and self._tracker is None:  # energy off, another rank, or already failed
            return
        t0 = time.perf_counter()
        try:
            self._start()
        finally:
            self.overhead["tracker_start_s"] = time.perf_counter() - t0  # the probe's wait included

    def _start(self) -> None:
        if self._thread is not None:
            self._thread.join(PROBE_TIMEOUT_S)
            if self._thread.is_alive():
                self._tracker, self._note, self._warn = None, (f"codecarbon's hardware probe took over "
                                                               f"{PROBE_TIMEOUT_S:.0f} s; energy not tracked"), True
            self._thread = None
        if self._tracker is None:
            return
        _silence()
        self._tracker.start()  # CodeCarbon catches its own errors (then stop() finds no measurement)
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self._tracker is None or self._t0 is None:
            return
        self._tracked_s = time.perf_counter() - self._t0
        t0 = time.perf_counter()
        self._tracker.stop()
        self.overhead["tracker_stop_s"] = time.perf_counter() - t0
        self._data = getattr(self._tracker, "final_emissions_data", None)
        if self._data is None or _num(getattr(self._data, "energy_consumed", None)) is None:
            self._data, self._note, self._warn = None, "codecarbon returned no measurement", True
        self._t0 = None

    @contextlib.contextmanager
    def tracking(self):
        """CodeCarbon's tracker around the block (fit); stopped whatever happens in it."""
        self.start()
        try:
            yield self
        finally:
            self.stop()

    # ----- the summary's section -----------------------------------------------------------------------
    def result(self, samples_seen: int | None = None, wall_time_s: float | None = None, resumed: bool = False) -> dict:
        """summary["cost"]: wall time, energy (total and per component, each marked measured or estimated), CO2e,
        and FLOPs."""
        out: dict = {"wall_time_s": wall_time_s, "energy_kwh": None, "co2e_kg": None, "country": self.cfg.country}
        d = self._data
        if d is not None:
            parts = _component_sources(self._tracker, d, self.tracking_mode)
            source = overall_source(p["source"] for p in parts.values())
            explanation = "; ".join(f"{k.upper()}: {p['method']}" for k, p in parts.items())
            kwh, kg = _num(d.energy_consumed), _num(getattr(d, "emissions", None))
            out.update({
                "energy_kwh": kwh, "co2e_kg": kg,
                "g_co2e_per_kwh": kg * 1000 / kwh if kwh and kg is not None else None,
                "source": source, "explanation": explanation, "components": parts,
                "tracked_s": self._tracked_s,
                "tracked": "fit (training and validation epochs)" + (" since the resume" if resumed else ""),
                "scope": self.scope,
                "tracker": f"codecarbon {getattr(d, 'codecarbon_version', '?')} (offline)"})
        else:
            out.update({"source": "not measured", "explanation": self._note or "energy not tracked"})
            if self._warn:
                out["warning"] = f"energy not measured: {self._note}"
        flops = dict(self.flops)
        if "train_per_sample" in flops and samples_seen is not None:
            flops["samples_seen"] = int(samples_seen)
            flops["training"] = flops["train_per_sample"] * samples_seen
            if resumed:
                flops["note"] = "samples seen include those before the resume"
        out["flops"] = flops
        if self.overhead:
            out["overhead_s"] = dict(self.overhead)
        return out


# ----- words and sums ----------------------------------------------------------------------------------
def si(value: float, unit: str) -> str:
    """1.23e6, 'FLOP' -> '1.23 MFLOP'."""
    for factor, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _co2(kg: float) -> str:
    return f"{kg:.3g} kg CO2e" if kg >= 1 else f"{kg * 1000:.2g} g CO2e"


def describe(cost: Mapping) -> str:
    """One line for people: '0.00031 kWh (estimated: CPU: ...), 0.12 g CO2e (USA), 1.23 MFLOP/sample forward,
    4.5 TFLOP training'."""
    parts = []
    kwh = cost.get("energy_kwh")
    if isinstance(kwh, (int, float)):
        parts.append(f"{kwh:.2g} kWh ({cost.get('source')}: {cost.get('explanation')})")
        kg = cost.get("co2e_kg")
        if isinstance(kg, (int, float)):
            parts.append(f"{_co2(kg)} ({cost.get('country')})")
    else:
        parts.append("energy not measured" + ("" if cost.get("warning") else f" ({cost.get('explanation')})"))
    flops = cost.get("flops") or {}
    if isinstance(flops.get("forward_per_sample"), (int, float)):
        parts.append(f"{si(flops['forward_per_sample'], 'FLOP')}/sample forward")
    if isinstance(flops.get("training"), (int, float)):
        parts.append(f"{si(flops['training'], 'FLOP')} training")
    elif flops.get("note"):
        parts.append(f"FLOPs {flops['note']}")
    return ", ".join(parts)


def total_cost(summaries: Iterable[Mapping]) -> dict:
    """The cost of several runs (a search's trials, a sweep): sums of energy, CO2e, wall time and training FLOPs.

    Each item is a run's summary (summary.json, `RunResult.summary`) or its "cost" section. Energy is summed
    with its marking: the total's `source` is "measured" or "estimated" only when every summed run's is, else
    "mixed"; `by_source` gives the kWh of each kind and `components` the CPU/GPU/RAM sums with theirs. Runs
    without an energy figure are counted (`runs_without_energy`, `complete: false`): the sums are then lower
    bounds, and `explanation` says so."""
    runs, kwh, kg, wall, flops = 0, [], [], 0.0, []
    by_source: dict[str, float] = {}
    runs_by_source: dict[str, int] = {}
    components: dict[str, dict] = {}
    countries, missing, no_flops = set(), 0, 0
    for s in summaries:
        cost = s.get("cost", s) if isinstance(s, Mapping) else {}
        cost = cost if isinstance(cost, Mapping) else {}
        runs += 1
        wall += cost.get("wall_time_s") or 0.0
        f = cost.get("flops") if isinstance(cost.get("flops"), Mapping) else {}
        if isinstance(f.get("training"), (int, float)):
            flops.append(f["training"])
        else:
            no_flops += 1
        e = cost.get("energy_kwh")
        if not isinstance(e, (int, float)) or isinstance(e, bool):
            missing += 1
            continue
        source = cost.get("source") if cost.get("source") in ("measured", "estimated", "mixed") else "mixed"
        kwh.append(e)
        by_source[source] = by_source.get(source, 0.0) + e
        runs_by_source[source] = runs_by_source.get(source, 0) + 1
        if isinstance(cost.get("co2e_kg"), (int, float)):
            kg.append(cost["co2e_kg"])
        if cost.get("country"):
            countries.add(str(cost["country"]))
        for part, c in (cost.get("components") or {}).items():
            if not isinstance(c, Mapping) or not isinstance(c.get("kwh"), (int, float)):
                continue
            t = components.setdefault(str(part), {"kwh": 0.0, "sources": set()})
            t["kwh"] += c["kwh"]
            t["sources"].add(c.get("source") if c.get("source") in ("measured", "estimated") else "mixed")
    source = overall_source(by_source)
    words = [f"{n} run{'s' * (n != 1)} {k} ({by_source[k]:.3g} kWh)" for k, n in sorted(runs_by_source.items())]
    if missing:
        words.append(f"{missing} of {runs} run{'s' * (runs != 1)} without an energy figure (sums are lower bounds)")
    return {
        "runs": runs, "runs_with_energy": runs - missing, "runs_without_energy": missing, "complete": missing == 0,
        "energy_kwh": sum(kwh) if kwh else None, "co2e_kg": sum(kg) if kg else None,
        "source": source, "explanation": "; ".join(words) or "no runs",
        "by_source": by_source,
        "components": {k: {"kwh": v["kwh"], "source": overall_source(v["sources"])} for k, v in components.items()},
        "countries": sorted(countries), "wall_time_s": wall,
        "training_flops": sum(flops) if flops else None, "runs_without_flops": no_flops,
    }
