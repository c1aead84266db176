"""``fastsel.experiments.compare`` ("does selection pay on my data?") and its command line
(``python -m fastsel.experiments.pays``), on a tiny model and a synthetic data set: the
runs, the outputs (CSV, report, plot), and the errors a user meets first."""

from __future__ import annotations

import csv
import sys
import textwrap

import pytest
import torch
from torch import nn

from fastsel.experiments import compare
from fastsel.experiments import pays


class Tiny(nn.Module):
    def __init__(self, d=8, c=3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, 16), nn.ReLU())
        self.fc = nn.Linear(16, c)

    def forward(self, x):
        return self.fc(self.body(x))


class NoHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


class HeadNotLast(Tiny):
    def forward(self, x):
        return 2.0 * self.fc(self.body(x))  # the logits are not the head's output


def _data(n, seed):
    centers = torch.randn(3, 8, generator=torch.Generator().manual_seed(123)) * 2  # one problem
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = centers[y] + torch.randn(n, 8, generator=g)
    return x, y


@pytest.fixture(autouse=True)
def one_thread():
    t = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(t)


def test_compare_runs_every_strategy_and_writes_the_report(tmp_path):
    train, test = _data(768, 0), _data(300, 1)
    out = compare(Tiny, train, test, strategies=("infobatch:epochs", "mms_epoch", "mms"), budgets=(1.0, 0.5),
                  seeds=2, epochs=2, batch_size=32, evals=4, out=tmp_path, progress=False)
    labels = {(r.spec.label, r.spec.budget, r.spec.seed) for r in out["results"]}
    want = {(lab, b, s) for s in (0, 1) for lab, b in
            (("uniform", 1.0), ("uniform", 0.5), ("infobatch [fixed epochs]", 1.0), ("mms_epoch", 1.0), ("mms_epoch", 0.5),
             ("mms", 1.0), ("mms", 0.5))}
    assert labels == want  # uniform added at every budget, ':epochs' once at budget 1
    for name in ("train_bench.csv", "train_bench.md", "acc_vs_wallclock.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert not (tmp_path / "importance_grid.png").exists()  # not images
    with open(tmp_path / "train_bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["model"] for r in rows} == {"user"} and {r["setting"] for r in rows} == {"user, clean, 2 epochs"}
    ref = [r for r in rows if r["label"] == "uniform" and r["budget"] == "1.0" and r["final"] == "1"]
    assert len(ref) == 2 and all(0 < float(r["time_to_target_ratio"]) <= 1 for r in ref)  # its own accuracy
    # the separable data are learnt: the reference's accuracy is far above chance (1/3)
    assert all(float(r["final_acc"]) > 0.8 for r in ref)
    g = {(x["label"], x["budget"]): x for x in out["groups"]}
    assert g[("mms_epoch", 0.5)]["vs_same"]["n"] == 2 and g[("mms", 0.5)]["scored"] > 0
    assert "| uniform | 1 | 2 |" in out["text"] and "Published claims" in out["text"]
    assert any(c["claim"].startswith("InfoBatch: ~40% saving") for c in out["claims"])


def test_dataset_input_equals_tensor_input():
    train, test = _data(256, 0), _data(64, 1)
    kw = dict(strategies=("uniform",), budgets=(1.0,), seeds=1, epochs=1, batch_size=32, evals=2, out=None,
              progress=False)
    a = compare(Tiny, train, test, **kw)
    b = compare(Tiny, torch.utils.data.TensorDataset(*train), torch.utils.data.TensorDataset(*test), **kw)
    assert [r["test_acc"] for r in a["results"][0].curve] == [r["test_acc"] for r in b["results"][0].curve]


@pytest.mark.parametrize("factory, kwargs, match", [
    (NoHead, {"strategies": ("mms_epoch",)}, "needs the classifier head"),
    (HeadNotLast, {"strategies": ("mms_epoch",)}, "must be the layer that produces the logits"),
    (Tiny, {"strategies": ("mms",)}, "candidate batches of 640 samples; the training set has 256"),
    (lambda: Tiny(c=5), {}, r"logits \[batch, 3\]"),
    (lambda: Tiny(d=4), {}, "cannot run on the training inputs"),
    (lambda: "model", {}, "must return an nn.Module"),
    (Tiny, {"strategies": ("mms:epochs",)}, "needs an epoch-style strategy"),
    (Tiny, {"strategies": ("fastest",)}, "unknown strategy 'fastest'"),
    (Tiny, {"budgets": (0.0,)}, "budgets must be fractions"),
    (Tiny, {"seeds": 0}, "seeds must be"),
    (Tiny, {"epochs": 0}, "epochs must be a positive int"),
    (Tiny, {"lr": float("nan")}, "lr must be"),
    (Tiny, {"head": "fc"}, "head must be callable"),
    (Tiny, {"max_bytes": 1000, "train": "dataset"}, "above max_bytes"),
    (Tiny, {"train": (torch.randn(10, 8), torch.rand(10))}, "integer class indices"),
    (Tiny, {"train": (torch.randn(10, 8), torch.arange(9))}, "same N"),
    (Tiny, {"train": [1, 2, 3]}, "must be a Dataset"),
    (Tiny, {"strategies": ("rho_loss",)}, "candidate batches of 1280"),
])
def test_clear_errors(factory, kwargs, match):
    train, test = _data(256, 0), _data(64, 1)
    kwargs = dict(kwargs)
    if kwargs.get("train") == "dataset":
        kwargs["train"] = torch.utils.data.TensorDataset(*train)
    train = kwargs.pop("train", train)
    with pytest.raises((ValueError, TypeError), match=match):
        compare(factory, train, test, **{"seeds": 1, "epochs": 1, "out": None, "progress": False, **kwargs})


def test_head_argument_for_a_model_without_fc():
    out = compare(NoHead, _data(256, 0), _data(64, 1), strategies=("mms_epoch",), budgets=(1.0,), seeds=1,
                  epochs=1, batch_size=32, evals=2, head=lambda m: m.net[2], out=None, progress=False)
    assert {r.spec.strategy for r in out["results"]} == {"uniform", "mms_epoch"}


def test_command_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "userpkg_pays.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn

        def make():
            return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

        def head(model):
            return model[2]

        def data():
            g = torch.Generator().manual_seed(0)
            y = torch.arange(400) % 3
            x = torch.nn.functional.one_hot(y, 8).float() * 3 + torch.randn(400, 8, generator=g)
            return (x[:300], y[:300]), (x[300:], y[300:])
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = pays.main(["--model", "userpkg_pays:make", "--data", "userpkg_pays:data", "--head", "userpkg_pays:head",
                     "--strategies", "uniform,mms_epoch", "--budgets", "1", "--seeds", "1", "--epochs", "1",
                     "--batch-size", "32", "--out", str(tmp_path / "o"), "--no-progress"])
    assert (tmp_path / "o" / "train_bench.md").exists() and len(out["results"]) == 2
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="cannot import"):
        pays.main(["--model", "nowhere_xyz:make", "--data", "userpkg_pays:data"])
    with pytest.raises(SystemExit, match="must be 'package.module:callable'"):
        pays.main(["--model", "userpkg_pays", "--data", "userpkg_pays:data"])
    with pytest.raises(SystemExit, match="needs the classifier head"):
        pays.main(["--model", "userpkg_pays:make", "--data", "userpkg_pays:data", "--strategies", "mms_epoch",
                   "--seeds", "1", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "p")])
