"""Does selection pay on *my* data? The benchmark's comparison on a user's model and data.

    from fastsel.experiments import compare
    out = compare(lambda: MyNet(num_classes=10), train_set, test_set,
                  strategies=("uniform", "infobatch", "mms_epoch"), budgets=(1.0, 0.5), seeds=3,
                  epochs=10, out="selection-report")
    print(out["text"])   # the Markdown report: accuracy, wall-clock, time to uniform's accuracy

or from the command line, with two importable callables:

    python -m fastsel.experiments.pays --model mypkg.models:make_net \\
        --data mypkg.data:train_and_test --strategies uniform,infobatch,mms_epoch --budgets 1,0.5

Every strategy trains the same model (fresh from ``model_factory()`` after seeding, so the
runs of a seed share their initialisation) with the benchmark's loop (``harness``): SGD
with Nesterov momentum, a compressed linear schedule, exactly round(budget × full steps)
optimizer steps, the clocks and counters of the benchmark. Uniform sampling at the full
budget is always run: it is the reference whose accuracy and wall-clock the others are
measured against, per seed, and uniform at each budget is the baseline with the same
optimizer steps. The outputs are the benchmark's: a CSV of every evaluation,
a Markdown report (paired differences over seeds, time to uniform's accuracy) and a PNG
of accuracy against wall-clock with seed bands.

Scope: the data are held in memory as two tensors (inputs, integer labels) and the runs
are on the CPU, one after the other (the comparison is of wall-clock times in one
process). A data set given as a ``Dataset`` is read once into tensors, with a bound on
its size (``max_bytes``). Strategies whose rule needs the classifier head (the MMS) need
``head(model)`` to return the final linear layer, the one that produces the logits:
checked on a batch before anything is trained.
"""

from __future__ import annotations

import argparse
import importlib
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch

from fastsel.experiments import harness, report
from fastsel.experiments.harness import BenchConfig, BenchData, RunSpec

__all__ = ["compare", "main", "DEFAULT_STRATEGIES"]

DEFAULT_STRATEGIES = ("uniform", "infobatch", "infobatch:epochs", "mms_epoch")
MAX_BYTES = 4 << 30
USER_MODEL = "user"

Data = Union[torch.utils.data.Dataset, Sequence[torch.Tensor]]


def _tensors(data: Data, name: str, max_bytes: int, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [N, ...] float, labels [N] int64) from a pair of tensors or a map-style
    data set of (input, label) items, read in batches with a size bound."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
    elif isinstance(data, torch.utils.data.Dataset):
        try:
            n = len(data)
        except TypeError:
            raise TypeError(f"{name} must be a map-style Dataset with a length, or (inputs, labels) tensors; "
                            f"got {type(data).__name__} without __len__") from None
        if n == 0:
            raise ValueError(f"{name} is empty")
        first = data[0]
        if not (isinstance(first, (tuple, list)) and len(first) >= 2 and isinstance(first[0], torch.Tensor)):
            raise TypeError(f"{name}[0] must be (input tensor, label), got {type(first).__name__}")
        per_item = first[0].element_size() * first[0].numel()
        if per_item * n > max_bytes:
            raise ValueError(f"{name} holds {n} inputs of {per_item} bytes, {per_item * n / 2**30:.1f} GiB, above "
                             f"max_bytes={max_bytes / 2**30:.1f} GiB: the comparison keeps the data in memory; pass "
                             "a subset (torch.utils.data.Subset) or raise max_bytes")
        loader = torch.utils.data.DataLoader(data, batch_size=1024, shuffle=False)
        if progress:
            from tqdm import tqdm
            loader = tqdm(loader, desc=f"reading {name}", unit="batch", leave=False)
        xs, ys = [], []
        for batch in loader:
            xs.append(batch[0])
            ys.append(torch.as_tensor(batch[1]))
        x, y = torch.cat(xs), torch.cat(ys)
    else:
        raise TypeError(f"{name} must be a Dataset of (input, label) items or a pair (inputs, labels) of tensors, "
                        f"got {type(data).__name__}")
    if x.dim() < 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: inputs must be [N, ...] and labels [N] with the same N, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"{name}: labels must be integer class indices, got {y.dtype}")
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"{name}: labels must be class indices >= 0, got {int(y.min())}")
    if not x.dtype.is_floating_point:
        x = x.float()
    if x.device.type != "cpu" or y.device.type != "cpu":
        raise ValueError(f"{name}: the comparison runs on the CPU; pass CPU tensors")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: inputs hold NaN or infinite values")
    return x.contiguous(), y.long().contiguous()


def _specs(strategies: Iterable[str], budgets: Sequence[float], seeds: Sequence[int]) -> list[RunSpec]:
    """Run specs from names: ``"name"`` runs at every budget (the steps framing);
    ``"name:epochs"`` once, in the fixed-epochs framing (epoch-style strategies). Uniform
    runs at the full budget (the reference) and at every budget (the baseline with the
    same steps) whether named or not."""
    rows = []
    for item in strategies:
        name, _, framing = str(item).partition(":")
        if name not in harness.STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}; known: {', '.join(harness.STRATEGIES)}")
        if framing not in ("", "steps", "epochs"):
            raise ValueError(f"strategy {item!r}: the suffix must be ':epochs' (the fixed-epochs framing) or none")
        if framing == "epochs":
            if harness.STRATEGIES[name].style != "epoch":
                raise ValueError(f"strategy {item!r}: the fixed-epochs framing needs an epoch-style strategy; "
                                 f"{name} selects in the batch")
            rows.append((name, 1.0, "epochs"))
        else:
            rows += [(name, b, "steps") for b in budgets]
    rows = list(dict.fromkeys([("uniform", b, "steps") for b in sorted({1.0, *budgets}, reverse=True)] + rows))
    return [RunSpec(name, "none", b, seed, USER_MODEL, framing=fr) for seed in seeds for name, b, fr in rows]


def _needs_head(name: str, batch_size: int) -> bool:
    """Whether the strategy's rule reads the MMS (``needs_head``, set by its constructor)."""
    spec = harness.STRATEGIES[name]
    ctx = harness._Context(1.0, batch_size, torch.nn.Linear(1, 1), None, torch.zeros(1))
    try:
        strategy = spec.resolve()(**spec.kwargs(ctx))
    except (TypeError, ValueError):  # needs a real model or data (DynaMS, RHO-LOSS): not an MMS rule
        return False
    return bool(getattr(strategy, "needs_head", False))


def _check_model(cfg: BenchConfig, x: torch.Tensor, num_classes: int, needs_head: bool) -> None:
    """One forward of two samples: logits [2, C], and (when a rule needs it) a head whose
    output is the logits."""
    torch.manual_seed(0)
    model = harness._new_model(cfg, RunSpec("uniform", model=USER_MODEL), None)
    seen: dict = {}
    head, head_error, hook = None, None, None
    if needs_head:
        try:
            head = harness.model_head(cfg, model)
        except (ValueError, AttributeError, TypeError) as e:
            head_error = e
        else:
            hook = head.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x[:2])
    except Exception as e:
        raise ValueError(f"the model cannot run on the training inputs {tuple(x[:2].shape)}: "
                         f"{type(e).__name__}: {e}") from None
    finally:
        model.train(was)
        if hook is not None:
            hook.remove()
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape != (min(2, x.shape[0]), num_classes):
        raise ValueError(f"the model must return logits [batch, {num_classes}], got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if not needs_head:
        return
    if head_error is not None:
        raise ValueError(f"a strategy you chose (the MMS) needs the classifier head: {head_error}")
    if not (isinstance(seen.get("out"), torch.Tensor) and seen["out"].shape == logits.shape
            and torch.equal(seen["out"], logits)):
        raise ValueError("head(model) must be the layer that produces the logits (the model's last nn.Linear, "
                         "applied last): the MMS is computed from its weight")


def compare(model_factory: Callable[[], torch.nn.Module], train: Data, test: Data, *,
            strategies: Iterable[str] = DEFAULT_STRATEGIES, budgets: Sequence[float] = (1.0, 0.5),
            seeds: Union[int, Sequence[int]] = 3, epochs: int = 5, batch_size: int = 128, lr: float = 0.1,
            evals: int = 12, head: Optional[Callable[[torch.nn.Module], torch.nn.Module]] = None,
            num_classes: Optional[int] = None, out: Union[str, Path, None] = "fastsel-compare",
            progress: bool = True, max_bytes: int = MAX_BYTES) -> dict:
    """Trains ``model_factory()`` with each strategy and budget, for each seed, and
    reports whether selection beat uniform sampling in wall-clock time.

    Args:
        model_factory: builds a fresh model, ``inputs -> logits [B, C]``.
        train, test: ``(inputs, labels)`` CPU tensors or map-style data sets of
            ``(input, label)`` items (read once into memory, at most ``max_bytes``).
        strategies: names of ``fastsel.experiments.STRATEGIES`` (e.g. ``"infobatch"``,
            ``"mms_epoch"``, ``"dynams"``, ``"mms"``); ``"name:epochs"`` runs an
            epoch-style strategy in the fixed-epochs framing (its own epochs, fewer steps).
            Uniform runs at every budget whether named or not (the baselines).
        budgets: fractions of the full budget (``epochs`` passes over ``train``).
        seeds: a count (3 = seeds 0, 1, 2) or the seeds.
        head: ``model -> its final nn.Linear`` for the MMS rules (default ``model.fc``).
        num_classes: default: 1 + the largest label of ``train`` and ``test``.
        out: directory of the CSV, report and plot (None: write nothing).

    Returns ``{"results", "groups", "claims", "text"}`` plus the paths written
    (``"csv"``, ``"md"``, ``"pngs"``) when ``out`` is given.
    """
    if not callable(model_factory):
        raise TypeError(f"model_factory must be callable (returning an nn.Module), got {type(model_factory).__name__}")
    if head is not None and not callable(head):
        raise TypeError(f"head must be callable (model -> its final nn.Linear), got {type(head).__name__}")
    for name, v in (("epochs", epochs), ("batch_size", batch_size), ("evals", evals)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    budgets = tuple(budgets)
    if not budgets or any(not isinstance(b, (int, float)) or not 0 < b <= 1 for b in budgets):
        raise ValueError(f"budgets must be fractions in (0, 1], got {budgets!r}")
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"seeds must be a positive count or a list of seeds, got {seeds}")
        seeds = tuple(range(seeds))
    seeds = tuple(seeds)
    if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be non-negative ints, got {seeds!r}")
    if isinstance(strategies, str):
        strategies = (strategies,)
    specs = _specs(strategies, budgets, seeds)

    x, y = _tensors(train, "train", max_bytes, progress)
    tx, ty = _tensors(test, "test", max_bytes, progress)
    if x.shape[1:] != tx.shape[1:]:
        raise ValueError(f"train and test inputs differ in shape: {tuple(x.shape[1:])} vs {tuple(tx.shape[1:])}")
    c = int(max(int(y.max()), int(ty.max()) if ty.numel() else 0)) + 1
    if num_classes is not None:
        if not isinstance(num_classes, int) or num_classes < c:
            raise ValueError(f"num_classes must be an int >= 1 + the largest label ({c}), got {num_classes!r}")
        c = num_classes
    if c < 2:
        raise ValueError("the labels hold a single class: there is nothing to classify")
    for s in specs:
        cand = harness.STRATEGIES[s.strategy].candidates
        if cand > y.numel():
            raise ValueError(f"{s.strategy} scores candidate batches of {cand} samples; the training set has "
                             f"{y.numel()}")
    cfg = BenchConfig(epochs=epochs, batch_size=batch_size, evals=evals, lr=float(lr), progress=progress,
                      model_factory=model_factory, head=head)
    needs_head = any(_needs_head(s.strategy, batch_size) for s in specs)
    _check_model(cfg, x, c, needs_head)
    data = BenchData(x, y, tx, ty, float(x.min()), tuple(str(i) for i in range(c)))

    start = time.perf_counter()
    results, skipped = harness.run_grid(specs, cfg, data)
    output: dict[str, Any] = {"results": results}
    if out is not None:
        output.update(report.write_all(results, skipped, cfg, data, out, _environment(cfg, x, y, tx, start)))
    else:
        report.annotate(results)
        output["text"] = report.markdown(results, skipped, cfg)
    output["groups"] = report.groups(results)
    output["claims"] = report.claims(output["groups"])
    return output


def _environment(cfg: BenchConfig, x, y, tx, start) -> dict:
    env = report.environment(cfg)
    env["training samples"] = f"{y.numel()} inputs {tuple(x.shape[1:])}"
    env["test samples"] = tx.shape[0]
    env["duration of the comparison"] = f"{time.perf_counter() - start:.0f} s"
    return env


# ----------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------

def _load(ref: str, what: str):
    module, sep, attr = ref.partition(":")
    if not sep or not module or not attr:
        raise SystemExit(f"--{what} must be 'package.module:callable', got {ref!r}")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise SystemExit(f"--{what}: cannot import {module!r}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SystemExit(f"--{what}: {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SystemExit(f"--{what}: {ref} is not callable")
    return obj


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m fastsel.experiments.pays",
                                description="Does data selection beat uniform sampling in wall-clock time on my "
                                            "model and data?")
    p.add_argument("--model", required=True, help="package.module:factory, a callable returning a fresh model")
    p.add_argument("--data", required=True,
                   help="package.module:callable returning (train, test): data sets of (input, label) or "
                        "(inputs, labels) tensor pairs")
    p.add_argument("--head", help="package.module:callable, model -> its final nn.Linear (default model.fc)")
    p.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                   help="comma-separated; name:epochs for the fixed-epochs framing (default %(default)s); known: "
                        + ", ".join(harness.STRATEGIES))
    p.add_argument("--budgets", default="1,0.5", help="fractions of the full budget (default %(default)s)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. n-1 (default %(default)s)")
    p.add_argument("--epochs", type=int, default=5, help="passes over the training set at the full budget")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate (default %(default)s)")
    p.add_argument("--out", default="fastsel-compare", help="output directory (default %(default)s)")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        budgets = tuple(float(b) for b in args.budgets.split(",") if b.strip())
    except ValueError:
        p.error(f"--budgets must be comma-separated numbers, got {args.budgets!r}")
    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be positive")
        torch.set_num_threads(args.threads)
    model = _load(args.model, "model")
    data = _load(args.data, "data")()
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise SystemExit(f"--data must return (train, test), got {type(data).__name__}")
    head = _load(args.head, "head") if args.head else None
    try:
        out = compare(model, data[0], data[1], strategies=[s.strip() for s in args.strategies.split(",") if s.strip()],
                      budgets=budgets, seeds=args.seeds, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      head=head, out=args.out, progress=not args.no_progress)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}") from None
    print(out["text"])
    print(f"wrote {out['csv']}, {out['md']} and {len(out['pngs'])} PNG(s) to {args.out}")
    return out


if __name__ == "__main__":
    main()
