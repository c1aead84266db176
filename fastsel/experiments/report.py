"""Outputs of the end-to-end benchmark: a CSV of every evaluation of every run, a Markdown
report (per setting: strategy × budget, mean ± std over seeds, paired differences with
uniform; the targets; a verdict per published claim), PNG plots (accuracy against
wall-clock with seed bands, a row of panels per setting; the MMS distribution over
training; the most and least important training samples).

Time to accuracy: for each run, the training-clock time of its first evaluation whose
test accuracy reaches the final accuracy of the *reference*, the full-budget uniform run
(no augmentation, linear schedule, steps framing) of the same setting and seed, and
that time as a fraction of the reference's training wall-clock. A run of budget b is
evaluated at ``ceil(evals * b)`` points, so the time is resolved to 1/``evals`` of the
full budget's steps.
"""

from __future__ import annotations

import csv
import datetime
import math
import os
import platform
import statistics
from pathlib import Path
from typing import Iterable, Optional

import torch

import fastsel
from fastsel.experiments.harness import STRATEGIES, BenchConfig, BenchData, RunResult

__all__ = ["CSV_COLUMNS", "TIME_TARGET", "SCORE_TARGET_PCT", "annotate", "groups", "write_csv", "markdown",
           "targets", "plot_curves", "plot_mms", "plot_importance", "write_all", "environment",
           "paired", "claims", "read_csv", "T_CRIT_05"]

TIME_TARGET = 0.6        # reach the reference's accuracy in <= 0.6x its wall-clock
SCORE_TARGET_PCT = 3.0   # fastsel.score <= 3% of the step time

CSV_COLUMNS = (
    "setting", "model", "regime", "augment", "strategy", "framing", "schedule", "label", "budget",
    "seed", "epochs_full", "train_samples", "steps", "full_steps",
    "eval", "step", "passes", "train_s", "train_cpu_s", "samples_scored", "samples_trained", "samples_forwarded",
    "test_acc", "test_loss", "final", "final_acc", "run_train_s", "run_train_cpu_s", "proxy_trained", "step_ms",
    "score_s",
    "select_fwd_s", "select_other_s", "plan_s", "aux_s", "score_pct", "select_pct", "target_acc",
    "reference_train_s", "time_to_target_s", "time_to_target_ratio", "speedup",
)


def environment(cfg: BenchConfig) -> dict:
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "CPU": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch threads": torch.get_num_threads(), "torch": torch.__version__, "fastsel": fastsel.__version__,
        "python": platform.python_version(),
        "load average (1 min) at start": f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a",
        "full budget": f"{cfg.epochs} epochs, batch {cfg.batch_size}, peak lr {cfg.lr}",
        "training samples": "all" if cfg.subset is None else cfg.subset,
        "test samples": "all" if cfg.test_subset is None else cfg.test_subset,
        "test evaluations": f"{cfg.evals} per full-budget run, ceil({cfg.evals} × budget) (at least 3) per run, "
                            "plus step 0",
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ----------------------------------------------------------------------------------
# Time to accuracy
# ----------------------------------------------------------------------------------

def annotate(results: list[RunResult]) -> None:
    """Adds to each run's summary: ``target_acc`` and ``reference_train_s`` (from the
    reference run of its model and seed), ``time_to_target_s`` (None if not reached),
    ``time_to_target_ratio`` and ``speedup`` (reference wall-clock / time to target)."""
    refs = {(r.summary["setting"], r.spec.seed): r for r in results if r.spec.is_reference}
    for r in results:
        ref = refs.get((r.summary["setting"], r.spec.seed))
        s = r.summary
        s["target_acc"] = s["reference_train_s"] = None
        s["time_to_target_s"] = s["time_to_target_ratio"] = s["speedup"] = None
        if ref is None:
            continue
        target = ref.summary["final_acc"]
        s["target_acc"], s["reference_train_s"] = target, ref.summary["train_s"]
        hit = next((row for row in r.curve if row["test_acc"] >= target), None)
        if hit is not None:
            s["time_to_target_s"] = hit["train_s"]
            if ref.summary["train_s"] > 0:
                s["time_to_target_ratio"] = hit["train_s"] / ref.summary["train_s"]
                s["speedup"] = ref.summary["train_s"] / hit["train_s"] if hit["train_s"] > 0 else math.inf


def write_csv(results: list[RunResult], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in results:
            s, sp = r.summary, r.spec
            for i, row in enumerate(r.curve):
                w.writerow({
                    "setting": s["setting"], "model": sp.model, "regime": sp.regime, "augment": sp.augment,
                    "strategy": sp.strategy, "framing": sp.framing, "schedule": sp.schedule, "label": sp.label,
                    "budget": sp.budget, "seed": sp.seed, "epochs_full": s["epochs_full"],
                    "train_samples": s["train_samples"], "steps": s["steps"], "full_steps": s["full_steps"],
                    "eval": i, "step": row["step"], "passes": _f(row["passes"], 4), "train_s": _f(row["train_s"], 3),
                    "train_cpu_s": _f(row["train_cpu_s"], 3), "samples_scored": row["samples_scored"],
                    "samples_trained": row["samples_trained"],
                    "samples_forwarded": row["samples_scored"] + row["samples_trained"],
                    "test_acc": _f(row["test_acc"], 5), "test_loss": _f(row["test_loss"], 5),
                    "final": int(i == len(r.curve) - 1), "final_acc": _f(s["final_acc"], 5),
                    "run_train_s": _f(s["train_s"], 3), "run_train_cpu_s": _f(s["train_cpu_s"], 3),
                    "proxy_trained": s.get("proxy_trained", 0),
                    "step_ms": _f(s["step_ms"], 3), "score_s": _f(s["score_s"], 4),
                    "select_fwd_s": _f(s["select_fwd_s"], 4), "select_other_s": _f(s["select_other_s"], 4),
                    "plan_s": _f(s["plan_s"], 4), "aux_s": _f(s["aux_s"], 4),
                    "score_pct": _f(s["score_pct"], 3), "select_pct": _f(s["select_pct"], 3),
                    "target_acc": _f(s.get("target_acc"), 5), "reference_train_s": _f(s.get("reference_train_s"), 3),
                    "time_to_target_s": _f(s.get("time_to_target_s"), 3),
                    "time_to_target_ratio": _f(s.get("time_to_target_ratio"), 4), "speedup": _f(s.get("speedup"), 3),
                })


def read_csv(path, mms_trace: Optional[Path] = None) -> list[RunResult]:
    """The runs of a ``train_bench.csv`` (and their MMS traces from ``mms_trace.csv``),
    to render the report again without training (``train_bench.py --report-from``).
    The importance grid needs the final models and is not rebuilt."""
    from fastsel.experiments.harness import RunSpec

    runs: dict[tuple, dict] = {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "setting" not in rows[0]:
        raise ValueError(f"{path}: not a train_bench.csv of this version (no 'setting' column)")
    for row in rows:
        key = (row["setting"], row["label"], row["budget"], row["seed"])
        runs.setdefault(key, {"rows": []})["rows"].append(row)
    num = float
    results = []
    for key, run in runs.items():
        rs = sorted(run["rows"], key=lambda r: int(r["eval"]))
        last = rs[-1]
        spec = RunSpec(last["strategy"], last["augment"], float(last["budget"]), int(last["seed"]), last["model"],
                       last["regime"], last["framing"], last["schedule"])
        curve = [{"step": int(r["step"]), "passes": num(r["passes"]), "train_s": num(r["train_s"]),
                  "train_cpu_s": num(r["train_cpu_s"]), "samples_scored": int(r["samples_scored"]),
                  "samples_trained": int(r["samples_trained"]), "test_acc": num(r["test_acc"]),
                  "test_loss": num(r["test_loss"])} for r in rs]
        summary = {"setting": last["setting"], "steps": int(last["steps"]), "full_steps": int(last["full_steps"]),
                   "epochs_full": int(last["epochs_full"]), "train_samples": int(last["train_samples"]),
                   "final_acc": num(last["final_acc"]), "final_loss": num(last["test_loss"]),
                   "train_s": num(last["run_train_s"]), "train_cpu_s": num(last["run_train_cpu_s"]),
                   "samples_scored": int(last["samples_scored"]), "samples_trained": int(last["samples_trained"]),
                   "proxy_trained": int(last.get("proxy_trained") or 0),
                   **{k: num(last[k]) for k in ("score_s", "select_fwd_s", "select_other_s", "plan_s", "aux_s",
                                                "step_ms", "score_pct", "select_pct")}}
        results.append(RunResult(spec, curve, summary))
    if mms_trace is not None and Path(mms_trace).exists():
        by = {(r.spec.label, r.spec.budget, r.spec.seed, r.spec.model): r for r in results}
        with open(mms_trace, newline="") as f:
            for t in csv.DictReader(f):
                r = by.get((t["label"], float(t["budget"]), int(t["seed"]), t["model"]))
                if r is not None:
                    r.mms_trace.append({"step": int(t["step"]), "train_s": num(t["train_s"]),
                                        **{k: num(t[k]) for k in ("q10", "q25", "q50", "q75", "q90")}})
    return results


def _f(v, digits: int):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else str(v)
    return v


# ----------------------------------------------------------------------------------
# Aggregation over seeds
# ----------------------------------------------------------------------------------

# Two-sided 5% critical values of Student's t with df = 1 .. 30 degrees of freedom (a
# paired comparison over n seeds has n - 1); beyond 30, the normal's 1.96 is close enough.
T_CRIT_05 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
             2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
             2.045, 2.042)


def paired(a: dict[int, float], b: dict[int, float]) -> Optional[dict]:
    """Paired comparison of a - b over the seeds both have: mean and std of the
    differences, the t statistic and whether the mean differs from 0 beyond the seed
    noise (two-sided paired t-test at 5%; ``None`` with fewer than 2 seeds, where the
    noise cannot be estimated)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = [a[k] - b[k] for k in seeds]
    mean = statistics.fmean(d)
    if len(d) < 2:
        return {"n": 1, "mean": mean, "std": None, "t": None, "significant": None}
    sd = statistics.stdev(d)
    t = mean / (sd / math.sqrt(len(d))) if sd > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
    crit = T_CRIT_05[len(d) - 2] if len(d) - 1 <= len(T_CRIT_05) else 1.96
    return {"n": len(d), "mean": mean, "std": sd, "t": t, "significant": abs(t) > crit}


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _baseline_budget(spec) -> float:
    """The budget of the uniform run a group is compared with at equal steps: the same
    setting and budget (its schedule compressed alike); for the fixed-epochs framing,
    which has no step budget, the full budget."""
    return 1.0 if spec.framing == "epochs" else spec.budget


def _equal_time_uniform(results: list[RunResult]) -> dict:
    """Per (setting, seed): a function t -> the final accuracy uniform sampling reaches
    when given a wall-clock of t, interpolated linearly between that seed's uniform runs
    at their budgets (each a full run with its schedule compressed to its budget). Below
    the shortest uniform run's wall-clock, that run's accuracy (uniform given more time:
    a comparison that favours uniform); above the longest, None."""
    pts: dict[tuple, list[tuple[float, float]]] = {}
    for r in results:
        if r.spec.strategy == "uniform" and r.spec.augment == "none" and r.spec.framing == "steps" \
                and r.spec.schedule == "linear":
            pts.setdefault((r.summary["setting"], r.spec.seed), []).append((r.summary["train_s"],
                                                                            r.summary["final_acc"]))

    def make(p):
        p = sorted(p)

        def f(t: float) -> Optional[float]:
            if not p or t > p[-1][0]:
                return None
            if t <= p[0][0]:
                return p[0][1]
            for (t0, a0), (t1, a1) in zip(p, p[1:]):
                if t0 <= t <= t1:
                    return a0 if t1 == t0 else a0 + (a1 - a0) * (t - t0) / (t1 - t0)
            return None
        return f
    return {k: make(v) for k, v in pts.items()}


def groups(results: list[RunResult]) -> list[dict]:
    """One entry per (setting, strategy + augmentation + variant, budget), aggregated over
    seeds, in the order the runs were given, with paired comparisons (per seed) against
    uniform at the same budget (``vs_same``) and against the setting's reference, the
    full-budget uniform run (``vs_ref``)."""
    out: dict[tuple, list[RunResult]] = {}
    for r in results:
        out.setdefault((r.summary["setting"], r.spec.label, r.spec.budget), []).append(r)
    uniform = {(k[0], k[2]): rs for k, rs in out.items() if k[1] == "uniform"}
    at_time = _equal_time_uniform(results)
    rows = []
    for (setting, label, budget), rs in out.items():
        acc = [r.summary["final_acc"] for r in rs]
        ratios = [r.summary.get("time_to_target_ratio") for r in rs]
        speed = [r.summary.get("speedup") for r in rs]
        has_ref = all(r.summary.get("target_acc") is not None for r in rs)
        reached = [x for x in ratios if x is not None]
        every_seed = bool(reached) and len(reached) == len(rs)
        timed = [r for r in rs if r.summary["train_s"] > 0]
        spec = rs[0].spec
        mine = {r.spec.seed: r.summary["final_acc"] for r in rs}
        base_budget = _baseline_budget(spec)
        same = uniform.get((setting, base_budget))
        ref = uniform.get((setting, 1.0))
        equal = {}
        for r in rs:
            f = at_time.get((setting, r.spec.seed))
            u = f(r.summary["train_s"]) if f is not None and label != "uniform" else None
            if u is not None:
                equal[r.spec.seed] = u
        wall_ratio = [r.summary["train_s"] / r.summary["reference_train_s"] for r in rs
                      if r.summary.get("reference_train_s")]
        rows.append({
            "setting": setting, "model": spec.model, "regime": spec.regime, "label": label,
            "strategy": spec.strategy, "augment": spec.augment, "framing": spec.framing, "schedule": spec.schedule,
            "budget": budget, "seeds": len(rs), "acc_mean": statistics.fmean(acc), "acc_std": _std(acc),
            "steps": statistics.fmean(r.summary["steps"] for r in rs),
            "train_s": statistics.fmean(r.summary["train_s"] for r in rs),
            "train_s_std": _std([r.summary["train_s"] for r in rs]),
            "wall_ratio": statistics.fmean(wall_ratio) if wall_ratio else None,
            "wall_ratio_std": _std(wall_ratio) if wall_ratio else None,
            "train_cpu_s": statistics.fmean(r.summary["train_cpu_s"] for r in rs),
            "has_reference": has_ref, "reached": len(reached),
            "ratio": statistics.fmean(reached) if every_seed else None,
            "ratio_std": _std(reached) if every_seed else None,
            "ratio_some": statistics.fmean(reached) if reached else None,
            "speedup": statistics.fmean(x for x in speed if x is not None) if every_seed else None,
            "score_pct": statistics.fmean(r.summary["score_pct"] for r in rs),
            "score_pct_max": max(r.summary["score_pct"] for r in rs),
            "select_pct": statistics.fmean(r.summary["select_pct"] for r in rs),
            "fwd_pct": statistics.fmean(100 * (r.summary["select_fwd_s"] + r.summary["plan_s"]) / r.summary["train_s"]
                                        for r in timed) if timed else 0.0,
            "scored": statistics.fmean(r.summary["samples_scored"] for r in rs),
            "trained": statistics.fmean(r.summary["samples_trained"] for r in rs),
            "target_acc": statistics.fmean(r.summary["target_acc"] for r in rs) if has_ref else None,
            "vs_same": paired(mine, {r.spec.seed: r.summary["final_acc"] for r in same})
            if same and label != "uniform" else None,
            "vs_time": paired(mine, equal) if len(equal) == len(rs) else None,
            "vs_ref": paired(mine, {r.spec.seed: r.summary["final_acc"] for r in ref})
            if ref and not (label == "uniform" and budget == 1.0) else None,
        })
    return rows


def _diff(p: Optional[dict]) -> str:
    """A paired accuracy difference in points, marked * when beyond the seed noise."""
    if p is None:
        return "—"
    if p["std"] is None:
        return f"{100 * p['mean']:+.2f} (1 seed)"
    return f"{100 * p['mean']:+.2f} ± {100 * p['std']:.2f}" + (" *" if p["significant"] else "")


def _acc(g: dict) -> str:
    return f"{100 * g['acc_mean']:.2f} ± {100 * g['acc_std']:.2f}"


def _tta(g: dict) -> str:
    if not g["has_reference"]:
        return "n/a"
    if g["ratio"] is not None:
        return f"{g['ratio']:.2f} ± {g['ratio_std']:.2f}×" if g["seeds"] > 1 else f"{g['ratio']:.2f}×"
    if g["reached"]:
        return f"{g['ratio_some']:.2f}× ({g['reached']}/{g['seeds']} seeds)"
    return "not reached"


def _speedup(g: dict) -> str:
    if g["speedup"] is None:
        return "—"
    return "∞" if math.isinf(g["speedup"]) else f"{g['speedup']:.2f}×"


def _count(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.0f}k" if x >= 1e3 else f"{x:.0f}"


# ----------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------

def targets(results: list[RunResult]) -> list[str]:
    """The two verdict lines (met / missed, with the numbers)."""
    lines = []
    if results:
        worst = max(results, key=lambda r: r.summary["score_pct"])
        pcts = [r.summary["score_pct"] for r in results]
        ok = worst.summary["score_pct"] <= SCORE_TARGET_PCT
        lines.append(
            f"Target 1, `fastsel.score` ≤ {SCORE_TARGET_PCT:g}% of the training step time: "
            f"**{'met' if ok else 'missed'}**: at most {worst.summary['score_pct']:.2f}% "
            f"({worst.spec.model} {worst.spec.label} at budget {worst.spec.budget:g}, seed {worst.spec.seed}), "
            f"median {statistics.median(pcts):.2f}% over {len(pcts)} runs "
            f"({1000 * worst.summary['score_s'] / max(1, worst.summary['steps']):.3f} ms of "
            f"{worst.summary['step_ms']:.1f} ms per step in that run).")
    head_setting = next((r.summary["setting"] for r in results if r.spec.is_reference), None)
    gs = [g for g in groups(results) if g["has_reference"] and g["setting"] == head_setting]
    if not gs:
        lines.append(f"Target 2, reach the full-budget uniform accuracy in ≤ {TIME_TARGET:g}× its wall-clock: "
                     "**not evaluated** (the grid has no full-budget uniform run without augmentation).")
        return lines
    candidates = [g for g in gs if not (g["strategy"] == "uniform" and g["augment"] == "none")]
    met = [g for g in candidates if g["ratio"] is not None and g["ratio"] <= TIME_TARGET]
    head = (f"Target 2, reach the full-budget uniform accuracy in ≤ {TIME_TARGET:g}× its wall-clock "
            f"({head_setting}; mean over seeds, every seed reaching it): ")
    if met:
        best = min(met, key=lambda g: g["ratio"])
        names = ", ".join(f"{g['model']} {g['label']} at budget {g['budget']:g} ({g['ratio']:.2f}×)" for g in met)
        lines.append(head + f"**met** by {names}; best {best['model']} {best['label']} at budget {best['budget']:g}: "
                     f"{best['ratio']:.2f}× ({best['acc_mean']:.4f} final vs target {best['target_acc']:.4f}).")
    else:
        reached = [g for g in candidates if g["ratio"] is not None]
        partly = [g for g in candidates if g["ratio"] is None and g["ratio_some"] is not None]
        if reached:
            best = min(reached, key=lambda g: g["ratio"])
            detail = (f"the fastest to reach it was {best['model']} {best['label']} at budget {best['budget']:g}, "
                      f"in {best['ratio']:.2f}× uniform's wall-clock")
        elif partly:
            best = min(partly, key=lambda g: g["ratio_some"])
            detail = (f"no selection or augmentation run reached it in every seed; the fastest in some seeds was "
                      f"{best['model']} {best['label']} at budget {best['budget']:g}, {best['ratio_some']:.2f}× "
                      f"({best['reached']}/{best['seeds']} seeds)")
        else:
            detail = "no selection or augmentation run reached it at all"
        closest = max(candidates, key=lambda g: g["acc_mean"] - g["target_acc"]) if candidates else None
        extra = ""
        if closest is not None:
            extra = (f"; the highest final accuracy relative to the target: {closest['model']} {closest['label']} at "
                     f"budget {closest['budget']:g}, {closest['acc_mean']:.4f} vs {closest['target_acc']:.4f} in "
                     f"{closest['train_s']:.1f} s")
        lines.append(head + f"**missed**: no strategy did; {detail}{extra}.")
    for g in groups(results):  # the other settings where a strategy meets it
        if g["setting"] != head_setting and g["label"] != "uniform" and g["ratio"] is not None \
                and g["ratio"] <= TIME_TARGET:
            lines.append(f"In the setting {g['setting']}: met by {g['label']} at budget {g['budget']:g}, "
                         f"{_tta(g)} in every seed, final {_acc(g)}% vs the target {100 * g['target_acc']:.2f}%.")
    plain = [g for g in gs if g["strategy"] == "uniform" and g["augment"] == "none" and g["budget"] < 1.0]
    if plain:
        lines.append("For comparison, uniform at smaller budgets: " + "; ".join(
            f"budget {g['budget']:g}: {g['acc_mean']:.4f} in {g['train_s']:.1f} s, time to target {_tta(g)}"
            for g in plain) + ".")
    return lines


# ----------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------

def markdown(results: list[RunResult], skipped: dict[str, str], cfg: BenchConfig, env: Optional[dict] = None,
             files: Iterable[str] = ()) -> str:
    gs = groups(results)
    out = ["# End-to-end benchmark: does selection beat uniform in wall-clock time?", ""]
    if env:
        out += [f"* {k}: {v}" for k, v in env.items()]
        out.append("")
    out += ["## Targets", ""] + [f"* {line}" for line in targets(results)] + [""]
    verdicts = claims(gs)
    if verdicts:
        out += ["## Published claims, checked here", "",
                "| claim | measured here | verdict |", "|---|---|---|"]
        out += [f"| {c['claim']} | {c['measured']} | **{c['verdict']}** |" for c in verdicts]
        out += ["", "Verdicts: *holds* when the claimed effect is measured beyond the seed noise (paired t-test over "
                "seeds at 5%; for \"keeps accuracy\" claims, the 95% interval of the paired difference above "
                f"-{100 * NONINFERIORITY_MARGIN:g} points; for speed-ups, every seed reaching uniform's accuracy "
                "and the mean ratio plus 2 std below 1), *does not hold* when the measurement goes against it (or "
                "the target is never reached), *inconclusive* otherwise; with 3 seeds only large effects can be "
                "told from the noise.", ""]
    for setting in dict.fromkeys(g["setting"] for g in gs):
        sg = [g for g in gs if g["setting"] == setting]
        out += [f"## {setting}", "",
                "| strategy | budget | seeds | steps | final acc % | Δ vs uniform, same budget (pts) "
                "| Δ vs uniform, same wall-clock (pts) | Δ vs uniform, full budget (pts) "
                "| wall-clock s (× uniform full) | time to uniform's acc (× its wall-clock) "
                "| `fastsel.score` % of step | selection % of step (scoring fwd %) | samples scored | samples trained |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for g in sorted(sg, key=lambda g: (-g["budget"], g["label"] != "uniform", g["label"])):
            wr = f" ({g['wall_ratio']:.2f}×)" if g["wall_ratio"] is not None else ""
            out.append(f"| {g['label']} | {g['budget']:g} | {g['seeds']} | {g['steps']:.0f} | {_acc(g)} "
                       f"| {_diff(g['vs_same'])} | {_diff(g['vs_time'])} | {_diff(g['vs_ref'])} "
                       f"| {g['train_s']:.1f} ± {g['train_s_std']:.1f}{wr} | {_tta(g)} | {g['score_pct']:.2f} "
                       f"| {g['select_pct']:.1f} ({g['fwd_pct']:.1f}) | {_count(g['scored'])} "
                       f"| {_count(g['trained'])} |")
        out.append("")
    out += ["## How to read this", "",
            "* Mean ± std over seeds. Seeds change the initialisation and the data order, not the data set.",
            "* Δ: paired differences of final test accuracy per seed, in points, mean ± std; * marks a mean "
            "that differs from 0 beyond the seed noise (paired t-test, 5%). 'Same budget' is uniform with the "
            "same optimizer steps (for the fixed-epochs framing: the full budget). 'Same wall-clock' is the "
            "accuracy uniform reaches in the run's wall-clock, interpolated per seed between uniform's runs at "
            "its budgets (each with its schedule compressed to it): the comparison that says whether selection "
            "beat uniform sampling in time (below the shortest uniform run, that run's accuracy, which favours "
            "uniform; — above the longest).",
            "* Every run takes exactly round(budget × full steps) optimizer steps with the learning-rate schedule "
            "compressed to them (linear warm-up over 2% of the steps, linear decay to 0; [aggressive lr]: a "
            "cubic decay), except [fixed epochs] runs, which make exactly the setting's epochs of their sampler "
            "(InfoBatch's framing: fewer steps) with the schedule following the fraction of epochs done.",
            "* Wall-clock is the training clock (evaluations excluded): data, augmentation, selection (its scoring "
            "forwards included), planning and the steps.",
            "* Time to uniform's accuracy: first evaluation at which the run's test accuracy reaches the final "
            "accuracy of the full-budget uniform run of its setting and seed, as a fraction of that run's "
            f"wall-clock; target ≤ {TIME_TARGET:g}×. Resolution: 1/{cfg.evals} of the full budget's steps.",
            "* `fastsel.score` % of step: time inside `fastsel.score` in the training step over the training clock. "
            "Selection %: the selector's call (scoring forward, its `fastsel.score`, the choice) plus epoch "
            "planning; in parentheses the scoring forwards alone.",
            ""]
    if any(g["regime"] != "clean" for g in gs):
        out[-1:] = ["* Regimes: clean Fashion-MNIST; noisy: 30% of the training labels replaced by another class "
                    "(the test set is clean); redundant: half the training set replaced by jittered near-duplicates "
                    "of easy-class samples (trousers, sandals, sneakers, bags, ankle boots).", ""]
    out += ["## Strategies", ""]
    for name in dict.fromkeys(g["strategy"] for g in gs):
        out.append(f"* `{name}`: {STRATEGIES[name].description}")
    if skipped:
        out += ["", "Not run (not importable):", ""] + [f"* `{k}`: {v}" for k, v in skipped.items()]
    if files:
        out += ["", "## Files", ""] + [f"* `{f}`" for f in files]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------
# Published claims
# ----------------------------------------------------------------------------------

def _find(gs: list[dict], label: str, budget: Optional[float]) -> Optional[dict]:
    """The group of the headline setting (the first one) holding that label at that
    budget (``None``: at its largest budget below 1, else at 1)."""
    if not gs:
        return None
    head = gs[0]["setting"]
    found = [g for g in gs if g["label"] == label and g["setting"] == head and (budget is None or g["budget"] == budget)]
    if not found:
        return None
    return max(found, key=lambda g: (g["budget"] < 1, g["budget"]))


def _reach(g: dict) -> str:
    if g["ratio"] is not None:
        return f"reaches uniform's full-budget accuracy in {_tta(g)} its wall-clock"
    if g["ratio_some"] is not None:
        return f"reaches uniform's full-budget accuracy in {g['reached']}/{g['seeds']} seeds only"
    return "does not reach uniform's full-budget accuracy"


def _gain_verdict(p: Optional[dict], *, positive: bool = True) -> str:
    """holds: the paired difference is in the claimed direction beyond the noise; does
    not hold: its mean goes the other way (or is 0); inconclusive: the claimed direction
    within the noise."""
    if p is None or p["significant"] is None:
        return "inconclusive"
    m = p["mean"] if positive else -p["mean"]
    if m > 0 and p["significant"]:
        return "holds"
    if m <= 0:
        return "does not hold"
    return "inconclusive"


NONINFERIORITY_MARGIN = 0.005  # "keeps accuracy": within 0.5 points of the baseline


def _lower_bound(p: dict) -> float:
    """The lower end of the two-sided 95% confidence interval of a paired mean difference."""
    crit = T_CRIT_05[p["n"] - 2] if p["n"] - 1 <= len(T_CRIT_05) else 1.96
    return p["mean"] - crit * p["std"] / math.sqrt(p["n"])


def _keeps_accuracy(p: Optional[dict]) -> str:
    """A "no accuracy lost" claim: holds when the 95% interval of the paired difference lies
    above -``NONINFERIORITY_MARGIN`` (a non-inferiority test); does not hold when the
    difference is below 0 beyond the noise; inconclusive otherwise (too few or too noisy
    seeds to tell)."""
    if p is None or p["std"] is None:
        return "inconclusive"
    if p["significant"] and p["mean"] < 0:
        return "does not hold"
    return "holds" if _lower_bound(p) > -NONINFERIORITY_MARGIN else "inconclusive"


def _speed_verdict(g: dict) -> str:
    """A speed-up to the target: holds when every seed reaches it in < 1x uniform's wall-clock
    and the mean plus 2 std stays below 1; does not hold when some seed never reaches it
    or the mean is >= 1."""
    if g["ratio"] is None:
        return "does not hold"
    if g["ratio"] >= 1:
        return "does not hold"
    if g["seeds"] > 1 and g["ratio"] + 2 * (g["ratio_std"] or 0) < 1:
        return "holds"
    return "inconclusive"


def claims(gs: list[dict]) -> list[dict]:
    """One verdict per published claim whose runs are in the grid (docs/methods.md names
    the papers): the measured number and holds / does not hold / inconclusive."""
    rows = []

    def add(claim, measured, verdict):
        rows.append({"claim": claim, "measured": measured, "verdict": verdict})

    for label in ("mms", "mms_epoch"):
        g = _find(gs, label, None)
        if g is not None:
            b = g["budget"]
            add(f"MMS selection gives a substantial acceleration (`{label}`, budget {b:g})",
                f"{_acc(g)}% ({_diff(g['vs_same'])} pts vs uniform at {b:g}, {_diff(g['vs_ref'])} vs full) in "
                f"{g['wall_ratio'] or float('nan'):.2f}× uniform's full wall-clock; {_reach(g)}", _speed_verdict(g))
    g, base = _find(gs, "mms [aggressive lr]", None), _find(gs, "mms", None)
    if g is not None and base is not None and g["budget"] == base["budget"]:
        add(f"A more aggressive learning-rate drop speeds MMS up further (budget {g['budget']:g})",
            f"{_acc(g)}% vs {_acc(base)}% with the linear schedule; {_reach(g)}",
            "holds" if (g["ratio"] is not None and (base["ratio"] is None or g["ratio"] < base["ratio"])
                        and _speed_verdict(g) == "holds") else
            "does not hold" if g["ratio"] is None or (base["ratio"] is not None and g["ratio"] >= base["ratio"])
            else "inconclusive")
    for label in ("cdf", "cdf_epoch"):
        g = _find(gs, label, 0.5)
        if g is not None:
            add(f"CDF importance sampling beats uniform sampling (`{label}`, budget 0.5)",
                f"{_acc(g)}%, {_diff(g['vs_same'])} pts vs uniform at the same steps", _gain_verdict(g["vs_same"]))
    for label in ("psgd", "csgd", "cdf_epoch"):
        for b in (0.3, 0.5):
            g = _find(gs, label, b)
            if g is not None and g["vs_same"] is not None:
                v = _gain_verdict(g["vs_same"])
                add(f"Arazo et al.: under a budget, importance sampling is not consistently better than uniform "
                    f"(`{label}`, budget {b:g})", f"{_diff(g['vs_same'])} pts vs uniform at {b:g}",
                    "holds" if v != "holds" else "does not hold")
                break
    g = _find(gs, "uniform+ricap", 0.3)
    if g is not None:
        add("Arazo et al.: data augmentation (RICAP) keeps accuracy at a 30% budget",
            f"{_acc(g)}%, {_diff(g['vs_ref'])} pts vs uniform at the full budget, {_diff(g['vs_same'])} vs uniform "
            "at 0.3", _keeps_accuracy(g["vs_ref"]))
    g = _find(gs, "hard_batches", 0.5)
    if g is not None:
        add("Hard mini-batches: fewer epochs, higher accuracy (budget 0.5)",
            f"{_acc(g)}%, {_diff(g['vs_same'])} pts vs uniform at the same steps", _gain_verdict(g["vs_same"]))
    g = _find(gs, "dynams", 0.5)
    if g is not None:
        add("DynaMS: a dynamic 50% subset generalises as well as the full data",
            f"{_acc(g)}%, {_diff(g['vs_ref'])} pts vs uniform on the full budget in "
            f"{g['wall_ratio'] or float('nan'):.2f}× its wall-clock", _keeps_accuracy(g["vs_ref"]))
    g = _find(gs, "infobatch [fixed epochs]", 1.0)
    if g is not None:
        p = g["vs_ref"]
        saving = 1 - (g["wall_ratio"] or 1)
        kept = _keeps_accuracy(p)
        v = ("does not hold" if kept == "does not hold" or saving < 0.2 else
             "holds" if kept == "holds" and saving >= 0.3 else "inconclusive")
        add("InfoBatch: ~40% saving, lossless (its framing: the same epochs, fewer steps)",
            f"{100 * saving:.0f}% less wall-clock, {_diff(p)} pts vs uniform full ({g['steps']:.0f} steps)", v)
    g = _find(gs, "infobatch", 0.5)
    if g is not None:
        add("InfoBatch at a fixed step budget (Arazo et al.'s framing: uniform gets the same steps, budget 0.5)",
            f"{_diff(g['vs_same'])} pts vs uniform at 0.5", _gain_verdict(g["vs_same"]))
    g = _find(gs, "mms_proxy", None)
    if g is not None:
        add(f"A cheap online proxy makes in-batch MMS pay (`mms_proxy`, budget {g['budget']:g}; this project's "
            "own claim)", f"{_acc(g)}%, {_diff(g['vs_same'])} pts vs uniform at the same steps, "
            f"{_diff(g['vs_time'])} vs uniform at the same wall-clock", _gain_verdict(g["vs_time"]))
    g = _find(gs, "selective_backprop", None)
    if g is not None:
        add(f"Selective-Backprop: a large speed-up to a target error (budget {g['budget']:g})",
            f"{_acc(g)}% ({_diff(g['vs_same'])} pts vs uniform at the same steps) in "
            f"{g['wall_ratio'] or float('nan'):.2f}× uniform's full wall-clock; {_reach(g)}", _speed_verdict(g))
    for setting in dict.fromkeys(g["setting"] for g in gs):
        rg = [g for g in gs if g["setting"] == setting and g["label"] != "uniform" and g["vs_time"] is not None
              and g["vs_time"]["std"] is not None]
        if rg:
            best = max(rg, key=lambda g: g["vs_time"]["mean"])
            add(f"Selection beats uniform sampling at equal wall-clock: {setting} (best of {len(rg)} rows; this "
                "project's question)",
                f"`{best['label']}` at {best['budget']:g}: {_acc(best)}%, {_diff(best['vs_time'])} pts vs uniform at "
                f"the same wall-clock ({_diff(best['vs_same'])} at the same steps); {_reach(best)}",
                _gain_verdict(best["vs_time"]))
    return rows


# ----------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------

def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def _band(rs: list[RunResult]) -> tuple[list[float], list[float], list[float]]:
    """Seed-mean curve of test accuracy against wall-clock with its seed std: the runs of
    a group share their evaluation steps (in the fixed-epochs framing, their fractions of
    the epochs), so evaluation i is averaged across seeds."""
    n = min(len(r.curve) for r in rs)
    xs = [statistics.fmean(r.curve[i]["train_s"] for r in rs) for i in range(n)]
    accs = [[r.curve[i]["test_acc"] for r in rs] for i in range(n)]
    return xs, [statistics.fmean(a) for a in accs], [_std(a) for a in accs]


def plot_curves(results: list[RunResult], out: Path) -> list[Path]:
    """``acc_vs_wallclock.png``: one row of panels per setting (model, regime, schedule
    length), test accuracy against training wall-clock, seed means with ±1 std bands.
    The epoch-style strategies (scores from the training forward) and the in-batch ones
    (a scoring forward per candidate batch) get separate panels; uniform at the full
    budget is the thick black line, uniform at smaller budgets dashed gray; the dotted
    lines mark the target: uniform's full-budget accuracy and 0.6x its wall-clock."""
    settings = list(dict.fromkeys(r.summary["setting"] for r in results))
    if not settings:
        return []
    labels = list(dict.fromkeys(r.spec.label for r in results if r.spec.strategy != "uniform"
                                or r.spec.augment != "none"))
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}

    def style_of(r):
        return "in-batch" if STRATEGIES[r.spec.strategy].style == "batch" else "epoch"

    panels = []
    for st in settings:
        rs = [r for r in results if r.summary["setting"] == st]
        kinds = [k for k in ("epoch", "in-batch") if any(style_of(r) == k and r.spec.label != "uniform" for r in rs)]
        panels.append((st, rs, kinds or ["epoch"]))
    cols = max(len(k) for _, _, k in panels)
    fig = _figure(7.0 * cols, 4.6 * len(panels))
    axes = fig.subplots(len(panels), cols, squeeze=False)
    for row, (st, rs, kinds) in enumerate(panels):
        ref = [r for r in rs if r.spec.is_reference]
        target = statistics.fmean(r.summary["final_acc"] for r in ref) if ref else None
        ref_s = statistics.fmean(r.summary["train_s"] for r in ref) if ref else None
        for col in range(cols):
            ax = axes[row][col]
            if col >= len(kinds):
                ax.set_visible(False)
                continue
            kind = kinds[col]
            shown = [r for r in rs if r.spec.label == "uniform" or style_of(r) == kind]
            keys = list(dict.fromkeys((r.spec.label, r.spec.budget) for r in shown))
            finals = []
            for label, budget in keys:
                grp = [r for r in shown if (r.spec.label, r.spec.budget) == (label, budget)]
                xs, ys, sd = _band(grp)
                finals.append(ys[-1])
                if label == "uniform" and budget == 1.0:
                    kw = dict(color="black", linewidth=2.6, zorder=5, label="uniform, full budget")
                elif label == "uniform":
                    kw = dict(color="0.35" if budget >= 0.5 else "0.6", linewidth=1.6, zorder=4,
                              linestyle="--" if budget >= 0.5 else ":", label=f"uniform, budget {budget:g}")
                else:
                    kw = dict(color=colors[label], linewidth=1.4, label=f"{label}, budget {budget:g}",
                              linestyle="-" if budget >= 0.5 else "-.")
                ax.plot(xs, ys, marker=".", markersize=4, **kw)
                if len(grp) > 1:
                    ax.fill_between(xs, [y - d for y, d in zip(ys, sd)], [y + d for y, d in zip(ys, sd)],
                                    color=kw["color"], alpha=0.15, linewidth=0)
            if target is not None:
                ax.axhline(target, color="black", linewidth=0.8, linestyle=":")
                ax.axvline(TIME_TARGET * ref_s, color="black", linewidth=0.8, linestyle=":")
            low = min(finals + ([target] if target is not None else []))
            top = max(finals + ([target] if target is not None else []))
            ax.set_ylim(max(0.0, low - 0.05), min(1.0, top + 0.015))
            ax.set_xlim(left=0)
            ax.set_xlabel("training wall-clock (s)")
            ax.set_ylabel("test accuracy")
            seeds = len({r.spec.seed for r in rs})
            ax.set_title(f"{st}: {kind} strategies ({seeds} seed{'s' if seeds > 1 else ''}, mean ± std)",
                         fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = out / "acc_vs_wallclock.png"
    fig.savefig(path, dpi=100)
    return [path]


def plot_mms(results: list[RunResult], out: Path) -> Optional[Path]:
    """The MMS paper's progress monitor: quantiles (10/25/50/75/90%) of the candidate
    batches' Minimal Margin Score over training, one panel per MMS run (first seed,
    no augmentation when there is such a run)."""
    rs = [r for r in results if r.mms_trace]
    if not rs:
        return None
    plain = [r for r in rs if r.spec.augment == "none"]
    rs = plain or rs
    seed0 = min(r.spec.seed for r in rs)
    rs = [r for r in rs if r.spec.seed == seed0][:6]
    fig = _figure(5 * len(rs), 3.8)
    axes = fig.subplots(1, len(rs), squeeze=False)[0]
    for ax, r in zip(axes, rs):
        steps = [t["step"] for t in r.mms_trace]
        q = {k: [t.get(k, float("nan")) for t in r.mms_trace] for k in ("q10", "q25", "q50", "q75", "q90")}
        ax.fill_between(steps, q["q10"], q["q90"], alpha=0.2, color="C0", label="10-90%")
        ax.fill_between(steps, q["q25"], q["q75"], alpha=0.4, color="C0", label="25-75%")
        ax.plot(steps, q["q50"], color="C0", label="median")
        ax.set_xlabel("training step")
        ax.set_ylabel("MMS of the candidate batch")
        ax.set_title(f"{r.spec.model} {r.spec.label}, budget {r.spec.budget:g}, seed {r.spec.seed}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "mms_distribution.png"
    fig.savefig(path, dpi=110)
    return path


def plot_importance(results: list[RunResult], data: BenchData, out: Path) -> Optional[Path]:
    """The CDF paper's visualisation: the training samples the final model finds most
    important (highest loss, the importance CDF sampling draws by) and least important."""
    r = next((r for r in results if r.importance is not None), None)
    if r is None:
        return None
    imp = r.importance
    k = len(imp["most"])
    if k == 0 or data.train_x.dim() != 4 or data.train_x.shape[1] not in (1, 3):
        return None  # not images
    fig = _figure(1.25 * k + 1.2, 4.2)
    axes = fig.subplots(2, k, squeeze=False)
    fig.subplots_adjust(left=1.2 / (1.25 * k + 1.2), right=0.99, top=0.83, bottom=0.02, hspace=0.45, wspace=0.1)
    rows = ((0, "most", "most important\n(highest loss)"), (1, "least", "least important\n(lowest loss)"))
    for row, key, name in rows:
        for j, i in enumerate(imp[key].tolist()):
            ax = axes[row][j]
            img = data.train_x[i]
            ax.imshow(img[0].numpy() if img.shape[0] == 1 else
                      ((img - img.min()) / (img.max() - img.min()).clamp_min(1e-12)).permute(1, 2, 0).numpy(),
                      cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{data.classes[int(data.train_y[i])]}\n{float(imp['loss'][i]):.3g}", fontsize=6)
        box = axes[row][0].get_position()
        fig.text(0.01, (box.y0 + box.y1) / 2, name, fontsize=8, va="center", ha="left")
    s = r.spec
    fig.suptitle(f"Training samples ranked by their loss under the final model of {s.model} {s.label}, "
                 f"budget {s.budget:g}, seed {s.seed} (CDF sampling's importance; titles: label, loss)", fontsize=8)
    path = out / "importance_grid.png"
    fig.savefig(path, dpi=120)
    return path


def write_mms_csv(results: list[RunResult], path: Path) -> Optional[Path]:
    rows = [(r, t) for r in results for t in r.mms_trace]
    if not rows:
        return None
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "label", "budget", "seed", "step", "train_s", "q10", "q25", "q50", "q75", "q90"])
        for r, t in rows:
            w.writerow([r.spec.model, r.spec.label, r.spec.budget, r.spec.seed, t["step"], f"{t['train_s']:.3f}"]
                       + [f"{t.get(k, float('nan')):.5g}" for k in ("q10", "q25", "q50", "q75", "q90")])
    return path


def write_all(results: list[RunResult], skipped: dict[str, str], cfg: BenchConfig, data: BenchData, out,
              env: Optional[dict] = None) -> dict:
    """Writes every output to ``out``; returns ``{"csv", "md", "pngs", "text"}``
    (``text``: the Markdown, also printed by the CLI)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    annotate(results)
    csv_path = out / "train_bench.csv"
    write_csv(results, csv_path)
    pngs = plot_curves(results, out)
    for extra in (plot_mms(results, out), plot_importance(results, data, out)):
        if extra is not None:
            pngs.append(extra)
    mms_csv = write_mms_csv(results, out / "mms_trace.csv")
    md_path = out / "train_bench.md"
    files = [csv_path.name] + ([mms_csv.name] if mms_csv else []) + [p.name for p in pngs]
    text = markdown(results, skipped, cfg, env, files)
    md_path.write_text(text)
    return {"csv": csv_path, "md": md_path, "pngs": pngs, "text": text}
