"""End-to-end experiments: does data selection beat uniform sampling in wall-clock time on
real data? A small CNN and an MLP on Fashion-MNIST, budgets as fractions of the full
number of iterations with the learning-rate schedule compressed to the budget (Arazo et
al. 2021), augmentations (none, crop+flip, RICAP, mixup, cutmix), the strategies of
``fastsel.strategies`` plus uniform, several seeds.

* ``models``: ``SmallCNN`` (~100k parameters) and ``MLP``, both with the head as ``.fc``.
* ``augment``: batch augmentations returning mixed ``Targets``.
* ``harness``: runs (``RunSpec``) and grids; clocks, costs and curves.
* ``report``: CSV, Markdown, PNG plots and the verdict on the targets and the published claims.
* ``pays``: ``compare(model_factory, train, test, ...)``, the same comparison on a user's
  model and data (``python -m fastsel.experiments.pays``).

Command line: ``bench/train_bench.py`` (``make train-bench``). Importing this package
does not import matplotlib or tqdm; ``report`` imports matplotlib when it plots.
"""

from fastsel.experiments.augment import AUGMENTATIONS, Targets, get_augmentation
from fastsel.experiments.harness import (
    DEFAULT_BUDGETS,
    DEFAULT_EPOCHS,
    DEFAULT_GRID,
    REGIMES,
    SMOKE_GRID,
    STRATEGIES,
    BenchConfig,
    RunResult,
    RunSpec,
    load_data,
    lr_schedule,
    expand,
    make_grid,
    regime_data,
    run_grid,
    run_one,
)
from fastsel.experiments.models import MLP, MODELS, SmallCNN, build_model
from fastsel.experiments.pays import compare

__all__ = [
    "AUGMENTATIONS", "Targets", "get_augmentation", "DEFAULT_BUDGETS", "DEFAULT_EPOCHS", "DEFAULT_GRID",
    "SMOKE_GRID", "STRATEGIES", "BenchConfig", "RunResult", "RunSpec", "load_data", "lr_schedule", "make_grid",
    "expand", "regime_data", "REGIMES", "run_grid", "run_one", "MLP", "MODELS", "SmallCNN", "build_model",
    "compare",
]
