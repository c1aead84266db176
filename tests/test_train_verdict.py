"""The verdict machinery of the end-to-end benchmark (issue: selection that pays): the
regimes' data sets (label noise, near-duplicates), the aggressive schedule, the
fixed-epochs framing, the verdict grid's layout, paired comparisons over seeds, the
verdict on each published claim and the per-setting plot. Report functions are checked
on constructed results with known answers; the framing on a few hundred real samples."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch

from fastsel.experiments import harness, report
from fastsel.experiments.harness import BenchConfig, BenchData, RunResult, RunSpec

ROOT = Path(__file__).resolve().parent.parent


def _data_missing():
    from fastsel.experiments.datasets import fashion_mnist

    try:
        fashion_mnist(train=False)
    except FileNotFoundError as e:
        return f"Fashion-MNIST is not installed ({e})"
    return None


def _synthetic(n=1000, classes=10, seed=0) -> BenchData:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g)
    y = torch.arange(n) % classes
    return BenchData(x, y, x[:50].clone(), y[:50].clone(), 0.0, tuple(f"c{i}" for i in range(classes)))


# ----------------------------------------------------------------------------------
# Regimes
# ----------------------------------------------------------------------------------

def test_noisy_regime_flips_exactly_30_percent_to_another_class():
    base = _synthetic()
    x0, y0 = base.train_x.clone(), base.train_y.clone()
    d = harness.regime_data(base, "noisy")
    assert d.noisy.sum() == 300 and d.regime == "noisy" and d.base is base
    assert torch.equal(d.train_y[~d.noisy], y0[~d.noisy])
    assert bool((d.train_y[d.noisy] != y0[d.noisy]).all()), "a replaced label must be another class"
    assert int(d.train_y.min()) >= 0 and int(d.train_y.max()) <= 9
    # every wrong class is used (uniform over the other 9): no class offset is favoured
    shift = (d.train_y[d.noisy] - y0[d.noisy]) % 10
    counts = torch.bincount(shift, minlength=10)
    assert counts[0] == 0 and bool((counts[1:] > 15).all())
    assert torch.equal(d.train_x, x0) and torch.equal(base.train_y, y0), "the loaded data must not change"
    assert torch.equal(d.test_y, base.test_y)
    assert harness.regime_data(base, "noisy") is d  # cached
    again = harness.regime_data(_synthetic(), "noisy")  # a fresh load: the same data set
    assert torch.equal(again.train_y, d.train_y)


def test_redundant_regime_replaces_half_with_jittered_easy_copies():
    base = _synthetic()
    d = harness.regime_data(base, "redundant")
    dup = d.duplicate
    assert dup.sum() == 500
    assert torch.equal(d.train_x[~dup], base.train_x[~dup]) and torch.equal(d.train_y[~dup], base.train_y[~dup])
    assert set(d.train_y[dup].tolist()) <= set(harness.EASY_CLASSES)
    kept = (~dup).nonzero().squeeze(1)
    easy = kept[torch.isin(base.train_y[kept], torch.tensor(harness.EASY_CLASSES))]
    # each copy is within the jitter of a one-pixel shift of a kept easy sample of its class
    for i in dup.nonzero().squeeze(1)[:40].tolist():
        best = math.inf
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                shifted = torch.roll(base.train_x[easy], shifts=(dy, dx), dims=(-2, -1))
                err = (d.train_x[i] - shifted)[..., 1:-1, 1:-1]  # the border holds the fill
                rms = err.pow(2).mean(dim=(1, 2, 3)).sqrt()
                same_label = base.train_y[easy] == d.train_y[i]
                best = min(best, float(rms[same_label].min()))
        assert best < 2 * harness.DUPLICATE_JITTER, (i, best)
    assert best > 0.5 * harness.DUPLICATE_JITTER  # the jitter is there


def test_regime_with_subset_and_errors():
    base = _synthetic()
    d = harness.regime_data(base, "clean", 300)
    assert d.train_y.numel() == 300 and d.subset == 300
    n = harness.regime_data(base, "noisy", 300)
    assert n.noisy.sum() == 90
    assert harness.regime_data(base, "clean") is base
    with pytest.raises(ValueError, match="regime must be one of"):
        harness.regime_data(base, "dirty")
    with pytest.raises(ValueError, match="derives from the loaded data"):
        harness.regime_data(n, "redundant")


# ----------------------------------------------------------------------------------
# Schedules and specs
# ----------------------------------------------------------------------------------

def test_aggressive_schedule_is_cubic_and_below_the_linear():
    lin, agg = harness.lr_schedule(1000), harness.lr_schedule(1000, shape="aggressive")
    w = math.ceil(0.02 * 1000)
    assert agg[:w] == lin[:w] and agg[-1] == 0.0 and max(agg) == agg[w - 1] == 0.1
    for t in range(w, 1001):
        u = (1000 - t) / (1000 - w + 1)
        assert math.isclose(agg[t], 0.1 * u ** 3, rel_tol=1e-12, abs_tol=1e-15)
        assert agg[t] <= lin[t] + 1e-15
    mid = w + (1000 - w) // 2
    assert math.isclose(agg[mid] / lin[mid], 0.25, rel_tol=0.01)  # half-way: 1/8 peak vs 1/2 peak
    with pytest.raises(ValueError, match="shape"):
        harness.lr_schedule(10, shape="cosine")


@pytest.mark.parametrize("shape", harness.SCHEDULES)
def test_lr_at_follows_the_step_schedule(shape):
    total = 800
    lrs = harness.lr_schedule(total, shape=shape)
    slope = 0.1 * (1 if shape == "linear" else 3)  # |d lr / d progress| at most peak x exponent
    for t in range(0, total + 1, 7):
        assert abs(harness.lr_at(t / total, shape=shape, width=1 / total) - lrs[t]) <= slope * 2 / total + 1e-12, t
    assert harness.lr_at(1.0, shape=shape) == 0.0 and harness.lr_at(2.0, shape=shape) == 0.0


def test_runspec_validation_labels_and_settings():
    s = RunSpec("infobatch", framing="epochs")
    assert s.label == "infobatch [fixed epochs]" and not s.is_reference
    assert RunSpec("mms", schedule="aggressive").label == "mms [aggressive lr]"
    assert not RunSpec("uniform", schedule="aggressive").is_reference and RunSpec("uniform").is_reference
    assert RunSpec("uniform", regime="noisy").setting(BenchConfig()) == "cnn, noisy, 5 epochs"
    assert RunSpec("uniform", epochs=20, subset=15000).setting(BenchConfig()) == "cnn, clean, 20 epochs, 15k samples"
    for kw, msg in (({"regime": "x"}, "regime"), ({"framing": "x"}, "framing"), ({"schedule": "x"}, "schedule"),
                    ({"budget": 0.0}, "budget"), ({"budget": 1.5}, "budget"), ({"epochs": 0}, "epochs"),
                    ({"subset": True}, "subset")):
        with pytest.raises(ValueError, match=msg):
            RunSpec("uniform", **kw)


def test_verdict_grid_layout():
    grid = harness.DEFAULT_GRID
    settings = list(dict.fromkeys(t.setting() for t in grid))
    assert len(settings) == 4
    for st in settings:  # every setting has its reference and the same-budget uniform of each row
        rows = [t for t in grid if t.setting() == st]
        assert sum(t.is_reference for t in rows) == 1
        for t in rows:
            if t.framing == "steps":
                assert any(u.strategy == "uniform" and u.augment == "none" and u.budget == t.budget
                           and u.schedule == "linear" for u in rows), t
    for t in grid:
        if t.framing == "epochs":
            assert harness.STRATEGIES[t.strategy].style == "epoch"
        assert harness.strategy_available(t.strategy) is None
    specs = harness.expand(grid, (0, 1, 2))
    assert len(specs) == 3 * len(grid) and [s.seed for s in specs] == sorted(s.seed for s in specs)
    first = {}
    for i, s in enumerate(specs):
        first.setdefault((s.seed, s.setting()), (i, s))
    assert all(s.is_reference for _, s in first.values()), "each setting's reference runs first"
    est = harness.estimate_seconds(specs, BenchConfig())
    assert 20 * 60 < est < 70 * 60, est / 60  # the default grid stays within about an hour


def test_cli_regime_framing_schedule():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import train_bench
    finally:
        sys.path.remove(str(ROOT / "bench"))
    specs, _ = train_bench.plan(train_bench.parse_args(
        ["--strategies", "uniform,infobatch", "--regime", "noisy", "--framing", "epochs", "--budgets", "1,0.5"]))
    assert specs[0].is_reference and specs[0].regime == "noisy"
    assert {(s.strategy, s.framing, s.budget) for s in specs} == {("uniform", "steps", 1.0), ("uniform", "epochs", 1.0),
                                                                  ("infobatch", "epochs", 1.0)}
    with pytest.raises(SystemExit, match="epoch-style"):
        train_bench.plan(train_bench.parse_args(["--strategies", "mms", "--framing", "epochs"]))
    specs, _ = train_bench.plan(train_bench.parse_args(["--seeds", "2"]))
    assert len(specs) == 2 * len(harness.DEFAULT_GRID)


# ----------------------------------------------------------------------------------
# Paired comparisons and verdicts, on constructed results
# ----------------------------------------------------------------------------------

def test_paired_t_test_values():
    p = report.paired({0: 0.90, 1: 0.80, 2: 0.85}, {0: 0.80, 1: 0.75, 2: 0.80, 3: 0.1})
    assert p["n"] == 3 and math.isclose(p["mean"], 0.2 / 3) and math.isclose(p["std"], 0.05 / math.sqrt(3))
    assert math.isclose(p["t"], 4.0) and p["significant"] is False  # t_0.975(2) = 4.303
    p = report.paired({0: 0.90, 1: 0.81, 2: 0.85}, {0: 0.80, 1: 0.75, 2: 0.80})
    assert p["t"] > 4.303 and p["significant"] is True
    one = report.paired({0: 0.9}, {0: 0.8})
    assert one["n"] == 1 and one["significant"] is None
    assert report.paired({0: 0.9}, {1: 0.8}) is None
    same = report.paired({0: 0.9, 1: 0.8}, {0: 0.9, 1: 0.8})
    assert same["t"] == 0.0 and same["significant"] is False


def _result(spec: RunSpec, accs: list[float], train_s: float, steps: int = 100) -> RunResult:
    curve = [{"step": round(i * steps / (len(accs) - 1)), "passes": 0.0, "train_s": train_s * i / (len(accs) - 1),
              "train_cpu_s": 0.0, "samples_scored": 0, "samples_trained": 0, "test_acc": a, "test_loss": 0.0}
             for i, a in enumerate(accs)]
    summary = {"setting": spec.setting(BenchConfig()), "steps": steps, "full_steps": 100, "epochs_full": 5,
               "train_samples": 1000, "final_acc": accs[-1], "final_loss": 0.0, "train_s": train_s,
               "train_cpu_s": train_s, "samples_scored": 0, "samples_trained": 0, "score_s": 0.0,
               "select_fwd_s": 0.0, "select_other_s": 0.0, "plan_s": 0.0, "aux_s": 0.0, "step_ms": 1.0,
               "score_pct": 1.0, "select_pct": 0.0}
    return RunResult(spec, curve, summary)


def _grid(infobatch_accs, infobatch_time=60.0):
    out = []
    for seed, (u, ib) in enumerate(zip((0.900, 0.905, 0.895), infobatch_accs)):
        out.append(_result(RunSpec("uniform", seed=seed), [0.1, 0.8, 0.88, u], 100.0))
        out.append(_result(RunSpec("uniform", budget=0.5, seed=seed), [0.1, 0.85, u - 0.01], 50.0, 50))
        out.append(_result(RunSpec("infobatch", framing="epochs", seed=seed), [0.1, 0.85, ib - 0.002, ib],
                           infobatch_time, 70))
    report.annotate(out)
    return out


def _claim(results, start):
    rows = report.claims(report.groups(results))
    found = [c for c in rows if c["claim"].startswith(start)]
    assert len(found) == 1, rows
    return found[0]


def test_infobatch_claim_verdicts():
    holds = _claim(_grid((0.901, 0.904, 0.896)), "InfoBatch: ~40% saving")
    assert holds["verdict"] == "holds" and "40% less wall-clock" in holds["measured"]
    worse = _claim(_grid((0.890, 0.894, 0.886)), "InfoBatch: ~40% saving")  # 1 pt lower in every seed
    assert worse["verdict"] == "does not hold" and "*" in worse["measured"]
    slow = _claim(_grid((0.901, 0.904, 0.896), infobatch_time=95.0), "InfoBatch: ~40% saving")
    assert slow["verdict"] == "does not hold"  # lossless but 5% saving
    noisy = _claim(_grid((0.905, 0.890, 0.899)), "InfoBatch: ~40% saving")  # -0.2 pts on average, seeds disagree
    assert noisy["verdict"] == "inconclusive"


def test_groups_time_to_target_and_paired_columns():
    gs = {(g["label"], g["budget"]): g for g in report.groups(_grid((0.901, 0.904, 0.896)))}
    ib = gs[("infobatch [fixed epochs]", 1.0)]
    # seeds 0 and 2 reach their target at the last evaluation (60 s of 100 s); seed 1 ends
    # 0.1 pt below its own
    assert ib["reached"] == 2 and ib["ratio"] is None and ib["ratio_some"] == pytest.approx(0.6)
    assert ib["wall_ratio"] == pytest.approx(0.6)
    assert ib["vs_ref"]["mean"] == pytest.approx(0.001 / 3) and ib["vs_same"] == ib["vs_ref"]
    half = gs[("uniform", 0.5)]
    assert half["ratio"] is None and half["reached"] == 0
    assert half["vs_ref"]["mean"] == pytest.approx(-0.01) and half["vs_ref"]["significant"] is True


@pytest.mark.parametrize("times, verdict, text", [((70.0, 80.0, 60.0), "holds", "0.70 ± 0.10×"),
                                                  ((80.0, 90.0, 70.0), "inconclusive", "0.80 ± 0.10×"),
                                                  ((100.0, 110.0, 90.0), "does not hold", "1.00 ± 0.10×")])
def test_speed_claim_and_plot(tmp_path, times, verdict, text):
    results = _grid((0.901, 0.904, 0.896))
    for seed in range(3):  # in-batch MMS at 0.3 that reaches the target at its end
        t = times[seed]
        acc = results[3 * seed].summary["final_acc"]
        results.append(_result(RunSpec("uniform", budget=0.3, seed=seed), [0.1, 0.8, acc - 0.02], 30.0, 30))
        results.append(_result(RunSpec("mms", budget=0.3, seed=seed), [0.1, 0.8, acc], t, 30))
    report.annotate(results)
    c = _claim(results, "MMS selection gives a substantial acceleration (`mms`")
    assert c["verdict"] == verdict and text in c["measured"], c
    paths = report.plot_curves(results, tmp_path)
    assert [p.name for p in paths] == ["acc_vs_wallclock.png"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = report.markdown(results, {}, BenchConfig())
    assert "| infobatch [fixed epochs] | 1 | 3 |" in md and "Published claims" in md


# ----------------------------------------------------------------------------------
# The fixed-epochs framing on real data
# ----------------------------------------------------------------------------------

def test_fixed_epochs_framing_runs_exactly_its_epochs():
    reason = _data_missing()
    if reason:
        pytest.skip(reason)
    cfg = BenchConfig(epochs=4, subset=512, test_subset=256, evals=4, progress=False)
    data = harness.load_data(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = harness.run_one(RunSpec("infobatch", framing="epochs", regime="noisy"), cfg, data)
        with pytest.raises(ValueError, match="epoch-style"):
            harness.run_one(RunSpec("mms", framing="epochs"), cfg, data)
    finally:
        torch.set_num_threads(threads)
    full = 4 * math.ceil(512 / 128)
    # InfoBatch prunes epochs 1 and 2 (annealing from 0.875 x 4 = 3.5), so fewer steps than
    # the 4 full passes, and at least the first (full) and last (annealing) epochs' steps.
    assert 2 * 4 <= r.summary["steps"] < full
    assert r.curve[-1]["samples_trained"] < 4 * 512
    assert [round(row["passes"] * 512) for row in r.curve][0] == 0
    assert len(r.curve) == 1 + 4  # step 0, then one evaluation per quarter of the epochs
    assert r.summary["setting"] == "cnn, noisy, 4 epochs, 512 samples"


def test_mms_proxy_scores_with_the_proxy_and_counts_its_cost():
    """In-batch MMS scored by the online proxy: the model never forwards a candidate in
    the selector (only the proxy, timed in select_fwd_s), the candidates are counted as
    scored, the proxy trains on every batch the model trains on, and the model's own
    parameters are not touched by the proxy's steps."""
    reason = _data_missing()
    if reason:
        pytest.skip(reason)
    cfg = BenchConfig(epochs=1, subset=1280, test_subset=256, evals=2, progress=False)
    data = harness.load_data(cfg)
    calls = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: calls.append(torch.is_inference_mode_enabled()) if type(m).__name__ == "SmallCNN" else None)
    try:
        r = harness.run_one(RunSpec("mms_proxy", budget=1.0), cfg, data)
    finally:
        hook.remove()
        torch.set_num_threads(threads)
    s = r.summary
    assert s["samples_trained"] == s["steps"] * 128 == s["proxy_trained"]
    assert s["samples_scored"] == 5 * s["samples_trained"]
    assert s["select_fwd_s"] > 0 and s["select_other_s"] > 0
    # every SmallCNN forward is a training step or a test evaluation, never a scoring forward
    n_eval_batches = len(r.curve) * math.ceil(256 / harness.EVAL_BATCH)
    assert len(calls) == s["steps"] + n_eval_batches and sum(calls) == n_eval_batches
