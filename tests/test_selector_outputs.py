"""``BatchSelector`` with models that are not ``x -> logits``: a dict or ``ModelOutput``-like
output, keyword inputs through ``logits_fn``, and a clear error naming ``logits_fn``
for an output it cannot read."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import fastsel
from fastsel.strategies import HardLoss, MMS

N, D, C = 24, 6, 5


@dataclass
class Output:  # what a Hugging Face model returns: fields, logits among them
    logits: torch.Tensor
    hidden: torch.Tensor


class Net(torch.nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU())
        self.fc = torch.nn.Linear(8, C)
        self.kind = kind

    def forward(self, x, mask=None):
        h = self.body(x if mask is None else x * mask)
        z = self.fc(h)
        if self.kind == "dict":
            return {"loss": None, "logits": z, "hidden": h}
        if self.kind == "object":
            return Output(z, h)
        if self.kind == "tuple":
            return z, h
        return z


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g)


def _picks(model, strategy, **kw):
    x, y = _batch()
    sel = fastsel.BatchSelector(model, strategy, seed=0, **kw)
    xb, yb, w = sel(x, y)
    return sel.last_indices, xb, yb, w


@pytest.mark.parametrize("kind", ["dict", "object"])
@pytest.mark.parametrize("strategy", [lambda: HardLoss(keep=6), lambda: MMS(keep=6)], ids=["loss", "mms"])
def test_outputs_with_logits_are_read_by_default(kind, strategy):
    plain = Net("tensor")
    want, *_ = _picks(plain, strategy(), head=plain.fc)
    model = Net(kind)
    model.train()
    got, xb, yb, w = _picks(model, strategy(), head=model.fc, score_batch_size=7)  # sliced too
    assert torch.equal(got, want)
    assert model.training and model.body[1].training  # modes restored
    assert xb.shape == (6, D) and yb.shape == (6,) and torch.equal(w, torch.ones(6))


def test_keyword_inputs_through_logits_fn():
    model = Net("object")
    x, y = _batch()
    mask = (torch.arange(N * D).reshape(N, D) % 3 != 0).float()
    inputs = {"x": x, "mask": mask}
    sel = fastsel.BatchSelector(model, HardLoss(keep=5), logits_fn=lambda m, b: m(**b).logits,
                                score_batch_size=10)
    xb, yb, w = sel(inputs, y)
    idx = sel.last_indices
    assert set(xb) == {"x", "mask"} and torch.equal(xb["mask"], mask[idx]) and torch.equal(yb, y[idx])
    model.eval()
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x, mask).logits, y, reduction="none")
    assert set(idx.tolist()) == set(loss.topk(5).indices.tolist())


def test_an_output_without_logits_names_logits_fn():
    with pytest.raises(ValueError, match=r"model's output must be logits \[N, C\].*got a tuple.*logits_fn="):
        _picks(Net("tuple"), HardLoss(keep=4))
    got, *_ = _picks(Net("tuple"), HardLoss(keep=4), logits_fn=lambda m, x: m(x)[0])
    want, *_ = _picks(Net("tensor"), HardLoss(keep=4))
    assert torch.equal(got, want)
    with pytest.raises(TypeError, match=r"logits_fn must be callable"):
        fastsel.BatchSelector(Net("tensor"), HardLoss(keep=4), logits_fn="logits")
    with pytest.raises(ValueError, match=r"with scorer= the model is not run"):
        fastsel.BatchSelector(Net("tensor"), HardLoss(keep=4), scorer=Net("tensor"), logits_fn=lambda m, x: m(x))
