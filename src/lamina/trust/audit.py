"""`lamina audit RUN_DIR`: every trust check that applies to a run, written into its folder, then the report.

Each part runs only where it applies and says why when it does not: calibration (classification), gradient
health (inputs named x), explanations (classification), robustness (classification on float inputs: images,
tables), fairness (data sets with group metadata, e.g. fsdd_fusion by accent). A part that fails for a reason
of the run (not of lamina) is recorded as skipped with that reason, so one inapplicable check never costs the
others; anything else propagates.
"""

from __future__ import annotations

import time
from pathlib import Path

from lamina.errors import LaminaError

PARTS = ("calibration", "gradients", "explain", "robust", "fairness")


def audit_run(run_dir: str | Path, which: str = "best", eps: float = 0.1, steps: int = 20, n_attack: int | None = 1000,
              n_explain: int = 8, explain_method: str = "integrated_gradients", group: str | None = None,
              skip: tuple[str, ...] = (), on_part=None, progress=None) -> dict:
    """Run the applicable checks; returns {part: {"status": "done"|"skipped", "seconds", "result"|"reason"}}
    and the report path under "report". `on_part(part)` is called before each part; `progress(done, total)`
    counts within the long ones, each phase from 0: calibration's val and test batches, the explained examples,
    the attacked samples."""
    from lamina.report.html import build_report
    from lamina.runs import open_run

    opened = open_run(run_dir, which)  # a bad folder fails here, before any work
    facts, root = opened.facts, opened.folder.path
    out: dict = {}

    def step(part: str, fn, applies: bool, why_not: str):
        if part in skip:
            out[part] = {"status": "skipped", "reason": "--skip"}
            return
        if not applies:
            out[part] = {"status": "skipped", "reason": why_not}
            return
        if on_part is not None:
            on_part(part)
        t0 = time.perf_counter()
        try:
            res = fn()
        except LaminaError as e:
            out[part] = {"status": "skipped", "reason": str(e)}
            return
        except ImportError as e:  # an optional package (captum, fairlearn) is not installed
            out[part] = {"status": "skipped", "reason": f'needs {e.name or e}: pip install "lamina[trust]"'}
            return
        out[part] = {"status": "done", "seconds": time.perf_counter() - t0, "result": res}

    def calibration():
        from lamina.trust.calibration import calibrate_run

        r = calibrate_run(root, which, progress=progress)
        return {"temperature": r["temperature"], "ece_before": r["before"]["ece"], "ece_after": r["after"]["ece"],
                "acc": r["before"]["acc"]}

    def gradients():
        from lamina.trust.gradients import gradient_health_run

        r = gradient_health_run(root, which)
        return {"findings": [f"{f['kind']} at {f['layer']}" for f in r["findings"]] or ["healthy"], **r["summary"]}

    def explain():
        from lamina.trust.explain import explain_run

        r = explain_run(root, method=explain_method, n=n_explain, which=which, progress=progress)
        return {"method": r["method"], "n": r["n"], "png": r["png"],
                **({"ig_mean_abs_delta": r["ig_completeness"]["mean_abs_delta"]} if "ig_completeness" in r else {})}

    def robust():
        from lamina.trust.robust import attack_run

        r = attack_run(root, attack="pgd", eps=eps, steps=steps, norm="linf", n=n_attack, which=which,
                       progress=progress)
        return {k: r[k] for k in ("attack", "eps", "steps", "n", "clean_acc", "robust_acc") if k in r}

    def fairness():
        from lamina.trust.fairness import audit_fairness as fair

        r = fair(root, group or "accent", which)
        return {"group": r["group"], "accuracy_difference": r["accuracy_difference"], "worst_group": r["worst_group"],
                "dp_difference_mean": r["dp_difference_mean"], "eo_difference_mean": r["eo_difference_mean"]}

    # a check that does not fit the run (a language model has no calibration) raises a one-line LaminaError
    # early, before loading data; it is recorded as skipped with that line
    step("calibration", calibration, True, "")
    step("gradients", gradients, True, "")
    step("explain", explain, True, "")
    step("robust", robust, True, "")
    has_groups = bool(facts.meta.get("groups")) or group is not None
    step("fairness", fairness, has_groups,
         "the run's data carry no group metadata (e.g. fsdd_fusion's speaker accents); pass --group to force")
    out["report"] = str(build_report(root))
    return out
