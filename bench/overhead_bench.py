#!/usr/bin/env python
"""What the epoch style of selection costs per training step: scores from the training
forward (``fastsel.score``), ``ScoreSampler.update`` and epoch planning, against a plain
PyTorch loop (``F.cross_entropy``, a shuffled order) on the same model and data.

Variants, each a full epoch over Fashion-MNIST with the benchmark's SmallCNN, batch 128,
SGD (the ``harness`` settings, a constant learning rate of 0.05):

* ``plain``: ``F.cross_entropy(model(x), y)``, indices from ``torch.randperm``;
  ``plain_2`` the same loop on a second model: the difference between the two is the
  noise floor of the measurement.
* ``uniform``: ``ScoreSampler(Indexed(data), Uniform())``, ``fastsel.score`` for the
  loss, ``sampler.update`` with the scores: the framework's cost alone.
* ``infobatch``: the same with ``InfoBatch()`` (its weights in the loss; fewer steps an
  epoch, so compared per step).
* ``mms_epoch``: ``MMS(keep=0.5)`` in the epoch style, the training forward scored with
  the classifier weight (the MMS recorded at every step).

Each sampler first runs one untimed epoch (so that every sample has a score and the
timed epochs are the steady state), then the variants alternate, ``--rounds`` timed epochs
each, in one process, the order rotated every round (so that no variant always follows
the same one). Reported: the median time per optimizer step (planning included, spread
over the epoch's steps) and the overhead against ``plain`` in the same round.

    python bench/overhead_bench.py [--rounds 3] [--threads 2] [--subset 20000]

Writes ``bench/results/overhead/overhead_bench.{csv,md}``.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
try:
    import fastsel
except ImportError:  # a checkout without installing
    sys.path.insert(0, str(BENCH_DIR.parent))
    import fastsel

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastsel.contract import OUTPUT_NAMES  # noqa: E402
from fastsel.experiments.datasets import fashion_mnist  # noqa: E402
from fastsel.experiments.models import SmallCNN  # noqa: E402
from fastsel.strategies import MMS, InfoBatch, Uniform  # noqa: E402

VARIANTS = ("plain", "plain_2", "uniform", "infobatch", "mms_epoch")
BATCH = 128
LR = 0.05


class _Data(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return self.y.numel()

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=5e-4)


def _plain_epoch(model, opt, x, y, gen) -> tuple[float, int]:
    t = time.perf_counter()
    steps = 0
    for idx in torch.randperm(y.numel(), generator=gen).split(BATCH):
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    return time.perf_counter() - t, steps


def _sampler_epoch(model, opt, x, y, sampler, with_mms: bool) -> tuple[float, int]:
    t = time.perf_counter()
    steps = 0
    for batch in sampler:  # planning happens in the first next()
        idx = torch.as_tensor(batch, dtype=torch.int64)
        logits = model(x[idx])
        s = fastsel.score(logits, y[idx], head=model.fc.weight.detach() if with_mms else None)
        w = sampler.weights(idx)
        loss = (s.loss * w).mean() if w is not None else s.loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sampler.update(idx, s)
        steps += 1
    return time.perf_counter() - t, steps


def _median_us(fn, reps: int) -> float:
    for _ in range(50):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e6 * statistics.median(ts)


def components(data, reps: int = 3000) -> list[dict]:
    """The work the epoch style adds to a step, each part timed alone (medians of
    ``reps`` calls, the parts interleaved in rounds): the loss through ``fastsel.score``
    (with the loss weights, forward and backward; with the head for the MMS) minus
    ``F.cross_entropy``'s on the same logits [128, 10], and the sampler's per-step calls
    (``next``, ``weights``, ``update``) plus its per-epoch planning spread over the epoch's
    steps. At this step time (~19 ms) the end-to-end epochs above cannot resolve a few
    percent (their noise floor is the plain_2 row); these parts can."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(BATCH, 10, generator=g).requires_grad_()
    t = torch.randint(0, 10, (BATCH,), generator=g)
    w = torch.ones(BATCH)
    head = torch.randn(10, 128, generator=g)

    def ce():
        F.cross_entropy(z, t).backward()

    def fs():
        (fastsel.score(z, t).loss * w).mean().backward()

    def fs_mms():
        (fastsel.score(z, t, head=head).loss * w).mean().backward()

    rows = []
    for name, strategy, with_mms in (("infobatch", InfoBatch(), False), ("mms_epoch", MMS(keep=0.5), True)):
        sampler = fastsel.ScoreSampler(data, strategy, batch_size=BATCH, epochs=100, seed=0)
        loss_g = torch.Generator().manual_seed(2)

        def scores(idx):
            n = idx.numel()
            loss = torch.rand(n, generator=loss_g) * 2
            fields = {name: loss for name in OUTPUT_NAMES}  # every score the loss: only the costs matter here
            fields.update(pred=torch.zeros(n, dtype=torch.int64), mms=loss if with_mms else None)
            return fastsel.Scores(**fields)

        for idx in sampler:  # fills the table (the first epoch is full)
            sampler.update(torch.as_tensor(idx), scores(torch.as_tensor(idx)))
        per_step, plans, steps = [], [], 0
        for _ in range(3):
            t0 = time.perf_counter()
            n = len(sampler)  # the plan
            plans.append(time.perf_counter() - t0)
            it = iter(sampler)
            for _ in range(n):
                t0 = time.perf_counter()
                idx = torch.as_tensor(next(it), dtype=torch.int64)
                sampler.weights(idx)
                t1 = time.perf_counter()
                s = scores(idx)  # the training forward's scores: not the sampler's work
                t2 = time.perf_counter()
                sampler.update(idx, s)
                per_step.append(time.perf_counter() - t2 + (t1 - t0))
                steps += 1
            for _ in it:
                pass
        loss_add = [(_median_us(fs_mms if with_mms else fs, reps // 3) - _median_us(ce, reps // 3)) for _ in range(3)]
        rows.append({"variant": name, "loss_extra_us": statistics.median(loss_add),
                     "sampler_us": 1e6 * statistics.median(per_step),
                     "plan_us_per_step": 1e6 * statistics.median(plans) / max(1, steps // 3)})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int)
    p.add_argument("--subset", type=int, help="train on the first N samples (default all 60k)")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "overhead")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train = fashion_mnist(train=True)
    x, y = train.images, train.labels
    if args.subset:
        x, y = x[:args.subset].contiguous(), y[:args.subset].contiguous()
    data = fastsel.Indexed(_Data(x, y))
    torch.manual_seed(0)
    runs = {}
    for name in VARIANTS:
        model = SmallCNN()
        strategy = {"plain": None, "plain_2": None, "uniform": Uniform(), "infobatch": InfoBatch(),
                    "mms_epoch": MMS(keep=0.5)}[name]
        sampler = None if strategy is None else fastsel.ScoreSampler(data, strategy, batch_size=BATCH,
                                                                      epochs=100, seed=0)
        runs[name] = (model, _sgd(model), sampler)
    gen = torch.Generator().manual_seed(0)
    print(f"{y.numel()} samples, batch {BATCH}, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    rows = []
    for r in range(-1, args.rounds):  # round -1: untimed, fills the score tables
        shift = max(r, 0) % len(VARIANTS)
        for name in VARIANTS[shift:] + VARIANTS[:shift]:
            model, opt, sampler = runs[name]
            if sampler is None:
                sec, steps = _plain_epoch(model, opt, x, y, gen)
            else:
                sec, steps = _sampler_epoch(model, opt, x, y, sampler, name == "mms_epoch")
            if r >= 0:
                rows.append({"round": r, "variant": name, "steps": steps, "seconds": sec,
                             "ms_per_step": 1000 * sec / steps})
                print(f"round {r} {name:10s} {steps:4d} steps {1000 * sec / steps:7.2f} ms/step")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "overhead_bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plain = {row["round"]: row["ms_per_step"] for row in rows if row["variant"] == "plain"}
    lines = ["# Epoch-style selection: overhead per training step against a plain loop", "",
             f"* {y.numel()} Fashion-MNIST samples, SmallCNN, batch {BATCH}, torch threads {torch.get_num_threads()}, "
             f"torch {torch.__version__}, fastsel {fastsel.__version__}, {args.rounds} timed epochs per variant, "
             "alternating, after one untimed epoch each", "",
             "| variant | median ms / step | overhead vs plain (median of per-round ratios) | per-round overheads |",
             "|---|---:|---:|---|"]
    for name in VARIANTS:
        mine = {row["round"]: row["ms_per_step"] for row in rows if row["variant"] == name}
        ratios = [mine[k] / plain[k] - 1 for k in sorted(mine)]
        lines.append(f"| {name} | {statistics.median(mine.values()):.2f} | {100 * statistics.median(ratios):+.1f}% "
                     f"| {', '.join(f'{100 * q:+.1f}%' for q in ratios)} |")
    comp = components(data)
    plain_ms = statistics.median(plain.values())
    lines += ["", "## The work the epoch style adds, part by part", "",
              components.__doc__.split("\n\n")[0].replace("\n    ", " ").strip(), "",
              "| variant | loss via fastsel.score − F.cross_entropy (µs) | sampler next + weights + update (µs) "
              "| planning per step (µs) | added per step (µs) | % of the plain step |", "|---|---:|---:|---:|---:|---:|"]
    for c in comp:
        added = c["loss_extra_us"] + c["sampler_us"] + c["plan_us_per_step"]
        c["added_us"], c["added_pct"] = added, 100 * added / (1000 * plain_ms)
        lines.append(f"| {c['variant']} | {c['loss_extra_us']:.0f} | {c['sampler_us']:.0f} | "
                     f"{c['plan_us_per_step']:.0f} | {added:.0f} | {c['added_pct']:.2f}% |")
    with open(out / "overhead_components.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(comp[0]))
        w.writeheader()
        w.writerows(comp)
    text = "\n".join(lines) + "\n"
    (out / "overhead_bench.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
