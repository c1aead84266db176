"""Does a cheap online proxy pay for in-batch selection? (issue 16, part 2)

The benchmark CNN (``fastsel.experiments.models.SmallCNN``) on Fashion-MNIST, trained as
the harness trains it (SGD momentum 0.9 Nesterov, weight decay 5e-4, batches of 128, peak
lr 0.1, linear warm-up over 2% of the steps then linear decay to 0 after the last step).
Candidate batches of 640, 128 kept, by ``HardLoss`` (largest loss) or ``MMS`` (smallest
MMS), scored either by the model's inference forward (sliced by 256, as the harness runs
it) or by ``fastsel.experiments.proxies.OnlineProxy(pooled_mlp(...))`` trained one SGD
step on every batch the model trains on (distilling the model's training logits).

Measured, in one process on one thread:

1. cost: the proxy's forward on a candidate batch and its training step (one per
   candidate batch: 640 candidates give one training batch of 128), against the model's
   inference forward on the same batch; medians over interleaved repetitions.
2. agreement: during each proxy-driven run, at evenly spaced steps, on the candidate
   batch just scored: Spearman and Kendall (tau-b) correlations between the proxy's and
   the model's scores (loss, and MMS each with its own head) and the overlap of the 128
   chosen by each (largest loss, smallest MMS). Not counted in the training clock.
3. gain: short runs at budget 0.5 (half the full budget's 5 epochs, schedule compressed):
   uniform, selection with the model's scores, selection with the proxy; final test
   accuracy (10,000 test images) and training wall-clock (evaluations excluded). Uniform
   is also run at the budget whose wall-clock matches the proxy runs' (equal time).

    taskset -c 1 env OMP_NUM_THREADS=1 python bench/proxy_bench.py --seeds 0 1

Writes bench/results/proxy/{cost,trace,runs}.csv and report.md.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fastsel
from fastsel.experiments.datasets import fashion_mnist
from fastsel.experiments.models import SmallCNN
from fastsel.experiments.proxies import OnlineProxy, pooled_mlp
from fastsel.forward import scoring_forward
from fastsel.strategies import MMS, HardLoss

BATCH, CANDIDATES, CHUNK = 128, 640, 256
PEAK_LR, MOMENTUM, WD, WARMUP, EPOCHS = 0.1, 0.9, 5e-4, 0.02, 5
PROXY_KW = {"lr": 0.05, "distill": 0.5}
OUT = Path(__file__).resolve().parent / "results" / "proxy"


def lr_schedule(total: int) -> list[float]:
    """The harness's schedule: linear warm-up over W = ceil(0.02 T) steps to the peak,
    then lr(t) = peak (T - t) / (T - W + 1)."""
    w = max(1, math.ceil(WARMUP * total))
    return [PEAK_LR * (t + 1) / w if t < w else PEAK_LR * (total - t) / (total - w + 1) for t in range(total)]


def ranks(v: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean of their positions)."""
    v = v.double()
    order = torch.argsort(v, stable=True)
    sorted_v = v[order]
    r = torch.empty_like(v)
    r[order] = torch.arange(v.numel(), dtype=torch.float64)
    _, inverse, counts = torch.unique_consecutive(sorted_v, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts
    mean_rank = first.double() + (counts.double() - 1) / 2
    r[order] = mean_rank[inverse]
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def kendall(a: torch.Tensor, b: torch.Tensor) -> float:
    """tau-b = (concordant - discordant) / sqrt((n0 - ties_a)(n0 - ties_b)), all pairs."""
    sa = torch.sign(a.double()[:, None] - a.double()[None, :])
    sb = torch.sign(b.double()[:, None] - b.double()[None, :])
    num = (sa * sb).sum() / 2
    na, nb = (sa != 0).sum() / 2, (sb != 0).sum() / 2
    return float(num / torch.sqrt(na * nb))


def overlap(a: torch.Tensor, b: torch.Tensor, k: int, largest: bool) -> float:
    ia = set(torch.topk(a, k, largest=largest).indices.tolist())
    ib = set(torch.topk(b, k, largest=largest).indices.tolist())
    return len(ia & ib) / k


def make_proxy(seed: int) -> OnlineProxy:
    torch.manual_seed(10_000 + seed)
    return OnlineProxy(pooled_mlp((1, 28, 28), 10, pool=2, hidden=128), **PROXY_KW)


def evaluate(model, x, y) -> float:
    logits = scoring_forward(model, x, CHUNK)
    return float((logits.argmax(1) == y).float().mean())


# ----------------------------------------------------------------------------- cost

def measure_cost(x, y, reps: int, seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    model = SmallCNN()
    proxy = make_proxy(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=MOMENTUM, nesterov=True, weight_decay=WD)
    g = torch.Generator().manual_seed(seed)
    rows = []

    def model_fwd(xc, yc):
        scoring_forward(model, xc, CHUNK)

    def proxy_fwd(xc, yc):
        proxy(xc)

    def proxy_step(xc, yc):
        proxy.observe(xc[:BATCH], yc[:BATCH], torch.randn(BATCH, 10))

    def model_step(xc, yc):
        loss = F.cross_entropy(model(xc[:BATCH]), yc[:BATCH])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ops = {"model_inference_forward_640": model_fwd, "proxy_forward_640": proxy_fwd,
           "proxy_train_step_128": proxy_step, "model_train_step_128": model_step}
    for rep in range(reps + 3):  # 3 warm-up repetitions, then interleaved
        c = torch.randperm(y.numel(), generator=g)[:CANDIDATES]
        xc, yc = x[c], y[c]
        for name, fn in ops.items():
            t = time.perf_counter()
            fn(xc, yc)
            dt = time.perf_counter() - t
            if rep >= 3:
                rows.append({"rep": rep - 3, "op": name, "ms": 1000 * dt})
    return rows


# ----------------------------------------------------------------------------- runs

def train_run(x, y, tx, ty, *, rule: str, scorer: str, seed: int, budget: float, trace_points: int,
              trace_rows: list) -> dict:
    torch.manual_seed(seed)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=MOMENTUM, nesterov=True, weight_decay=WD)
    full = EPOCHS * math.ceil(y.numel() / BATCH)
    total = max(1, round(budget * full))
    lrs = lr_schedule(total)
    trace_at = {round(j * total / trace_points) for j in range(1, trace_points + 1)} | {1}
    selector = proxy = None
    if rule != "uniform":
        strategy = HardLoss(keep=BATCH) if rule == "hard_loss" else MMS(keep=BATCH)
        if scorer == "proxy":
            proxy = make_proxy(seed)
            selector = fastsel.BatchSelector(model, strategy, scorer=proxy, seed=seed)
        else:
            selector = fastsel.BatchSelector(model, strategy, head=model.fc, seed=seed, score_batch_size=CHUNK)
    gen = torch.Generator().manual_seed(1000 + seed)
    group = CANDIDATES if selector is not None else BATCH
    step, wall, epoch = 0, 0.0, 0
    t0 = time.perf_counter()
    while step < total:
        for c in torch.randperm(y.numel(), generator=gen).split(group):
            if c.numel() < group:
                break
            xc, yc = x[c], y[c]
            if selector is not None:
                xb, yb, w = selector(xc, yc)
            else:
                xb, yb, w = xc, yc, None
            for g in opt.param_groups:
                g["lr"] = lrs[step]
            logits = model(xb)
            loss = fastsel.score(logits, yb).loss
            loss = (loss * w).mean() if w is not None else loss.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if proxy is not None:
                selector.observe(xb, yb, logits.detach())
            step += 1
            if proxy is not None and step in trace_at:
                wall += time.perf_counter() - t0
                trace_rows.append({"rule": rule, "seed": seed, "step": step, "of": total,
                                   **agreement(model, proxy, xc, yc)})
                t0 = time.perf_counter()
            if step >= total:
                break
        epoch += 1
    wall += time.perf_counter() - t0
    costs = selector.costs.as_dict() if selector is not None else {"scored": 0, "trained": step * BATCH,
                                                                      "steps": step}
    return {"rule": rule, "scorer": scorer if selector is not None else "-", "seed": seed, "budget": budget,
            "steps": step, "train_s": round(wall, 2), "test_acc": evaluate(model, tx, ty),
            "scored": costs["scored"], "trained": costs["trained"],
            "scorer_trained": costs.get("scorer_trained", 0)}


def agreement(model, proxy, xc, yc) -> dict:
    sm = fastsel.score(scoring_forward(model, xc, CHUNK), yc, head=model.fc.weight.detach())
    sp = fastsel.score(proxy(xc), yc, head=proxy.head.weight.detach())
    return {"spearman_loss": spearman(sm.loss, sp.loss), "kendall_loss": kendall(sm.loss, sp.loss),
            "top128_overlap_loss": overlap(sm.loss, sp.loss, BATCH, largest=True),
            "spearman_mms": spearman(sm.mms, sp.mms), "kendall_mms": kendall(sm.mms, sp.mms),
            "top128_overlap_mms": overlap(sm.mms, sp.mms, BATCH, largest=False)}


# ----------------------------------------------------------------------------- output

def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def conditions() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    load = open("/proc/loadavg").read().split()[:3]
    return (f"{cpu}; torch {torch.__version__}, {torch.get_num_threads()} thread, "
            f"affinity {sorted(os.sched_getaffinity(0))} of {os.cpu_count()} CPUs; load average at the end "
            f"{' '.join(load)} (another benchmark ran pinned to the other core throughout: shared caches and "
            "memory bandwidth, so absolute times are noisy; ratios are from interleaved repetitions)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--rules", nargs="+", default=["hard_loss", "mms"])
    ap.add_argument("--cost-reps", type=int, default=41)
    ap.add_argument("--trace-points", type=int, default=12)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    train, test = fashion_mnist(None, train=True), fashion_mnist(None, train=False)
    x, y, tx, ty = train.images, train.labels, test.images, test.labels

    cost = measure_cost(x, y, args.cost_reps)
    write_csv(args.out / "cost.csv", cost)
    med = {op: statistics.median(r["ms"] for r in cost if r["op"] == op) for op in dict.fromkeys(r["op"] for r in cost)}
    print({k: round(v, 2) for k, v in med.items()}, flush=True)

    runs, trace = [], []
    for seed in args.seeds:
        seed_runs = [train_run(x, y, tx, ty, rule="uniform", scorer="-", seed=seed, budget=args.budget,
                               trace_points=0, trace_rows=trace)]
        print(seed_runs[-1], flush=True)
        for rule in args.rules:
            for scorer in ("model", "proxy"):
                seed_runs.append(train_run(x, y, tx, ty, rule=rule, scorer=scorer, seed=seed, budget=args.budget,
                                           trace_points=args.trace_points, trace_rows=trace))
                print(seed_runs[-1], flush=True)
                write_csv(args.out / "trace.csv", trace)
        # Uniform given the proxy runs' mean wall-clock: its budget scaled by the time ratio.
        proxy_s = statistics.fmean(r["train_s"] for r in seed_runs if r["scorer"] == "proxy")
        b = round(args.budget * proxy_s / seed_runs[0]["train_s"], 3)
        seed_runs.append(train_run(x, y, tx, ty, rule="uniform", scorer="-", seed=seed, budget=b,
                                   trace_points=0, trace_rows=trace))
        seed_runs[-1]["rule"] = "uniform_equal_time"
        print(seed_runs[-1], flush=True)
        runs += seed_runs
        write_csv(args.out / "runs.csv", runs)
    write_report(args, med, runs, trace)


def write_report(args, med: dict, runs: list[dict], trace: list[dict]) -> None:
    fwd = med["model_inference_forward_640"]
    proxy_total = med["proxy_forward_640"] + med["proxy_train_step_128"]
    lines = ["# Online proxy scorer for in-batch selection (SmallCNN, Fashion-MNIST)", "",
             f"Conditions: {conditions()}.", "",
             f"Proxy: `OnlineProxy(pooled_mlp((1, 28, 28), 10, pool=2, hidden=128), {PROXY_KW})`: 2x2-average-"
             "pooled pixels, 196 -> 128 -> 10; one SGD step (constant lr, CE + distillation of the model's training "
             "logits) per training step of the model, on the batch the model trains on.", "",
             "## Cost per candidate batch of 640 (median ms over "
             f"{args.cost_reps} interleaved repetitions)", "",
             "| model inference forward | proxy forward | proxy train step (1 per candidate batch) | proxy total | "
             "ratio proxy / model | model train step (128) |", "|---|---|---|---|---|---|",
             f"| {fwd:.2f} | {med['proxy_forward_640']:.2f} | {med['proxy_train_step_128']:.2f} | {proxy_total:.2f} | "
             f"{proxy_total / fwd:.3f} | {med['model_train_step_128']:.2f} |", ""]
    if trace:
        lines += ["## Agreement with the model over training (candidate batches of 640, proxy-driven runs at "
                  f"budget {args.budget:g}: {runs[0]['steps']} steps, fewer than the full budget's "
                  f"{EPOCHS} epochs, schedule compressed; the model trained on the proxy's picks; mean over "
                  "seeds)", "",
                  "| rule driving the run | step | Spearman loss | Kendall loss | top-128 overlap loss | "
                  "Spearman MMS | Kendall MMS | top-128 overlap MMS |", "|---|---|---|---|---|---|---|---|"]
        keys = sorted({(r["rule"], r["step"]) for r in trace}, key=lambda k: (args.rules.index(k[0]), k[1]))
        for rule, step in keys:
            rs = [r for r in trace if r["rule"] == rule and r["step"] == step]
            m = {f: statistics.fmean(r[f] for r in rs) for f in rs[0] if f not in ("rule", "seed", "step", "of")}
            lines.append(f"| {rule} | {step} | {m['spearman_loss']:.3f} | {m['kendall_loss']:.3f} | "
                         f"{m['top128_overlap_loss']:.2f} | {m['spearman_mms']:.3f} | {m['kendall_mms']:.3f} | "
                         f"{m['top128_overlap_mms']:.2f} |")
        lines.append("")
    lines += [f"## Short training comparison (budget {args.budget:g} unless stated; seeds {args.seeds})", "",
              "| run | scorer | budget | steps | test acc (per seed) | mean acc | train s (per seed) | mean s | "
              "samples scored | proxy samples trained |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["rule"], r["scorer"]) for r in runs):
        rs = [r for r in runs if (r["rule"], r["scorer"]) == key]
        acc = " / ".join(f"{r['test_acc']:.4f}" for r in rs)
        secs = " / ".join(f"{r['train_s']:.1f}" for r in rs)
        budgets = "/".join(f"{r['budget']:g}" for r in rs)
        steps = "/".join(str(r["steps"]) for r in rs)
        lines.append(f"| {key[0]} | {key[1]} | {budgets} | {steps} | {acc} | "
                     f"{statistics.fmean(r['test_acc'] for r in rs):.4f} | {secs} | "
                     f"{statistics.fmean(r['train_s'] for r in rs):.1f} | {rs[0]['scored']} | "
                     f"{rs[0]['scorer_trained']} |")
    lines.append("")
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
