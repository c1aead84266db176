"""The end-to-end benchmark harness (fastsel.experiments, bench/train_bench.py): unit tests
of the augmentations, the compressed learning-rate schedule and the models, and a smoke
run of the whole harness on 2k Fashion-MNIST samples (1 epoch, uniform + MMS) that checks
its outputs exist and are consistent."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import torch

import fastsel
from fastsel.experiments import augment, harness, report
from fastsel.experiments.augment import Targets
from fastsel.experiments.models import MLP, SmallCNN, count_parameters

ROOT = Path(__file__).resolve().parent.parent


def _data_missing() -> str | None:
    from fastsel.experiments.datasets import fashion_mnist

    try:
        fashion_mnist(train=False)
    except FileNotFoundError as e:
        return f"Fashion-MNIST is not installed ({e})"
    return None


# ----------------------------------------------------------------------------------
# Augmentations
# ----------------------------------------------------------------------------------

def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.arange(n)  # distinct labels: label = source index


@pytest.mark.parametrize("name", list(augment.AUGMENTATIONS))
def test_augmentation_shapes_weights_dominant(name):
    x, y = _batch()
    aug = augment.get_augmentation(name, fill=-0.81)
    for seed in range(5):
        out, t = aug(x, y, torch.Generator().manual_seed(seed))
        assert out.shape == x.shape and out.dtype == x.dtype
        assert t.labels.dtype == torch.int64 and t.labels.shape[0] == 16 and t.weights.shape == t.labels.shape
        assert torch.allclose(t.weights.sum(1), torch.ones(16), atol=1e-6)
        assert bool((t.weights >= 0).all())
        assert torch.equal(t.dominant(), y), "the dominant label must be the sample's own"
        for k in range(t.k):  # every label set is a permutation of the batch's labels
            assert sorted(t.labels[:, k].tolist()) == list(range(16))


@pytest.mark.parametrize("name", list(augment.AUGMENTATIONS))
def test_augmentation_seeded(name):
    x, y = _batch()
    aug = augment.get_augmentation(name)
    a = aug(x, y, torch.Generator().manual_seed(3))
    b = aug(x, y, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1].labels, b[1].labels) and torch.equal(a[1].weights, b[1].weights)
    if name != "none":
        outs = [aug(x, y, torch.Generator().manual_seed(s))[0] for s in range(4, 24)]
        assert any(not torch.equal(o, outs[0]) for o in outs[1:]), "different seeds should give different batches"


def test_mixup_is_the_weighted_pair():
    x, y = _batch()
    for seed in range(5):
        out, t = augment.mixup(x, y, torch.Generator().manual_seed(seed))
        assert t.k == 2 and float(t.weights[0, 0]) >= 0.5
        want = t.weights[:, :1, None, None] * x + t.weights[:, 1:, None, None] * x[t.labels[:, 1]]
        assert torch.allclose(out, want.view_as(out), atol=1e-5)


def test_cutmix_pixels_come_from_the_pair_in_proportion():
    x, y = _batch()
    applied = 0
    for seed in range(20):
        out, t = augment.cutmix(x, y, torch.Generator().manual_seed(seed))
        other = x[t.labels[:, 1]]
        from_self = out == x
        from_other = (out == other) & ~from_self
        assert bool((from_self | from_other).all())
        frac = from_other.float().mean(dim=(1, 2, 3))
        moved = t.labels[:, 1] != y  # a sample the permutation maps to itself pastes its own pixels
        assert torch.allclose(frac[moved], t.weights[moved, 1], atol=1e-6)
        applied += float(t.weights[0, 1]) > 0
    assert 0 < applied < 20  # applied with probability 1/2


def test_ricap_areas():
    x, y = _batch()
    for seed in range(10):
        out, t = augment.ricap(x, y, torch.Generator().manual_seed(seed))
        assert t.k == 4
        w = t.weights[0]
        assert torch.equal(t.weights, w.expand_as(t.weights))  # one layout per batch
        cells = (w * 28 * 28).round()
        assert torch.allclose(w * 28 * 28, cells, atol=1e-3)  # whole pixels
        # The four patch areas: (a, b) x (c, d) with a + b = c + d = 28.
        assert math.isclose(float(w[0] + w[1] + w[2] + w[3]), 1.0, abs_tol=1e-6)
        assert math.isclose(float((w[0] + w[2]) * (w[0] + w[1])), float(w[0]), abs_tol=1e-6)


def test_crop_flip_pixels_are_shifted_image_or_fill():
    x, y = _batch(8)
    fill = -0.81
    out, t = augment.crop_flip(x, y, torch.Generator().manual_seed(1), fill=fill)
    assert t.k == 1 and torch.equal(t.labels[:, 0], y)
    for i in range(8):
        padded = torch.nn.functional.pad(x[i], (4, 4, 4, 4), value=fill)
        ok = False
        for img in (padded, padded.flip(-1)):
            for dy in range(9):
                for dx in range(9):
                    if torch.equal(img[:, dy:dy + 28, dx:dx + 28], out[i]):
                        ok = True
        assert ok, f"sample {i} is not a crop (and flip) of its padded image"


def test_dominant_scores_per_sample():
    logits = torch.randn(6, 10)
    labels = torch.tensor([[1, 2]] * 6)
    weights = torch.tensor([[0.7, 0.3], [0.2, 0.8]] * 3)
    t = Targets(labels, weights)
    s = [fastsel.score(logits, labels[:, k]) for k in range(2)]
    d = harness._dominant_scores(s, [0, 1], t)
    want = torch.where(weights[:, 0] >= weights[:, 1], s[0].loss, s[1].loss)
    assert torch.allclose(d.loss, want)
    assert torch.equal(t.dominant(), torch.tensor([1, 2] * 3))


# ----------------------------------------------------------------------------------
# Schedule, evaluation points, models, queue
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("total", [1, 2, 7, 50, 563, 1876])
def test_lr_schedule_ends_at_zero_with_one_peak(total):
    lrs = harness.lr_schedule(total, peak=0.1, warmup=0.02)
    assert len(lrs) == total + 1
    assert lrs[total] == 0.0
    assert all(v > 0 for v in lrs[:total])
    top = max(lrs)
    assert math.isclose(top, 0.1) and sum(1 for v in lrs if v == top) == 1
    peak = lrs.index(top)
    assert peak == max(1, math.ceil(0.02 * total)) - 1
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))            # warm-up rises
    assert all(a > b for a, b in zip(lrs[peak:], lrs[peak + 1:]))             # then decays to 0


def test_lr_schedule_is_compressed_to_the_budget():
    full, short = harness.lr_schedule(2000), harness.lr_schedule(600)
    assert short.index(max(short)) + 1 == 12 and full.index(max(full)) + 1 == 40  # warm-up: 2% of each
    for t in range(12, 601, 7):  # the same decay, time-scaled (to within a step of the short schedule)
        assert abs(short[t] - full[round(t * 2000 / 600)]) <= 0.1 / 588 + 1e-12


def test_eval_steps():
    assert harness.eval_steps(100, 4) == [0, 25, 50, 75, 100]
    assert harness.eval_steps(3, 12) == [0, 1, 2, 3]
    pts = harness.eval_steps(563, 12)
    assert pts[0] == 0 and pts[-1] == 563 and pts == sorted(set(pts))


def test_models():
    cnn, mlp = SmallCNN(), MLP()
    assert 90_000 <= count_parameters(cnn) <= 110_000
    assert isinstance(cnn.fc, torch.nn.Linear) and isinstance(mlp.fc, torch.nn.Linear)
    x = torch.randn(5, 1, 28, 28)
    assert cnn(x).shape == (5, 10) and mlp(x).shape == (5, 10)


def test_queue_releases_exact_batches():
    q = harness._Queue()
    sizes = [0, 30, 50, 128, 7, 200]
    for i, n in enumerate(sizes):
        q.push(torch.full((n,), i), torch.arange(n))
    got = []
    while q.size >= 128:
        a, b = q.pop(128)
        assert a.shape == (128,) and b.shape == (128,)
        got.append(a)
    assert q.size == sum(sizes) - 128 * len(got)
    assert torch.equal(torch.cat(got), torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])[:128 * len(got)])


def test_grid_order_and_reference():
    specs = harness.make_grid([("mms", "none"), ("uniform", "none")], (0.3, 1.0), (0, 1))
    assert specs[0] == harness.RunSpec("mms", "none", 1.0, 0) and specs[1].is_reference
    assert [s.budget for s in specs[:4]] == [1.0, 1.0, 0.3, 0.3]
    assert harness.RunSpec("uniform", "ricap", 1.0).label == "uniform+ricap"
    assert not harness.RunSpec("uniform", "ricap", 1.0).is_reference


def test_unknown_or_unavailable_strategy():
    assert harness.strategy_available("uniform") is None
    assert "unknown strategy" in harness.strategy_available("nope")
    spec = harness.StrategySpec("ghost", "fastsel.strategies.ghost:Ghost", "batch", "not written yet")
    with pytest.raises(harness.StrategyUnavailable, match="ghost"):
        spec.resolve()


# ----------------------------------------------------------------------------------
# Smoke run of the harness
# ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    reason = _data_missing()
    if reason:
        pytest.skip(reason + "; `make train-bench` installs Debian's dataset-fashion-mnist")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import train_bench
    finally:
        sys.path.remove(str(ROOT / "bench"))
    out = tmp_path_factory.mktemp("train_bench")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # robust on a shared machine; restored below
    try:
        result = train_bench.main(["--smoke", "--no-progress", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    with open(out / "train_bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return out, result, rows


def test_smoke_files(smoke):
    out, result, rows = smoke
    for name in ("train_bench.csv", "train_bench.md", "acc_vs_wallclock.png", "mms_distribution.png",
                 "importance_grid.png", "mms_trace.csv"):
        path = out / name
        assert path.exists() and path.stat().st_size > 0, name
    for png in result["pngs"]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "train_bench.md").read_text()
    assert "Target 1" in md and "Target 2" in md and "| uniform |" in md and "| mms |" in md


def test_smoke_csv_consistent(smoke):
    _, _, rows = smoke
    assert rows and tuple(rows[0].keys()) == report.CSV_COLUMNS
    runs: dict[tuple, list[dict]] = {}
    for r in rows:
        runs.setdefault((r["strategy"], r["augment"], r["budget"], r["seed"]), []).append(r)
    assert {(k[0], float(k[2])) for k in runs} == {("uniform", 1.0), ("uniform", 0.5), ("mms", 1.0), ("mms", 0.5)}
    for key, rs in runs.items():
        assert [int(r["eval"]) for r in rs] == list(range(len(rs)))
        assert len(rs) >= 4 and int(rs[0]["step"]) == 0 and float(rs[0]["train_s"]) == 0.0
        for col in ("step", "train_s", "train_cpu_s", "samples_trained", "samples_scored", "samples_forwarded",
                    "passes"):
            vals = [float(r[col]) for r in rs]
            assert vals == sorted(vals), f"{key}: {col} not monotone: {vals}"
        assert all(0.0 <= float(r["test_acc"]) <= 1.0 for r in rs)
        last = rs[-1]
        assert last["final"] == "1" and all(r["final"] == "0" for r in rs[:-1])
        assert int(last["step"]) == int(last["steps"]) == round(float(last["budget"]) * int(last["full_steps"]))
        assert float(last["test_acc"]) == float(last["final_acc"])
        assert math.isclose(float(last["train_s"]), float(last["run_train_s"]), abs_tol=1e-3)
        assert int(last["full_steps"]) == math.ceil(2000 / 128)  # 1 epoch of the 2k subset
        assert 0.0 <= float(last["score_pct"]) < 100.0
        assert float(last["target_acc"]) == float(runs[("uniform", "none", "1.0", "0")][-1]["final_acc"])
        if key[0] == "mms":  # 640 candidates scored per 128 trained
            assert int(last["samples_scored"]) == 5 * int(last["samples_trained"])
            assert float(last["select_fwd_s"]) > 0
        else:
            assert int(last["samples_scored"]) == 0
            assert 0 < int(last["samples_trained"]) <= 128 * int(last["steps"])
    ref = runs[("uniform", "none", "1.0", "0")][-1]
    # The reference reaches its own final accuracy at its end.
    assert math.isclose(float(ref["time_to_target_ratio"]), 1.0, abs_tol=1e-3)


@pytest.mark.parametrize("name", ["mms_epoch", "hard_loss_epoch", "cdf_epoch", "upper_bound_is_epoch"])
def test_epoch_style_rules_run_in_the_harness(name):
    """The epoch style of the score rules through the harness: scores from the training
    forward (the MMS with the head), nothing scored besides, half the data after the
    first (full) pass."""
    reason = _data_missing()
    if reason:
        pytest.skip(reason)
    assert harness.strategy_available(name) is None
    cfg = harness.BenchConfig(epochs=2, subset=512, test_subset=256, evals=2, progress=False)
    data = harness.load_data(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = harness.run_one(harness.RunSpec(name, budget=1.0, seed=0), cfg, data)
    finally:
        torch.set_num_threads(threads)
    last = result.curve[-1]
    assert last["samples_scored"] == 0
    assert last["samples_trained"] == 2 * 512  # the full budget of steps, whatever the plans
    assert 0.0 <= last["test_acc"] <= 1.0
