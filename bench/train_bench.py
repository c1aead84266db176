#!/usr/bin/env python
"""End-to-end benchmark: does data selection beat uniform sampling in wall-clock time?

Trains a small CNN (and, with ``--full``, an MLP) on Fashion-MNIST under budgets that are
fractions of the full number of iterations, with the learning-rate schedule compressed
to the budget, for each strategy (and augmentation), and reports test accuracy against
wall-clock and against samples forwarded, final accuracy, and the time to reach the
full-budget uniform run's accuracy. The harness is ``fastsel.experiments``; its module
docstrings give every setting.

    python bench/train_bench.py            # the verdict grid, 3 seeds (~52 min on 2 quiet cores)
    python bench/train_bench.py --smoke    # 2k samples, 1 epoch, uniform + MMS (~1 min)
    python bench/train_bench.py --full     # the verdict grid + every strategy x augmentation x model
    python bench/train_bench.py --strategies uniform,mms,cdf+ricap --budgets 1,0.5 --seeds 2
    python bench/train_bench.py --strategies uniform,infobatch --regime noisy --framing epochs

The verdict grid (``harness.DEFAULT_GRID``): clean Fashion-MNIST over 5 epochs (uniform at
budgets 1, 0.5, 0.3, RICAP at 0.3, InfoBatch in both framings, the epoch-style rules and
DynaMS at 0.5, the in-batch rules at 0.3, MMS also with the aggressive schedule, the
online proxy, epoch-style MMS at 0.6), the noisy and redundant regimes, and a 20-epoch
schedule on a 15k subset.

Writes to ``--out`` (default ``bench/results/train/``): ``train_bench.csv`` (one row per
evaluation of every run), ``train_bench.md`` (the summary and the verdict on each
published claim, also printed), ``acc_vs_wallclock.png`` (a row of panels per setting), ``mms_distribution.png`` and
``mms_trace.csv`` (MMS runs), ``importance_grid.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
try:
    import fastsel  # noqa: F401
except ImportError:  # run from a checkout without installing: use its sources
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fastsel.experiments import harness, report  # noqa: E402
from fastsel.experiments.augment import AUGMENTATIONS  # noqa: E402
from fastsel.experiments.models import MODELS  # noqa: E402

DEFAULT_OUT = BENCH_DIR / "results" / "train"
SMOKE = {"subset": 2000, "test_subset": 2000, "epochs": 1, "budgets": (1.0, 0.5), "evals": 4}
FULL_SEEDS = harness.DEFAULT_SEEDS
BUSY_LOAD_AVERAGE = 0.5


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"budgets must be in (0, 1], got {text!r}")
    return values


def _seeds(text: str) -> tuple[int, ...]:
    """``3`` means seeds 0, 1, 2; a comma-separated list (``0,4``) gives the seeds."""
    try:
        if "," in text:
            return tuple(int(v) for v in text.split(",") if v.strip())
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or a comma-separated list of seeds, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"the number of seeds must be positive, got {n}")
    return tuple(range(n))


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Strategies: " + ", ".join(harness.STRATEGIES) + ". Augmentations: "
                                + ", ".join(AUGMENTATIONS) + ". Models: " + ", ".join(MODELS) + ".")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true",
                      help="the verdict grid, then every strategy x every augmentation x both models, "
                           "3 seeds (about 10 h on 2 quiet cores)")
    mode.add_argument("--smoke", action="store_true",
                      help="2k training / 2k test samples, 1 epoch, uniform + MMS, budgets 1 and 0.5")
    p.add_argument("--strategies", type=_names,
                   help="comma-separated strategies, each optionally with +augmentation (e.g. uniform+ricap); "
                        "default: the verdict grid")
    p.add_argument("--augments", type=_names,
                   help="augmentations applied to every strategy given without one (default: none)")
    p.add_argument("--budgets", type=_floats, help="comma-separated fractions of the full budget (default 1,0.5,0.3)")
    p.add_argument("--seeds", type=_seeds, help="a count (3 = seeds 0,1,2) or a list (0,4); default 3 "
                                               "(1 with --smoke or --strategies)")
    p.add_argument("--regime", choices=harness.REGIMES, default="clean",
                   help="training set of a --strategies grid: clean, noisy (30%% symmetric label noise) or "
                        "redundant (half near-duplicates of easy samples)")
    p.add_argument("--framing", choices=harness.FRAMINGS, default="steps",
                   help="steps: exactly budget x full steps; epochs: exactly --epochs passes of the sampler "
                        "(epoch-style strategies; InfoBatch's framing)")
    p.add_argument("--schedule", choices=harness.SCHEDULES, default="linear",
                   help="learning-rate decay after the warm-up: linear, or aggressive (cubic: earlier, larger)")
    p.add_argument("--models", type=_names, help="cnn and/or mlp (default cnn; both with --full)")
    p.add_argument("--epochs", type=int, help=f"epochs of the full budget (default {harness.DEFAULT_EPOCHS})")
    p.add_argument("--subset", type=int, help="train on a fixed random subset of this many samples")
    p.add_argument("--test-subset", type=int, help="evaluate on a fixed random subset of the test set")
    p.add_argument("--evals", type=int, help=f"test evaluations of a full-budget run; ceil(evals x budget), at "
                                             f"least 3, for the others (default {harness.DEFAULT_EVALS})")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, i.e. the usable cores)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--data", help="directory of the Fashion-MNIST IDX files (default: $FASTSEL_DATA, then "
                                  "/usr/share/datasets/fashion-mnist)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--report-from", type=Path, metavar="CSV",
                   help="train nothing: render the report and plots again from a train_bench.csv (and the "
                        "mms_trace.csv and the environment of the train_bench.md next to it) into --out")
    args = p.parse_args(argv)
    for name in ("epochs", "subset", "test_subset", "evals", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {v}")
    return args


def plan(args: argparse.Namespace) -> tuple[list[harness.RunSpec], harness.BenchConfig]:
    cfg = harness.BenchConfig(progress=not args.no_progress, data_root=args.data)
    if args.smoke:
        for name in ("subset", "test_subset", "epochs", "evals"):
            setattr(cfg, name, SMOKE[name])
    for name in ("epochs", "subset", "test_subset", "evals"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    custom = bool(args.strategies) or args.smoke or bool(args.augments)
    if not custom:  # the verdict grid, seed-major
        specs = harness.expand(harness.DEFAULT_GRID, args.seeds or range(harness.DEFAULT_SEEDS))
        if args.full:
            pairs = [(s, a) for s in harness.STRATEGIES for a in AUGMENTATIONS]
            specs += harness.make_grid(pairs, args.budgets or harness.DEFAULT_BUDGETS,
                                       args.seeds or range(FULL_SEEDS), args.models or tuple(MODELS))
        return specs, cfg
    if args.strategies:
        augments = args.augments or ("none",)
        pairs = []
        for item in args.strategies:
            name, _, aug = item.partition("+")
            pairs += [(name, aug)] if aug else [(name, a) for a in augments]
    elif args.full:
        pairs = [(s, a) for s in harness.STRATEGIES for a in (args.augments or AUGMENTATIONS)]
    elif args.smoke:
        pairs = list(harness.SMOKE_GRID)
    else:
        pairs = [(s, a) for s, _ in harness.PAIRS_GRID if _ == "none" for a in args.augments]
    for name, aug in pairs:
        if name not in harness.STRATEGIES:
            raise SystemExit(f"unknown strategy {name!r}; known: {', '.join(harness.STRATEGIES)}")
        if aug not in AUGMENTATIONS:
            raise SystemExit(f"unknown augmentation {aug!r}; known: {', '.join(AUGMENTATIONS)}")
    pairs = list(dict.fromkeys(pairs))
    budgets = args.budgets or (SMOKE["budgets"] if args.smoke else harness.DEFAULT_BUDGETS)
    seeds = args.seeds or (0,)
    models = args.models or ("cnn",)
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"unknown model {m!r}; known: {', '.join(MODELS)}")
    specs = harness.make_grid(pairs, budgets, seeds, models)
    if (args.regime, args.framing, args.schedule) != ("clean", "steps", "linear"):
        specs = [dataclasses.replace(s, regime=args.regime, framing=args.framing, schedule=args.schedule)
                 for s in specs]
        if args.framing == "epochs":
            batch = [s.strategy for s in specs if harness.STRATEGIES[s.strategy].style == "batch"]
            if batch:
                raise SystemExit(f"--framing epochs needs epoch-style strategies; {', '.join(sorted(set(batch)))} "
                                 "select in the batch")
            specs = list(dict.fromkeys(dataclasses.replace(s, budget=1.0) for s in specs))
        if args.regime != "clean" or args.schedule != "linear":  # each setting needs its uniform reference
            refs = [dataclasses.replace(s, strategy="uniform", augment="none", budget=1.0, framing="steps",
                                        schedule="linear") for s in specs]
            specs = list(dict.fromkeys(refs + specs))
            specs.sort(key=lambda s: (s.seed, not s.is_reference))
    return specs, cfg


def rerender(args: argparse.Namespace) -> dict:
    """The report of an earlier run, from its CSV: new tables and plots, its environment."""
    src = args.report_from
    if not src.is_file():
        raise SystemExit(f"--report-from: no such file {src}")
    try:
        results = report.read_csv(src, src.parent / "mms_trace.csv")
    except (ValueError, KeyError) as e:
        raise SystemExit(f"--report-from: {src}: {e}")
    env = {}
    md = src.parent / "train_bench.md"
    if md.exists():  # the environment bullets of the run
        for line in md.read_text().splitlines()[2:]:
            if not line.startswith("* "):
                break
            k, _, v = line[2:].partition(": ")
            env[k] = v
    env["report rendered again from the CSV"] = time.strftime("%Y-%m-%d")
    epochs = max((r.summary["epochs_full"] for r in results if r.spec.is_reference), default=harness.DEFAULT_EPOCHS)
    cfg = harness.BenchConfig(epochs=epochs)
    out = report.write_all(results, {}, cfg, None, args.out, env)
    if (args.out / "importance_grid.png").exists():  # made by the training run, kept
        out["text"] = out["text"].rstrip("\n") + "\n* `importance_grid.png`\n"
        out["md"].write_text(out["text"])
    print(out["text"])
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.report_from:
        return rerender(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    specs, cfg = plan(args)
    env = report.environment(cfg)
    est = harness.estimate_seconds(specs, cfg, cfg.subset or 60000, cfg.test_subset or 10000)
    print(f"{len(specs)} runs, {cfg.epochs} epochs at full budget, torch threads {torch.get_num_threads()}; "
          f"estimated {est / 60:.0f} min on 2 quiet cores; output: {args.out}")
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > BUSY_LOAD_AVERAGE:
        print(f"warning: load average {os.getloadavg()[0]:.2f}: other processes are using the CPU, so "
              "wall-clock comparisons between runs will be noisy (and 2 torch threads on contended cores can "
              "be several times slower: consider --threads 1)")
    try:
        data = harness.load_data(cfg)
    except FileNotFoundError as e:
        raise SystemExit(str(e))
    start = time.perf_counter()
    results, skipped = harness.run_grid(specs, cfg, data)
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    if not results:
        raise SystemExit("no run could be made (every strategy was skipped)")
    out = report.write_all(results, skipped, cfg, data, args.out, env)
    print()
    print(out["text"])
    print(f"total {time.perf_counter() - start:.0f} s; wrote {out['csv']}, {out['md']} and "
          f"{len(out['pngs'])} PNGs to {args.out}")
    return out


if __name__ == "__main__":
    main()
