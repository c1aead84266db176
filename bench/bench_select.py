#!/usr/bin/env python
"""Microbenchmark of fastsel's selection ops against the PyTorch calls they replace.

On N = 2^20 loss-like scores with k = N/10: ``fastsel.sample`` without and with
replacement vs ``torch.multinomial``, ``fastsel.select_topk`` vs ``torch.topk`` and
``fastsel.percentile`` vs ``torch.searchsorted`` on a sorted history of R = 1024 values;
on logits [65536, C] (C = 100 and 1000) with k = N/10: ``fastsel.select(by="loss")`` vs
``fastsel.score`` + ``torch.topk`` and vs ``F.cross_entropy(reduction="none")`` +
``torch.topk``. Every fastsel op runs on the ``cpu`` backend (the C++ kernels) and on the
``torch`` backend (the pure-PyTorch reference). CPU only.

The methods of one comparison are timed interleaved, round by round (the timing helpers
of bench_score.py), and each ratio is the median over rounds of method sample / baseline
sample. Writes a table to stdout and ``select_bench.{csv,md,png}`` to ``--out``.
Run ``python bench/bench_select.py --help`` for the options; bench/README.md explains
how to read the output.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import random
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional

import matplotlib
import matplotlib.ticker
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:  # imported from elsewhere (e.g. a test)
    sys.path.insert(0, str(BENCH_DIR))
from bench_score import (  # noqa: E402  (also imports fastsel, or this checkout's sources)
    BUSY_LOAD_AVERAGE,
    SHUFFLE_SEED,
    calibrate,
    environment,
    fastsel,
    fmt_ms,
    sample_rounds,
    usable_cores,
    write_csv,
)

CPU_BACKENDS = ("cpu", "torch")
FASTSEL_PREFIX = "fastsel-"
N_SCORES = 1 << 20  # the N
N_SELECT = 65536  # rows of the logits for fastsel.select: an in-batch size
SELECT_CLASSES = (100, 1000)
HISTORY_SIZE = 1024  # R
QUICK_N_SCORES = 1 << 14
QUICK_N_SELECT = 2048
QUICK_SELECT_CLASSES = (100,)
TIME_BUDGET_S = 3.0  # per method of a comparison, after warm-up
QUICK_TIME_BUDGET_S = 0.05
# `make bench`'s default: the README's headline N (2^20 scores), select on one class count.
REPRESENTATIVE_SELECT_CLASSES = (1000,)
REPRESENTATIVE_TIME_BUDGET_S = 0.5
SAMPLES_PER_BUDGET = 30  # a sample (several calls for fast ops) takes budget / 30
DATA_SEED = 0  # inputs
SAMPLE_SEED = 1234  # fastsel.sample's seed; its counter changes on every call
MULTINOMIAL_SEED = 1  # the torch.Generator that torch.multinomial consumes
TARGET = 0.5  # sample (no replacement) time <= 0.5x torch.multinomial(replacement=False)

MULTINOMIAL = "torch.multinomial"
TOPK = "torch.topk"
SEARCHSORTED = "torch.searchsorted / R"
SCORE_TOPK = "fastsel.score + torch.topk"
CE_TOPK = "F.cross_entropy + torch.topk"


@dataclasses.dataclass
class Comparison:
    """The methods timed together, interleaved; ratios are taken against each baseline."""

    op: str
    n: int
    k: int
    c: Optional[int]  # classes of the logits, for select
    baselines: tuple[str, ...]  # the first is the main one
    steps: dict[str, Callable[[], object]]  # method -> one call

    @property
    def title(self) -> str:
        return f"{self.op} N={self.n}" + (f" C={self.c}" if self.c else "")


def fastsel_methods(backends: list[str]) -> dict[str, str]:
    return {FASTSEL_PREFIX + backend: backend for backend in backends}


# ----------------------------------------------------------------------------------
# Inputs and the calls that are timed
# ----------------------------------------------------------------------------------


def loss_like(n: int, generator: torch.Generator) -> torch.Tensor:
    """Positive, skewed values like per-sample losses: Exp(1), float32."""
    return torch.empty(n).exponential_(generator=generator)


def sample_comparison(scores, k, backends, replacement: bool) -> Comparison:
    steps = {}
    for method, backend in fastsel_methods(backends).items():
        counters = itertools.count(1)  # fresh draws on every call

        def step(backend=backend, counters=counters):
            return fastsel.sample(scores, k, replacement=replacement, seed=SAMPLE_SEED,
                                  counter=next(counters), backend=backend)

        steps[method] = step
    generator = torch.Generator().manual_seed(MULTINOMIAL_SEED)
    steps[MULTINOMIAL] = lambda: torch.multinomial(scores, k, replacement, generator=generator)
    op = "sample, replacement" if replacement else "sample, no replacement"
    return Comparison(op, scores.numel(), k, None, (MULTINOMIAL,), steps)


def topk_comparison(scores, k, backends) -> Comparison:
    steps = {method: (lambda backend=backend: fastsel.select_topk(scores, k, backend=backend))
             for method, backend in fastsel_methods(backends).items()}
    steps[TOPK] = lambda: torch.topk(scores, k)
    return Comparison("select_topk", scores.numel(), k, None, (TOPK,), steps)


def make_history(scores: torch.Tensor, generator: torch.Generator) -> fastsel.History:
    """A full History of R recent losses, pushed in two batches (so it has wrapped)."""
    history = fastsel.History(HISTORY_SIZE)
    history.push(loss_like(HISTORY_SIZE * 3 // 4, generator))
    history.push(loss_like(HISTORY_SIZE * 3 // 4, generator))
    return history


def searchsorted_percentile(values, sorted_history) -> torch.Tensor:
    below = torch.searchsorted(sorted_history, values, side="left")
    return below.to(torch.float32) / sorted_history.numel()


def percentile_comparison(scores, history: fastsel.History, backends) -> Comparison:
    # fastsel gets the History (its ring buffer, unsorted); the baseline a pre-sorted copy
    sorted_history = torch.sort(history.values).values
    steps = {method: (lambda backend=backend: fastsel.percentile(scores, history, backend=backend))
             for method, backend in fastsel_methods(backends).items()}
    steps[SEARCHSORTED] = lambda: searchsorted_percentile(scores, sorted_history)
    return Comparison(f"percentile, R={HISTORY_SIZE}", scores.numel(), 0, None,
                      (SEARCHSORTED,), steps)


def make_logits(n: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(DATA_SEED * 1_000_003 + n * 100_003 + c)
    logits = torch.randn(n, c, generator=generator).mul_(3.0)
    target = torch.randint(0, c, (n,), generator=generator)
    return logits, target


def select_comparison(logits, target, k, backends, score_backend: str) -> Comparison:
    steps = {method: (lambda backend=backend: fastsel.select(logits, target, k, by="loss",
                                                             backend=backend))
             for method, backend in fastsel_methods(backends).items()}
    steps[SCORE_TOPK] = lambda: torch.topk(
        fastsel.score(logits, target, backend=score_backend).loss, k)
    steps[CE_TOPK] = lambda: torch.topk(F.cross_entropy(logits, target, reduction="none"), k)
    n, c = logits.shape
    return Comparison("select by loss, topk", n, k, c, (SCORE_TOPK, CE_TOPK), steps)


# ----------------------------------------------------------------------------------
# Sanity checks: fastsel must do the work its baseline does, or the timings mean nothing
# ----------------------------------------------------------------------------------


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"sanity check failed: {message}")


def check_sample(scores, k, backends, replacement: bool) -> None:
    picked = {b: fastsel.sample(scores, k, replacement=replacement, seed=SAMPLE_SEED, counter=0,
                                backend=b).indices for b in backends}
    what = f"sample(replacement={replacement})"
    for backend, idx in picked.items():
        check(idx.numel() == k and bool((idx >= 0).all()) and bool((idx < scores.numel()).all()),
              f"{what}[{backend}] returned indices out of range or not k of them")
        if not replacement:
            check(idx.unique().numel() == k, f"{what}[{backend}] repeats an index")
    first = picked[backends[0]]
    for backend, idx in picked.items():  # one seed selects the same samples on every backend
        check(torch.equal(idx, first), f"{what}: backends {backends[0]} and {backend} differ")
    generator = torch.Generator().manual_seed(MULTINOMIAL_SEED)
    reference = torch.multinomial(scores, k, replacement, generator=generator)
    # both draw with P proportional to the score: the mean picked score must agree
    ours, theirs = scores[first].mean().item(), scores[reference].mean().item()
    check(abs(ours / theirs - 1) < 0.1 and ours > 1.2 * scores.mean().item(),
          f"{what}: mean picked score {ours:.3f}, torch.multinomial's {theirs:.3f}")


def check_topk(scores, k, backends, generator) -> None:
    distinct = torch.randperm(scores.numel(), generator=generator).to(torch.float32)
    expected = set(torch.topk(distinct, k).indices.tolist())
    expected_values = torch.topk(scores, k).values  # sorted, largest first
    for backend in backends:
        got = fastsel.select_topk(distinct, k, backend=backend).indices
        check(set(got.tolist()) == expected,
              f"select_topk[{backend}]: index set differs from torch.topk's (distinct scores)")
        got = fastsel.select_topk(scores, k, backend=backend).indices
        check(torch.equal(scores[got], expected_values),
              f"select_topk[{backend}]: values differ from torch.topk's")


def check_percentile(scores, history: fastsel.History, backends) -> None:
    expected = searchsorted_percentile(scores, torch.sort(history.values).values)
    for backend in backends:
        got = fastsel.percentile(scores, history, backend=backend)
        check(torch.equal(got, expected), f"percentile[{backend}] != searchsorted(...) / R")


def check_select(logits, target, k, backends) -> None:
    loss = F.cross_entropy(logits, target, reduction="none")
    eager = set(torch.topk(loss, k).indices.tolist())
    for backend in backends:
        sel = fastsel.select(logits, target, k, by="loss", backend=backend)
        got = sel.scores.loss
        torch.testing.assert_close(got, loss, rtol=1e-4, atol=1e-5)
        check(torch.equal(got[sel.indices], torch.topk(got, k).values),
              f"select[{backend}] did not pick the top-k of its own losses")
        overlap = len(eager & set(sel.indices.tolist()))
        check(overlap >= 0.99 * k, f"select[{backend}] shares {overlap} of {k} picks with "
                                   "F.cross_entropy + torch.topk")


# ----------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Timing:
    samples_s: tuple[float, ...]  # per-call time of each round's sample, in round order
    calls_per_sample: int

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)


def paired_ratio(method: Timing, baseline: Timing) -> float:
    """Median over rounds of method sample / baseline sample (same rounds, so drift cancels)."""
    return statistics.median(a / b for a, b in zip(method.samples_s, baseline.samples_s))


def time_comparison(comparison: Comparison, min_repeats: int, budget_s: float,
                    rng: random.Random, progress: tqdm) -> dict[str, Timing]:
    """Warm-up and calibration per method, then interleaved rounds (bench_score's helpers)."""
    calls = {}
    for method, step in comparison.steps.items():
        progress.set_description(f"{comparison.title}: warm-up {method}")
        calls[method] = calibrate(step, budget_s / SAMPLES_PER_BUDGET).calls_per_sample
    progress.set_description(f"{comparison.title}: {len(calls)} methods interleaved")
    samples = sample_rounds(comparison.steps, calls, min_repeats,
                            budget_s * len(comparison.steps), rng)
    return {method: Timing(tuple(samples[method]), calls[method]) for method in calls}


# ----------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------


def summarize(results: list[tuple[Comparison, dict[str, Timing], float]]) -> list[dict]:
    """Per comparison: its main baseline, then each method against each baseline."""
    rows = []
    for comparison, timings, load_average in results:
        main = comparison.baselines[0]
        pairs = [(main, None)] + [
            (method, baseline) for baseline in comparison.baselines
            for method in comparison.steps if method != baseline
            and not (baseline != main and method == main)  # shown once, against main
        ]
        for method, baseline in pairs:
            timing = timings[method]
            rows.append({
                "op": comparison.op,
                "n": comparison.n,
                "c": comparison.c,
                "k": comparison.k or None,
                "method": method,
                "median_ms": timing.median_s * 1e3,
                "baseline": baseline,
                "baseline_ms": timings[baseline].median_s * 1e3 if baseline else None,
                "ratio_vs_baseline": (paired_ratio(timing, timings[baseline])
                                      if baseline else None),
                "repeats": len(timing.samples_s),
                "calls_per_repeat": timing.calls_per_sample,
                "load_avg_1min_after": load_average,
            })
    return rows


COLUMNS = [  # (row key, header, format, alignment)
    ("op", "op", str, "<"),
    ("n", "N", str, ">"),
    ("c", "C", str, ">"),
    ("k", "k", str, ">"),
    ("method", "method", str, "<"),
    ("median_ms", "median ms", fmt_ms, ">"),
    ("ratio_vs_baseline", "x baseline", lambda v: f"{v:.3f}x", ">"),
    ("baseline", "baseline (same rounds)", str, "<"),
    ("repeats", "repeats", str, ">"),
    ("load_avg_1min_after", "load after", lambda v: f"{v:.1f}", ">"),
]


def table_cells(rows: list[dict]) -> list[list[str]]:
    body = [[fmt(row[key]) if row[key] not in (None, "") else "-" for key, _, fmt, _ in COLUMNS]
            for row in rows]
    for line, row in zip(body, rows):
        if row["baseline"] is None:
            line[[key for key, *_ in COLUMNS].index("baseline")] = "(is the baseline)"
    return [[header for _, header, _, _ in COLUMNS], *body]


def text_table(rows: list[dict]) -> str:
    cells = table_cells(rows)
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    aligns = [align for *_, align in COLUMNS]
    lines = ["  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(line, aligns, widths)).rstrip()
             for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    cells = table_cells(rows)
    lines = ["| " + " | ".join(line) + " |" for line in cells]
    lines.insert(1, "|" + "|".join("---" if a == "<" else "---:" for *_, a in COLUMNS) + "|")
    return "\n".join(lines)


def target_line(rows: list[dict], fastsel_method: str) -> str:
    description = f"sample <= {TARGET}x torch.multinomial"
    for row in rows:
        if (row["op"] == "sample, no replacement" and row["method"] == fastsel_method
                and row["baseline"] == MULTINOMIAL):
            ratio = row["ratio_vs_baseline"]
            verdict = "met" if ratio <= TARGET else "missed"
            return (f"{description}: measured {ratio:.3f}x -> {verdict} "
                    f"({fastsel_method}, N={row['n']}, k={row['k']}, no replacement)")
    return f"{description}: not measured"


def plot_ratios(rows: list[dict], path: Path) -> None:
    """Horizontal bars: time / baseline time of every compared method (log x)."""
    rows = [row for row in rows if row["baseline"]]
    labels = [f"{row['op']}" + (f" C={row['c']}" if row["c"] else "")
              + f": {row['method']}\n/ {row['baseline']}" for row in rows]
    ratios = [row["ratio_vs_baseline"] for row in rows]
    methods = list(dict.fromkeys(row["method"] for row in rows))
    palette = matplotlib.colormaps["tab10"]
    colors = [palette(methods.index(row["method"])) for row in rows]
    fig = Figure(figsize=(10, 0.5 * len(rows) + 1.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    y = list(range(len(rows)))[::-1]  # first row on top
    ax.barh(y, ratios, color=colors)
    for yi, ratio in zip(y, ratios):
        ax.text(ratio, yi, f" {ratio:.2f}x", va="center", fontsize=8)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.axvline(TARGET, color="tab:red", linestyle="--", linewidth=1,
               label=f"target for sample (no replacement): {TARGET}x")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    lo, hi = min(ratios + [TARGET]), max(ratios + [1.0])
    ax.set_xlim(lo / 1.5, hi * 2.5)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel("time / baseline time, median of paired per-round ratios (log; < 1 is faster)")
    ax.set_title(f"fastsel selection ops vs PyTorch, CPU ({torch.get_num_threads()} threads)")
    ax.grid(axis="x", which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=110)


def write_markdown(rows, env: dict, params: dict, target: str, path: Path) -> None:
    lines = [
        "# fastsel selection ops CPU benchmark",
        "",
        *[f"- {key}: {value}" for key, value in env.items()],
        "",
        "## Inputs",
        "",
        *[f"- {key}: {value}" for key, value in params.items()],
        "",
        "## Target",
        "",
        "```",
        target,
        "```",
        "",
        "## Results",
        "",
        "`x baseline` = median over rounds of method sample / baseline sample (per-call "
        "times): the methods of one comparison are timed interleaved, round by round. "
        "Below 1 means faster than the baseline.",
        "",
        markdown_table(rows),
        "",
        "All rows: `select_bench.csv`; plot: `select_bench.png`.",
        "",
    ]
    path.write_text("\n".join(lines))


# ----------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Microbenchmark of fastsel's selection ops (sample, select_topk, "
                    "percentile, select) against the PyTorch calls they replace, on the CPU."
    )
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: N={QUICK_N_SCORES}, select on "
                             f"{QUICK_N_SELECT}x{','.join(map(str, QUICK_SELECT_CLASSES))}, "
                             f"{QUICK_TIME_BUDGET_S} s per method")
    parser.add_argument("--representative", action="store_true",
                        help=f"the headline in a few minutes (make bench's default): N={N_SCORES}, select on "
                             f"{N_SELECT}x{','.join(map(str, REPRESENTATIVE_SELECT_CLASSES))}, "
                             f"{REPRESENTATIVE_TIME_BUDGET_S} s per method")
    parser.add_argument("--repeats", type=int, default=5,
                        help="minimum number of timed rounds, i.e. samples per method "
                             "(default 5)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results",
                        help="output directory (default bench/results)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.quick and args.representative:
        parser.error("--quick and --representative are exclusive")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(usable_cores())
    backends = [b for b in fastsel.available_backends() if b in CPU_BACKENDS]
    fastsel_method = FASTSEL_PREFIX + ("cpu" if "cpu" in backends else "torch")
    n = QUICK_N_SCORES if args.quick else N_SCORES
    n_select = QUICK_N_SELECT if args.quick else N_SELECT
    classes = (QUICK_SELECT_CLASSES if args.quick else REPRESENTATIVE_SELECT_CLASSES if args.representative
               else SELECT_CLASSES)
    k, k_select = n // 10, n_select // 10
    env = environment(backends)
    params = {
        "scores": f"N={n} float32 ~ Exp(1) (loss-like), k=N/10={k}",
        "history": f"R={HISTORY_SIZE} (fastsel: a wrapped History; baseline: pre-sorted)",
        "select": f"logits [{n_select}, C] float32 ~ 3 N(0, 1), C in "
                  f"{', '.join(map(str, classes))}, by='loss', k={k_select}",
        "seeds": f"data {DATA_SEED}, fastsel.sample seed {SAMPLE_SEED} with a new counter "
                 f"per call, torch.multinomial generator {MULTINOMIAL_SEED}",
    }
    for key, value in {**env, **params}.items():
        print(f"{key}: {value}")
    if os.getloadavg()[0] > BUSY_LOAD_AVERAGE:
        print("warning: other processes are using the CPU; timings will be noisy")

    generator = torch.Generator().manual_seed(DATA_SEED)
    scores = loss_like(n, generator)
    history = make_history(scores, generator)
    check_sample(scores, k, backends, replacement=False)
    check_sample(scores, k, backends, replacement=True)
    check_topk(scores, k, backends, generator)
    check_percentile(scores, history, backends)
    comparisons = [
        sample_comparison(scores, k, backends, replacement=False),
        sample_comparison(scores, k, backends, replacement=True),
        topk_comparison(scores, k, backends),
        percentile_comparison(scores, history, backends),
    ]
    for c in classes:
        logits, target = make_logits(n_select, c)
        check_select(logits, target, k_select, backends)
        comparisons.append(select_comparison(logits, target, k_select, backends,
                                             fastsel_method[len(FASTSEL_PREFIX):]))
    print("sanity checks passed: fastsel's results match the baselines'")

    budget_s = (QUICK_TIME_BUDGET_S if args.quick else REPRESENTATIVE_TIME_BUDGET_S if args.representative
                else TIME_BUDGET_S)
    rng = random.Random(SHUFFLE_SEED)
    results = []
    total = sum(len(comparison.steps) for comparison in comparisons)
    with tqdm(total=total, unit="method", dynamic_ncols=True) as progress:
        for comparison in comparisons:
            timings = time_comparison(comparison, args.repeats, budget_s, rng, progress)
            # includes this process's own threads: above their number, others were running
            results.append((comparison, timings, os.getloadavg()[0]))
            progress.update(len(comparison.steps))

    env["load average (1 min) at end"] = f"{os.getloadavg()[0]:.2f}"
    rows = summarize(results)
    target = target_line(rows, fastsel_method)
    print()
    print(text_table(rows))
    print()
    print(target)
    print(f"load average (1 min) at end: {env['load average (1 min) at end']}")

    args.out.mkdir(parents=True, exist_ok=True)
    outputs = [args.out / f"select_bench.{ext}" for ext in ("csv", "md", "png")]
    write_csv(rows, outputs[0])
    write_markdown(rows, env, params, target, outputs[1])
    plot_ratios(rows, outputs[2])
    print("\nwrote " + ", ".join(str(path) for path in outputs))


if __name__ == "__main__":
    main()
