#!/usr/bin/env python
"""Microbenchmark of ``fastsel.score`` against the PyTorch code it replaces.

Compares, in one process, fastsel's backends with the eager composite a user writes
today, ``torch.compile`` of that composite, ``F.cross_entropy`` alone and
``logits.sum(dim=1)`` (the memory-bandwidth yardstick), forward and forward+backward.
Everything runs on the CPU; when a CUDA device is present, the same grid runs a second
time on it, with fastsel's GPU backends (``triton``, ``cuda``) instead of the CPU ones.
The methods of one (dtype, shape, mode) group are timed interleaved, round by round, and
their speedups are medians of per-round ratios, so that drifts in machine speed cancel.
Writes a table to stdout and ``score_bench.{csv,png,md}`` to ``--out``.
Run ``python bench/bench_score.py --help`` for the options; bench/README.md explains
how to read the output.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import gc
import math
import os
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import matplotlib
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from tqdm import tqdm

BENCH_DIR = Path(__file__).resolve().parent
try:
    import fastsel
except ImportError:  # a checkout that was not pip-installed: benchmark its sources
    sys.path.insert(0, str(BENCH_DIR.parent))
    import fastsel

FORWARD = "forward"
FORWARD_BACKWARD = "forward+backward"
MODES = (FORWARD, FORWARD_BACKWARD)

FASTSEL_PREFIX = "fastsel-"
CPU_BACKENDS = ("cpu", "torch")  # fastsel backends that run on CPU tensors
GPU_BACKENDS = ("triton", "cuda")  # fastsel backends timed on the CUDA device
EAGER = "eager composite"
COMPILED = "compiled composite"
CROSS_ENTROPY = "cross_entropy"
YARDSTICK = "sum (yardstick)"
BASELINES = (EAGER, COMPILED, CROSS_ENTROPY)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_SHAPES = [(n, c) for n in (4096, 65536) for c in (10, 100, 1000, 32000)]
QUICK_SHAPES = [(1024, 100)]
# `make bench`'s default: the README's headline shape, float32, a few minutes.
REPRESENTATIVE_SHAPES = [(65536, 1000)]
REPRESENTATIVE_DTYPES = ["float32"]
REPRESENTATIVE_TIME_BUDGET_S = 0.25
QUICK_DTYPES = ["float32"]
WEIGHT_CLASSES = (10, 100, 1000)  # C values that also get the mms (weight) rows
# The exact MMS with a precomputed head (fastsel.mms_head, not timed: computed once per
# head): only the CPU search above C = 256 uses it.
HEAD_MMS = "exact-head"
HEAD_CLASSES = (1000,)
WEIGHT_DIM = 512
LOGITS_CAP_BYTES = 1 << 30  # N is reduced so that no logits tensor exceeds 1 GiB
# On a CUDA device the cap is this fraction of the free memory instead. The eager
# composite holds about 7 (float32) to 9 (bfloat16) logits-sized buffers at its peak,
# F.one_hot's int64 tensor alone being 2 or 4 of them, so a quarter would run out.
GPU_FREE_MEMORY_FRACTION = 1 / 16
TORCH_BACKEND_MAX_ELEMENTS = 1 << 23  # fastsel's torch backend is too slow beyond N*C
TIME_BUDGET_S = 0.5  # per case, after warm-up: a group of k cases is timed for k * this
QUICK_TIME_BUDGET_S = 0.05
SAMPLES_PER_BUDGET = 10  # fast calls are batched so that one sample takes budget / 10
SHUFFLE_SEED = 0  # seeds the order of the cases within each round
BUSY_LOAD_AVERAGE = 0.5  # warn above this 1-min load average: other work skews timings
TARGET_SHAPE = (65536, 1000)  # targets are checked here, in float32
# Datasheet peak memory bandwidth [bytes/s], keyed by a substring (whole words, any case)
# of torch.cuda.get_device_name(); the first match wins. Other devices get "n/a".
PEAK_HBM_BYTES_PER_S = (
    ("H100 80GB HBM3", 3.35e12),  # the name the H100 SXM5 reports
    ("H100 SXM", 3.35e12),
    ("H100 PCIe", 2.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100-SXM4-40GB", 1.555e12),
    ("A100-PCIE-40GB", 1.555e12),
    ("L4", 3.0e11),  # whole word: not the L40 or L40S
    ("RTX 4090", 1.008e12),
)


# ----------------------------------------------------------------------------------
# What is timed
# ----------------------------------------------------------------------------------


class CompositeScores(NamedTuple):
    loss: torch.Tensor
    entropy: torch.Tensor
    margin: torch.Tensor
    true_margin: torch.Tensor
    grad_norm: torch.Tensor
    confidence: torch.Tensor
    pred: torch.Tensor


def composite_scores(logits: torch.Tensor, target: torch.Tensor) -> CompositeScores:
    """The scores fastsel fuses, computed the way a user writes them today."""
    loss = F.cross_entropy(logits, target, reduction="none")
    z = logits.detach()  # only the loss needs a gradient
    logp = F.log_softmax(z, dim=1)
    p = logp.exp()
    entropy = -(p * logp).sum(dim=1)
    top2 = z.topk(2, dim=1).values
    pred = z.argmax(dim=1)
    z_target = z.gather(1, target[:, None]).squeeze(1)
    best_other = torch.where(pred == target, top2[:, 1], top2[:, 0])
    grad_norm = (p - F.one_hot(target, z.shape[1]).to(p.dtype)).norm(dim=1)
    return CompositeScores(
        loss, entropy, top2[:, 0] - top2[:, 1], z_target - best_other, grad_norm,
        p.amax(dim=1), pred,
    )


def cross_entropy_only(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target, reduction="none")


def row_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return logits.sum(dim=1)


def compile_composite() -> Callable:
    torch._dynamo.reset()  # a fresh compile, specialised to this case's shape and dtype
    return torch.compile(composite_scores, dynamic=False)


BASELINE_FACTORIES = {
    EAGER: lambda: composite_scores,
    COMPILED: compile_composite,
    CROSS_ENTROPY: lambda: cross_entropy_only,
    YARDSTICK: lambda: row_sum,
}


def fastsel_scores(backend: str, weight: Optional[torch.Tensor], mms: str) -> Callable:
    if mms == HEAD_MMS:
        weight, mms = fastsel.mms_head(weight), "exact"

    def run(logits, target):
        return fastsel.score(logits, target, head=weight, mms=mms, backend=backend)

    return run


# ----------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    dtype: str
    n: int
    c: int
    mode: str
    method: str
    mms: str = ""  # "exact", "top2" or HEAD_MMS: fastsel with a classifier weight [C, WEIGHT_DIM]
    device: str = "cpu"  # or "cuda"

    @property
    def logits_bytes(self) -> int:
        return self.n * self.c * DTYPES[self.dtype].itemsize

    @property
    def is_fastsel(self) -> bool:
        return self.method.startswith(FASTSEL_PREFIX)

    @property
    def group(self) -> tuple[str, str, int, int, str]:
        """Cases of one group share their inputs and are timed interleaved."""
        return self.device, self.dtype, self.n, self.c, self.mode

    @property
    def label(self) -> str:
        return self.method + (f" +mms {self.mms}" if self.mms else "")

    def but(self, **changes) -> "Case":
        return dataclasses.replace(self, **changes)


class Inputs(NamedTuple):
    logits: torch.Tensor
    target: torch.Tensor
    weight: Optional[torch.Tensor]


def capped_rows(n: int, c: int, itemsize: int, cap_bytes: int = LOGITS_CAP_BYTES) -> int:
    """N, or the largest power of two that keeps the logits within cap_bytes."""
    max_rows = max(1, cap_bytes // (c * itemsize))
    return n if n <= max_rows else 1 << (max_rows.bit_length() - 1)


def timed_fastsel_methods(n: int, c: int, backends: list[str]) -> list[str]:
    """fastsel methods to time at this shape: the torch backend only up to a size."""
    return [
        FASTSEL_PREFIX + backend
        for backend in backends
        if backend != "torch" or n * c <= TORCH_BACKEND_MAX_ELEMENTS
    ]


def plan_groups(
    shapes, dtypes, backends, device: str = "cpu", cap_bytes: int = LOGITS_CAP_BYTES
) -> list[list[Case]]:
    """The cases of each (dtype, N, C, mode) group; the groups of one input are adjacent."""
    groups = {}
    for dtype in dtypes:
        for n, c in shapes:
            n = capped_rows(n, c, DTYPES[dtype].itemsize, cap_bytes)
            fastsel_methods = timed_fastsel_methods(n, c, backends)
            for mode in MODES:
                methods = fastsel_methods + list(BASELINES)
                if mode == FORWARD:
                    methods.append(YARDSTICK)
                cases = [Case(dtype, n, c, mode, method, device=device) for method in methods]
                if mode == FORWARD and c in WEIGHT_CLASSES:
                    cases += [
                        Case(dtype, n, c, mode, method, mms, device)
                        for method in fastsel_methods
                        for mms in fastsel.MMS_MODES
                    ]
                    if c in HEAD_CLASSES and FASTSEL_PREFIX + "cpu" in fastsel_methods:
                        cases.append(Case(dtype, n, c, mode, FASTSEL_PREFIX + "cpu", HEAD_MMS, device))
                # two requested shapes may cap to the same one
                groups.setdefault(cases[0].group, cases)
    return list(groups.values())


def print_capped_shapes(
    shapes, dtypes, cap_bytes: int = LOGITS_CAP_BYTES, prefix: str = ""
) -> None:
    for dtype in dtypes:
        itemsize = DTYPES[dtype].itemsize
        for n, c in shapes:
            used = capped_rows(n, c, itemsize, cap_bytes)
            if used != n:
                print(
                    f"{prefix}{dtype} C={c}: N={n} would be {n * c * itemsize / 2**30:.1f} GiB of "
                    f"logits; using N={used} ({used * c * itemsize / 2**30:.2f} GiB)"
                )


def gpu_logits_cap_bytes() -> int:
    """The largest logits tensor for the CUDA device: a fraction of its free memory now."""
    free_bytes, _total_bytes = torch.cuda.mem_get_info()
    return int(free_bytes * GPU_FREE_MEMORY_FRACTION)


def make_inputs(dtype: str, n: int, c: int, device: str = "cpu") -> Inputs:
    """Random inputs, created on device (the random values differ between devices)."""
    generator = torch.Generator(device).manual_seed(n * 100_003 + c)
    logits = torch.randn(n, c, generator=generator, device=device).mul_(3.0).to(DTYPES[dtype])
    target = torch.randint(0, c, (n,), generator=generator, device=device)
    weight = None
    if c in WEIGHT_CLASSES:
        weight = torch.randn(c, WEIGHT_DIM, generator=generator, device=device)
        weight = weight.to(DTYPES[dtype])
    return Inputs(logits, target, weight)


def build_step(case: Case, inputs: Inputs) -> Callable[[], object]:
    """One call of the case's method: forward only, or forward then backward of the loss."""
    if case.is_fastsel:
        weight = inputs.weight if case.mms else None
        run = fastsel_scores(case.method[len(FASTSEL_PREFIX):], weight, case.mms or "exact")
    else:
        run = BASELINE_FACTORIES[case.method]()
    if case.mode == FORWARD:
        def step():
            return run(inputs.logits, inputs.target)
    else:
        logits = inputs.logits.detach().requires_grad_()

        def step():
            out = run(logits, inputs.target)
            loss = out if isinstance(out, torch.Tensor) else out.loss
            loss.sum().backward()
            logits.grad = None

    return step if case.device == "cpu" else CudaStep(step)


# ----------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Timing:
    samples_s: tuple[float, ...]  # per-call time of each round's sample, in round order
    calls_per_sample: int
    first_call_s: float  # includes torch.compile for the compiled composite

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)


class Calibration(NamedTuple):
    first_call_s: float
    calls_per_sample: int


class CudaStep:
    """A step whose kernels run asynchronously on the CUDA device: elapsed_s synchronises
    the device before the first and after the last call of each sample."""

    def __init__(self, step: Callable[[], object]):
        self.step = step

    def __call__(self) -> object:
        return self.step()


def elapsed_s(step: Callable, calls: int) -> float:
    """Wall time of calls calls of step; for a CudaStep, until their kernels finished."""
    on_cuda = isinstance(step, CudaStep)
    if on_cuda:
        torch.cuda.synchronize()  # work queued before the sample is not counted
    start = time.perf_counter()
    for _ in range(calls):
        step()
    if on_cuda:
        torch.cuda.synchronize()  # the sample ends when its last kernel does
    return time.perf_counter() - start


def calibrate(step: Callable, sample_s: float) -> Calibration:
    """A warm-up call, then the number of calls, doubled from 1, that takes sample_s.

    Each timed sample makes that many calls, so fast calls are not timed one by one.
    """
    first_call_s = elapsed_s(step, 1)
    calls, calibration_s = 1, elapsed_s(step, 1)
    while calibration_s < sample_s:
        calls *= 2
        calibration_s = elapsed_s(step, calls)
    return Calibration(first_call_s, calls)


def sample_rounds(
    steps: dict[Case, Callable], calls: dict[Case, int], min_rounds: int, budget_s: float,
    rng: random.Random,
) -> dict[Case, list[float]]:
    """Per-call times of each case, one sample per case per round in a shuffled order.

    Rounds continue until there are min_rounds of them and their samples took budget_s.
    """
    samples = {case: [] for case in steps}
    order = list(steps)
    rounds, used_s = 0, 0.0
    while rounds < min_rounds or used_s < budget_s:
        rng.shuffle(order)
        for case in order:
            sample_s = elapsed_s(steps[case], calls[case])
            samples[case].append(sample_s / calls[case])
            used_s += sample_s
        rounds += 1
    return samples


def time_group(
    cases: list[Case], inputs: Inputs, min_repeats: int, budget_s: float,
    rng: random.Random, progress: tqdm,
) -> dict[Case, Timing]:
    """Calibrates every case of one group, then samples them all interleaved, in rounds.

    Rounds run until there are min_repeats of them and they took budget_s per case.
    """
    steps = {case: build_step(case, inputs) for case in cases}  # one compile per group
    device, dtype, n, c, mode = cases[0].group
    title = ("" if device == "cpu" else f"{device} ") + f"{dtype} {n}x{c} {mode}"
    calibrations = {}
    for case in cases:
        progress.set_description(f"{title}: warm-up {case.label}")
        calibrations[case] = calibrate(steps[case], budget_s / SAMPLES_PER_BUDGET)
    progress.set_description(f"{title}: {len(cases)} cases interleaved")
    calls = {case: calibration.calls_per_sample for case, calibration in calibrations.items()}
    samples = sample_rounds(steps, calls, min_repeats, budget_s * len(cases), rng)
    return {
        case: Timing(tuple(samples[case]), calls[case], calibrations[case].first_call_s)
        for case in cases
    }


def run_groups(groups: list[list[Case]], min_repeats: int, budget_s: float) -> dict[Case, Timing]:
    timings = {}
    rng = random.Random(SHUFFLE_SEED)
    inputs_key, inputs = None, None
    with tqdm(total=sum(map(len, groups)), unit="case", dynamic_ncols=True) as progress:
        for cases in groups:
            device, dtype, n, c, _ = cases[0].group
            if inputs_key != (dtype, n, c, device):
                inputs = None
                gc.collect()
                if device != "cpu":
                    torch.cuda.empty_cache()  # the previous inputs' blocks, for larger ones
                inputs_key = (dtype, n, c, device)
                inputs = make_inputs(*inputs_key)
            timings.update(time_group(cases, inputs, min_repeats, budget_s, rng, progress))
            progress.update(len(cases))
    torch._dynamo.reset()
    return timings


# ----------------------------------------------------------------------------------
# Derived metrics and targets
# ----------------------------------------------------------------------------------


def speedup_key(baseline: str) -> str:
    return "speedup_vs_" + baseline.replace(" ", "_")


def time_ratio(
    timings: dict[Case, Timing], numerator: Case, denominator: Case
) -> Optional[float]:
    """numerator's time / denominator's time, or None if either was not timed.

    Within a group, whose cases were sampled in the same rounds, this is the median over
    rounds of the ratio of the two samples, which cancels drifts slower than a round.
    Across groups (the forward yardstick for forward+backward rows) it is the ratio of the
    medians.
    """
    if numerator not in timings or denominator not in timings:
        return None
    num, den = timings[numerator], timings[denominator]
    if numerator.group != denominator.group:
        return num.median_s / den.median_s
    return statistics.median([a / b for a, b in zip(num.samples_s, den.samples_s)])


def device_name(device: str) -> str:
    return "cpu" if device == "cpu" else torch.cuda.get_device_name(device)


def peak_hbm_bytes_per_s(name: str) -> Optional[float]:
    """The datasheet peak memory bandwidth of the named GPU, None if not in the table."""
    for key, peak in PEAK_HBM_BYTES_PER_S:
        if re.search(rf"\b{re.escape(key)}\b", name, re.IGNORECASE):
            return peak
    return None


def pct_of_peak_hbm(case: Case, median_s: float) -> Optional[object]:
    """GB/s as % of the GPU's datasheet peak bandwidth; "n/a" if unknown; None on CPU."""
    if case.device == "cpu":
        return None
    peak = peak_hbm_bytes_per_s(device_name(case.device))
    return "n/a" if peak is None else 100 * case.logits_bytes / median_s / peak


def summarize(timings: dict[Case, Timing]) -> list[dict]:
    """One row per case: time, GB/s of logits read, % of yardstick, speedups, overheads."""
    rows = []
    for case, timing in timings.items():
        yardstick = case.but(mode=FORWARD, method=YARDSTICK, mms="")
        yardstick_ratio = time_ratio(timings, yardstick, case)
        row = {
            "dtype": case.dtype,
            "mode": case.mode,
            "n": case.n,
            "c": case.c,
            "method": case.method,
            "mms": case.mms,
            "weight_dim": WEIGHT_DIM if case.mms else None,
            "median_ms": timing.median_s * 1e3,
            "gb_per_s": case.logits_bytes / timing.median_s / 1e9,
            "pct_of_yardstick": 100 * yardstick_ratio if yardstick_ratio is not None else None,
        }
        for baseline in BASELINES:
            compared = case.is_fastsel and not case.mms
            row[speedup_key(baseline)] = (
                time_ratio(timings, case.but(method=baseline), case) if compared else None
            )
        row["weight_overhead_pct"] = (
            100 * (time_ratio(timings, case, case.but(mms="")) - 1) if case.mms else None
        )
        row["compile_s"] = timing.first_call_s if case.method == COMPILED else None
        row["repeats"] = len(timing.samples_s)
        row["calls_per_repeat"] = timing.calls_per_sample
        row["device"] = device_name(case.device)
        row["pct_of_peak_hbm"] = pct_of_peak_hbm(case, timing.median_s)
        rows.append(row)
    return rows


@dataclasses.dataclass(frozen=True)
class Target:
    description: str
    numerator: Case
    denominator: Case
    bound: float
    at_most: bool  # pass when ratio <= bound, else when ratio >= bound

    def check(self, timings: dict[Case, Timing]) -> tuple[Optional[float], str]:
        ratio = time_ratio(timings, self.numerator, self.denominator)
        if ratio is None:
            return None, "NOT MEASURED"
        passed = ratio <= self.bound if self.at_most else ratio >= self.bound
        return ratio, "PASS" if passed else "FAIL"


def targets(fastsel_method: str) -> list[Target]:
    n, c = TARGET_SHAPE

    def case(method, mode=FORWARD, mms=""):
        return Case("float32", n, c, mode, method, mms)

    forward = case(fastsel_method)
    return [
        Target("forward time <= 0.25x F.cross_entropy", forward, case(CROSS_ENTROPY), 0.25, True),
        Target("forward time <= 0.3x torch.compile(composite)", forward, case(COMPILED), 0.3, True),
        # ratio of GB/s = yardstick time / fastsel time (same bytes read)
        Target("forward GB/s >= 50% of the yardstick's", case(YARDSTICK), forward, 0.5, False),
        Target(
            "forward+backward time <= 0.3x F.cross_entropy forward+backward",
            case(fastsel_method, FORWARD_BACKWARD), case(CROSS_ENTROPY, FORWARD_BACKWARD),
            0.3, True,
        ),
        Target(
            f"exact mms (D={WEIGHT_DIM}) time <= 1.5x the call without weight",
            case(fastsel_method, mms="exact"), forward, 1.5, True,
        ),
        Target(  # not the target (the plain weight), the fixed-head case beside it
            f"(beside it) exact mms with fastsel.mms_head (D={WEIGHT_DIM}) time <= 1.5x",
            case(fastsel_method, mms=HEAD_MMS), forward, 1.5, True,
        ),
    ]


def check_targets(timings: dict[Case, Timing], fastsel_method: str) -> list[tuple]:
    return [(target, *target.check(timings)) for target in targets(fastsel_method)]


def check_composite_matches_fastsel(backends: list[str], device: str = "cpu") -> None:
    """Fail fast if the composite and fastsel disagree: the timings would compare different work."""
    generator = torch.Generator().manual_seed(0)
    logits = (3.0 * torch.randn(257, 37, generator=generator)).to(device)
    target = torch.randint(0, 37, (257,), generator=generator).to(device)
    expected = composite_scores(logits, target)
    for backend in backends:
        got = fastsel.score(logits, target, backend=backend)
        for field in CompositeScores._fields:
            torch.testing.assert_close(
                getattr(got, field), getattr(expected, field), rtol=1e-4, atol=1e-5,
                msg=lambda detail: f"fastsel[{backend}].{field} != composite on {device}: "
                                   f"{detail}",
            )


# ----------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------


def fmt_ms(v):
    return f"{v:.4f}" if v < 1 else f"{v:.3g}" if v < 100 else f"{v:.0f}"


COLUMNS = [  # (row key, table header, cell format, alignment)
    ("dtype", "dtype", str, "<"),
    ("mode", "mode", str, "<"),
    ("n", "N", str, ">"),
    ("c", "C", str, ">"),
    ("method", "method", str, "<"),
    ("mms", f"mms (D={WEIGHT_DIM})", str, "<"),
    ("median_ms", "ms", fmt_ms, ">"),
    ("gb_per_s", "GB/s", lambda v: f"{v:.1f}", ">"),
    ("pct_of_yardstick", "% yardstick", lambda v: f"{v:.0f}%", ">"),
    (speedup_key(CROSS_ENTROPY), "x vs CE", lambda v: f"{v:.2f}x", ">"),
    (speedup_key(EAGER), "x vs eager", lambda v: f"{v:.2f}x", ">"),
    (speedup_key(COMPILED), "x vs compiled", lambda v: f"{v:.2f}x", ">"),
    ("weight_overhead_pct", "+% vs no weight", lambda v: f"{v:+.0f}%", ">"),
    ("compile_s", "compile s", lambda v: f"{v:.1f}", ">"),
    ("repeats", "repeats", str, ">"),
    ("device", "device", str, "<"),
    ("pct_of_peak_hbm", "% peak HBM", lambda v: v if isinstance(v, str) else f"{v:.0f}%", ">"),
]


def table_cells(rows: list[dict]) -> list[list[str]]:
    """Header then one line of formatted cells per row; "-" where a metric does not apply."""
    header = [title for _, title, _, _ in COLUMNS]
    body = [
        [fmt(row[key]) if row[key] not in (None, "") else "-" for key, _, fmt, _ in COLUMNS]
        for row in rows
    ]
    return [header, *body]


def text_table(rows: list[dict]) -> str:
    cells = table_cells(rows)
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    aligns = [align for *_, align in COLUMNS]
    lines = [
        "  ".join(f"{cell:{align}{width}}" for cell, align, width in zip(line, aligns, widths))
        for line in cells
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    cells = table_cells(rows)
    lines = ["| " + " | ".join(line) + " |" for line in cells]
    rule = {"<": "---", ">": "---:"}
    lines.insert(1, "|" + "|".join(rule[align] for *_, align in COLUMNS) + "|")
    return "\n".join(lines)


def target_lines(checks, fastsel_method: str) -> list[str]:
    n, c = TARGET_SHAPE
    lines = [f"Targets at N={n}, C={c}, float32, for {fastsel_method}:"]
    for target, ratio, verdict in checks:
        measured = f"ratio {ratio:.3f}" if ratio is not None else "ratio -"
        lines.append(f"  {verdict:<12} {measured:<12} {target.description}")
    return lines


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)


def plot_times(rows: list[dict], dtypes: list[str], path: Path) -> None:
    """Per device, dtype and mode, grouped bars of median time per method for each shape
    (log y)."""
    rows = [row for row in rows if not row["mms"]]
    methods = list(dict.fromkeys(row["method"] for row in rows))
    colors = {m: matplotlib.colormaps["tab10"](i) for i, m in enumerate(methods)}
    devices = list(dict.fromkeys(row["device"] for row in rows))
    panel_rows = [(device, dtype) for device in devices for dtype in dtypes]
    fig = Figure(figsize=(14, 4.5 * len(panel_rows)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panel_rows), len(MODES), squeeze=False)
    for i, (device, dtype) in enumerate(panel_rows):
        device_methods = [m for m in methods if any(
            r["method"] == m for r in rows if r["device"] == device)]
        for j, mode in enumerate(MODES):
            panel = {(r["n"], r["c"], r["method"]): r["median_ms"] for r in rows
                     if r["device"] == device and r["dtype"] == dtype and r["mode"] == mode}
            shapes = list(dict.fromkeys((n, c) for n, c, _ in panel))
            width = 0.8 / len(device_methods)
            ax = axes[i][j]
            for k, method in enumerate(device_methods):
                offsets = [x + (k - (len(device_methods) - 1) / 2) * width
                           for x in range(len(shapes))]
                times = [panel.get((n, c, method), math.nan) for n, c in shapes]
                ax.bar(offsets, times, width, label=method, color=colors[method])
            ax.set_yscale("log")
            ax.set_xticks(range(len(shapes)), [f"{n}x{c}" for n, c in shapes], rotation=20)
            ax.set_xlabel("N x C")
            ax.set_ylabel("median time per call [ms], log scale")
            ax.set_title(f"{dtype}, {mode}" + ("" if device == "cpu" else f", {device}"))
            ax.grid(axis="y", which="both", alpha=0.3)
    handles = [Patch(color=colors[m], label=m) for m in methods]
    fig.legend(handles=handles, loc="outside upper center", ncol=len(methods))
    fig.savefig(path, dpi=110)


def write_markdown(rows, checks, env: dict, fastsel_method: str, path: Path) -> None:
    fastsel_rows = [row for row in rows if row["method"].startswith(FASTSEL_PREFIX)]
    on_gpu = any(row["device"] != "cpu" for row in rows)
    lines = [
        "# fastsel.score CPU and GPU benchmark" if on_gpu else "# fastsel.score CPU benchmark",
        "",
        *[f"- {key}: {value}" for key, value in env.items()],
        "",
        "## Targets",
        "",
        "```",
        *target_lines(checks, fastsel_method),
        "```",
        "",
        "## fastsel rows",
        "",
        "Speedup = median over rounds of baseline sample / fastsel sample: the methods of "
        "one shape, dtype and mode are timed interleaved, round by round."
        + (" `% peak HBM`: GB/s over the GPU's datasheet peak memory bandwidth." if on_gpu else ""),
        "",
        markdown_table(fastsel_rows),
        "",
        "All rows: `score_bench.csv`; plot: `score_bench.png`.",
        "",
    ]
    path.write_text("\n".join(lines))


# ----------------------------------------------------------------------------------
# Environment and entry point
# ----------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def environment(backends: list[str], gpu_backends: Optional[list[str]] = None) -> dict:
    """The machine header; the GPU entries only when GPU backends are timed."""
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "CPU": cpu_model(),
        "cores": f"{usable_cores()} usable of {os.cpu_count()}",
        "torch threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fastsel": fastsel.__version__,
        "fastsel build_info": fastsel.build_info(),
        "fastsel backends timed": ", ".join(backends),
        "python": platform.python_version(),
        "load average (1 min) at start": f"{os.getloadavg()[0]:.2f}",
    }
    if gpu_backends:
        name = device_name("cuda")
        peak = peak_hbm_bytes_per_s(name)
        env["GPU"] = f"{name}, CUDA {torch.version.cuda}"
        env["GPU peak HBM (datasheet)"] = f"{peak / 1e9:.0f} GB/s" if peak else "n/a"
        env["fastsel GPU backends timed"] = ", ".join(gpu_backends)
    return env


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        n, c = (int(part) for part in item.lower().split("x"))
        if n < 1 or c < 2:
            raise argparse.ArgumentTypeError(f"shape {item!r}: need N >= 1 and C >= 2")
        shapes.append((n, c))
    return shapes


def format_shapes(shapes: list[tuple[int, int]]) -> str:
    return ",".join(f"{n}x{c}" for n, c in shapes)


def parse_dtypes(text: str) -> list[str]:
    names = text.split(",")
    unknown = [name for name in names if name not in DTYPES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown dtypes {unknown}; choose from {list(DTYPES)}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Microbenchmark of fastsel.score against the PyTorch code it replaces, "
                    "on the CPU and, when present, on the CUDA device."
    )
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: shapes {format_shapes(QUICK_SHAPES)}, "
                             f"{QUICK_TIME_BUDGET_S} s per case, "
                             "unless --shapes / --dtypes say otherwise")
    parser.add_argument("--representative", action="store_true",
                        help=f"the headline in a few minutes (make bench's default): shapes "
                             f"{format_shapes(REPRESENTATIVE_SHAPES)}, {','.join(REPRESENTATIVE_DTYPES)}, "
                             f"{REPRESENTATIVE_TIME_BUDGET_S} s per case")
    parser.add_argument("--shapes", type=parse_shapes,
                        help="comma-separated NxC, e.g. 4096x1000,65536x100 "
                             "(default: the full grid)")
    parser.add_argument("--dtypes", type=parse_dtypes,
                        help="comma-separated subset of float32,bfloat16 (default: both; "
                             f"--quick: {','.join(QUICK_DTYPES)})")
    parser.add_argument("--repeats", type=int, default=5,
                        help="minimum number of timed rounds, i.e. samples per case "
                             "(default 5)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results",
                        help="output directory (default bench/results)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.quick and args.representative:
        parser.error("--quick and --representative are exclusive")
    if args.shapes is None:
        args.shapes = QUICK_SHAPES if args.quick else REPRESENTATIVE_SHAPES if args.representative else DEFAULT_SHAPES
    if args.dtypes is None:
        args.dtypes = (QUICK_DTYPES if args.quick else REPRESENTATIVE_DTYPES if args.representative
                       else list(DTYPES))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(usable_cores())
    available = fastsel.available_backends()
    backends = [b for b in available if b in CPU_BACKENDS]
    gpu_backends = [b for b in available if b in GPU_BACKENDS]  # empty without CUDA
    fastsel_method = FASTSEL_PREFIX + ("cpu" if "cpu" in backends else "torch")
    env = environment(backends, gpu_backends)
    for key, value in env.items():
        print(f"{key}: {value}")
    if not torch.cuda.is_available():
        print("GPU backends are not timed (no CUDA device).")
    elif not gpu_backends:
        print("GPU backends are not timed (neither triton nor fastsel's CUDA build is "
              "available).")
    if os.getloadavg()[0] > BUSY_LOAD_AVERAGE:
        print("warning: other processes are using the CPU; timings will be noisy")
    print_capped_shapes(args.shapes, args.dtypes)
    check_composite_matches_fastsel(backends)
    gpu_groups = []
    if gpu_backends:
        gpu_cap_bytes = gpu_logits_cap_bytes()  # before this process allocates on the GPU
        print_capped_shapes(args.shapes, args.dtypes, gpu_cap_bytes, prefix="cuda ")
        check_composite_matches_fastsel(gpu_backends, "cuda")
        gpu_groups = plan_groups(args.shapes, args.dtypes, gpu_backends, "cuda", gpu_cap_bytes)

    groups = plan_groups(args.shapes, args.dtypes, backends)
    budget_s = (QUICK_TIME_BUDGET_S if args.quick else REPRESENTATIVE_TIME_BUDGET_S if args.representative
                else TIME_BUDGET_S)
    timings = run_groups(groups, args.repeats, budget_s)
    if gpu_groups:
        timings.update(run_groups(gpu_groups, args.repeats, budget_s))

    rows = summarize(timings)
    checks = check_targets(timings, fastsel_method)
    print()
    print(text_table(rows))
    print()
    print("\n".join(target_lines(checks, fastsel_method)))

    args.out.mkdir(parents=True, exist_ok=True)
    outputs = [args.out / f"score_bench.{ext}" for ext in ("csv", "png", "md")]
    write_csv(rows, outputs[0])
    plot_times(rows, args.dtypes, outputs[1])
    write_markdown(rows, checks, env, fastsel_method, outputs[2])
    print("\nwrote " + ", ".join(str(path) for path in outputs))


if __name__ == "__main__":
    main()
