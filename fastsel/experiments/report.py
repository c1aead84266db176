"""Outputs of the end-to-end benchmark: a CSV of every evaluation of every run, a Markdown
summary (strategy × budget), PNG plots (accuracy against wall-clock and against samples
forwarded, per budget; the MMS distribution over training; the most and least important
training samples) and the verdict on the two targets.

Time to accuracy: for each run, the training-clock time of its first evaluation whose
test accuracy reaches the final accuracy of the full-budget uniform run without
augmentation of the same model and seed (the *reference*), and that time as a fraction
of the reference's training wall-clock. A run of budget b is evaluated at
``ceil(evals * b)`` points, so the time is resolved to 1/``evals`` of the full budget's steps.
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
           "targets", "plot_curves", "plot_mms", "plot_importance", "write_all", "environment"]

TIME_TARGET = 0.6        # reach the reference's accuracy in <= 0.6x its wall-clock
SCORE_TARGET_PCT = 3.0   # fastsel.score <= 3% of the step time

CSV_COLUMNS = (
    "model", "augment", "strategy", "label", "budget", "seed", "epochs_full", "train_samples", "steps", "full_steps",
    "eval", "step", "passes", "train_s", "train_cpu_s", "samples_scored", "samples_trained", "samples_forwarded",
    "test_acc", "test_loss", "final", "final_acc", "run_train_s", "run_train_cpu_s", "step_ms", "score_s",
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
    refs = {(r.spec.model, r.spec.seed): r for r in results if r.spec.is_reference}
    for r in results:
        ref = refs.get((r.spec.model, r.spec.seed))
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
                    "model": sp.model, "augment": sp.augment, "strategy": sp.strategy, "label": sp.label,
                    "budget": sp.budget, "seed": sp.seed, "epochs_full": s["epochs_full"],
                    "train_samples": s["train_samples"], "steps": s["steps"], "full_steps": s["full_steps"],
                    "eval": i, "step": row["step"], "passes": _f(row["passes"], 4), "train_s": _f(row["train_s"], 3),
                    "train_cpu_s": _f(row["train_cpu_s"], 3), "samples_scored": row["samples_scored"],
                    "samples_trained": row["samples_trained"],
                    "samples_forwarded": row["samples_scored"] + row["samples_trained"],
                    "test_acc": _f(row["test_acc"], 5), "test_loss": _f(row["test_loss"], 5),
                    "final": int(i == len(r.curve) - 1), "final_acc": _f(s["final_acc"], 5),
                    "run_train_s": _f(s["train_s"], 3), "run_train_cpu_s": _f(s["train_cpu_s"], 3),
                    "step_ms": _f(s["step_ms"], 3), "score_s": _f(s["score_s"], 4),
                    "select_fwd_s": _f(s["select_fwd_s"], 4), "select_other_s": _f(s["select_other_s"], 4),
                    "plan_s": _f(s["plan_s"], 4), "aux_s": _f(s["aux_s"], 4),
                    "score_pct": _f(s["score_pct"], 3), "select_pct": _f(s["select_pct"], 3),
                    "target_acc": _f(s.get("target_acc"), 5), "reference_train_s": _f(s.get("reference_train_s"), 3),
                    "time_to_target_s": _f(s.get("time_to_target_s"), 3),
                    "time_to_target_ratio": _f(s.get("time_to_target_ratio"), 4), "speedup": _f(s.get("speedup"), 3),
                })


def _f(v, digits: int):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else str(v)
    return v


# ----------------------------------------------------------------------------------
# Aggregation over seeds
# ----------------------------------------------------------------------------------

def groups(results: list[RunResult]) -> list[dict]:
    """One entry per (model, strategy + augmentation, budget), aggregated over seeds, in
    the order the runs were given."""
    out: dict[tuple, list[RunResult]] = {}
    for r in results:
        out.setdefault((r.spec.model, r.spec.label, r.spec.budget), []).append(r)
    rows = []
    for (model, label, budget), rs in out.items():
        acc = [r.summary["final_acc"] for r in rs]
        ratios = [r.summary.get("time_to_target_ratio") for r in rs]
        speed = [r.summary.get("speedup") for r in rs]
        has_ref = all(r.summary.get("target_acc") is not None for r in rs)
        reached = [x for x in ratios if x is not None]
        every_seed = bool(reached) and len(reached) == len(rs)
        timed = [r for r in rs if r.summary["train_s"] > 0]
        rows.append({
            "model": model, "label": label, "strategy": rs[0].spec.strategy, "augment": rs[0].spec.augment,
            "budget": budget, "seeds": len(rs), "acc_mean": statistics.fmean(acc),
            "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "train_s": statistics.fmean(r.summary["train_s"] for r in rs),
            "train_cpu_s": statistics.fmean(r.summary["train_cpu_s"] for r in rs),
            "has_reference": has_ref, "reached": len(reached),
            "ratio": statistics.fmean(reached) if every_seed else None,
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
        })
    return rows


def _acc(g: dict) -> str:
    return f"{100 * g['acc_mean']:.2f} ± {100 * g['acc_std']:.2f}"


def _tta(g: dict) -> str:
    if not g["has_reference"]:
        return "n/a"
    if g["ratio"] is not None:
        return f"{g['ratio']:.2f}×"
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
    gs = [g for g in groups(results) if g["has_reference"]]
    if not gs:
        lines.append(f"Target 2, reach the full-budget uniform accuracy in ≤ {TIME_TARGET:g}× its wall-clock: "
                     "**not evaluated** (the grid has no full-budget uniform run without augmentation).")
        return lines
    candidates = [g for g in gs if not (g["strategy"] == "uniform" and g["augment"] == "none")]
    met = [g for g in candidates if g["ratio"] is not None and g["ratio"] <= TIME_TARGET]
    head = f"Target 2, reach the full-budget uniform accuracy in ≤ {TIME_TARGET:g}× its wall-clock: "
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
    models = list(dict.fromkeys(g["model"] for g in gs))
    budgets = sorted({g["budget"] for g in gs}, reverse=True)
    for model in models:
        mg = [g for g in gs if g["model"] == model]
        labels = list(dict.fromkeys(g["label"] for g in mg))
        by = {(g["label"], g["budget"]): g for g in mg}
        out += [f"## {model}: final test accuracy % (mean ± std over seeds) · training wall-clock s", "",
                "| strategy | " + " | ".join(f"budget {b:g}" for b in budgets) + " |",
                "|---|" + "---:|" * len(budgets)]
        for label in labels:
            cells = []
            for b in budgets:
                g = by.get((label, b))
                cells.append("—" if g is None else f"{_acc(g)} · {g['train_s']:.1f} s")
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out += ["", f"## {model}: details", "",
                "| strategy | budget | seeds | final acc % | wall-clock s | CPU s | time to uniform's acc "
                "(× its wall-clock) | speedup | `fastsel.score` % of step | selection % of step (scoring fwd %) "
                "| samples scored | samples trained |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for label in labels:
            for b in budgets:
                g = by.get((label, b))
                if g is None:
                    continue
                out.append(f"| {label} | {b:g} | {g['seeds']} | {_acc(g)} | {g['train_s']:.1f} "
                           f"| {g['train_cpu_s']:.1f} "
                           f"| {_tta(g)} | {_speedup(g)} | {g['score_pct']:.2f} | {g['select_pct']:.1f} "
                           f"({g['fwd_pct']:.1f}) | {_count(g['scored'])} | {_count(g['trained'])} |")
        out.append("")
    out += ["## How to read this", "",
            "* Every run takes exactly round(budget × full steps) optimizer steps with the learning-rate schedule "
            "compressed to them (linear warm-up over 2% of the steps, linear decay to 0).",
            "* Wall-clock is the training clock (evaluations excluded): data, augmentation, selection (its scoring "
            "forwards included), planning and the steps. CPU s is the process CPU time (all threads) over the "
            "same spans.",
            "* Time to uniform's accuracy: first evaluation at which the run's test accuracy reaches the final "
            "accuracy of the full-budget uniform run (no augmentation, same model and seed), as a fraction of that "
            f"run's wall-clock; target ≤ {TIME_TARGET:g}×. Speedup is the inverse. Resolution: "
            f"1/{cfg.evals} of the full budget's steps.",
            "* `fastsel.score` % of step: time inside `fastsel.score` in the training step over the training clock "
            f"(target ≤ {SCORE_TARGET_PCT:g}%). Selection %: the selector's call (scoring forward, its "
            "`fastsel.score`, the choice) plus epoch planning; in parentheses the scoring forwards alone (the "
            "selector's, plus epoch planning, which is DynaMS's whole-set scoring and negligible otherwise).",
            "* Samples scored: forwarded in inference mode for selection; samples trained: forwarded and "
            "backpropagated.", ""]
    out += ["## Strategies", ""]
    for name in dict.fromkeys(g["strategy"] for g in gs):
        out.append(f"* `{name}`: {STRATEGIES[name].description}")
    if skipped:
        out += ["", "Not run (not importable):", ""] + [f"* `{k}`: {v}" for k, v in skipped.items()]
    if files:
        out += ["", "## Files", ""] + [f"* `{f}`" for f in files]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------

def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def _mean_curve(rs: list[RunResult], key: str) -> tuple[list[float], list[float]]:
    """Seed-mean curve: evaluations of a group share their step counts."""
    n = min(len(r.curve) for r in rs)
    xs = [statistics.fmean(r.curve[i][key] if key != "samples_forwarded" else
                           r.curve[i]["samples_scored"] + r.curve[i]["samples_trained"] for r in rs) for i in range(n)]
    ys = [statistics.fmean(r.curve[i]["test_acc"] for r in rs) for i in range(n)]
    return xs, ys


def plot_curves(results: list[RunResult], out: Path) -> list[Path]:
    """One PNG per budget: test accuracy against training wall-clock (left) and against
    samples forwarded, scoring + training (right), one row per model, seed-mean curves."""
    paths = []
    colors = {label: f"C{i % 10}" for i, label in enumerate(dict.fromkeys(r.spec.label for r in results))}
    by_budget: dict[float, list[RunResult]] = {}
    for r in results:
        by_budget.setdefault(r.spec.budget, []).append(r)
    for budget, rs in sorted(by_budget.items(), reverse=True):
        models = list(dict.fromkeys(r.spec.model for r in rs))
        fig = _figure(12, 4.2 * len(models))
        axes = fig.subplots(len(models), 2, squeeze=False)
        for row, model in enumerate(models):
            mr = [r for r in rs if r.spec.model == model]
            labels = list(dict.fromkeys(r.spec.label for r in mr))
            ref = [r for r in results if r.spec.model == model and r.spec.is_reference]
            target = statistics.fmean(r.summary["final_acc"] for r in ref) if ref else None
            finals = min(r.summary["final_acc"] for r in mr)
            ymin = max(0.0, finals - 0.08)  # the region near the target; early points fall below
            if target is not None:
                ymin = max(0.0, min(ymin, target - 0.08))
            for col, key in enumerate(("train_s", "samples_forwarded")):
                ax = axes[row][col]
                for label in labels:
                    xs, ys = _mean_curve([r for r in mr if r.spec.label == label], key)
                    ax.plot(xs, ys, marker=".", label=label, color=colors[label],
                            linestyle="--" if "+" in label else "-")
                if target is not None:
                    ax.axhline(target, color="gray", linewidth=0.8, linestyle=":")
                    if ref:
                        ref_s = statistics.fmean(r.summary["train_s"] for r in ref)
                        if key == "train_s":
                            ax.axvline(0.6 * ref_s, color="gray", linewidth=0.8, linestyle=":")
                top = max(max(r.summary["final_acc"] for r in mr), target or 0.0)
                ax.set_ylim(ymin, min(1.0, top + 0.02))
                ax.set_xlabel("training wall-clock (s)" if key == "train_s"
                              else "samples forwarded (scoring + training)")
                ax.set_ylabel("test accuracy")
                ax.set_title(f"{model}, budget {budget:g}" + (": dotted = uniform's final accuracy, 0.6× its time"
                                                              if target is not None and key == "train_s" else ""),
                             fontsize=9)
                ax.grid(alpha=0.3)
            axes[row][0].legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path = out / f"acc_vs_wallclock_budget_{budget:g}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


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
    if k == 0:
        return None
    fig = _figure(1.25 * k + 1.2, 4.2)
    axes = fig.subplots(2, k, squeeze=False)
    fig.subplots_adjust(left=1.2 / (1.25 * k + 1.2), right=0.99, top=0.83, bottom=0.02, hspace=0.45, wspace=0.1)
    rows = ((0, "most", "most important\n(highest loss)"), (1, "least", "least important\n(lowest loss)"))
    for row, key, name in rows:
        for j, i in enumerate(imp[key].tolist()):
            ax = axes[row][j]
            ax.imshow(data.train_x[i, 0].numpy(), cmap="gray")
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
