"""BatchSelector(scorer=...): the scorer's logits decide the pick and the model is not run,
its forwards and online training are counted, a module scorer is left as found, MMS uses
the scorer's head, bad scorers are refused; fastsel.experiments.proxies.OnlineProxy
learns without touching the model and resumes from its state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastsel
from fastsel.experiments.proxies import OnlineProxy, pooled_mlp, small_cnn
from fastsel.costs import Costs, ScorerCosts
from fastsel.strategies import MMS, HardLoss

D, C = 12, 10


class Net(nn.Module):
    """BatchNorm (running statistics), Dropout and an ``fc`` head."""

    def __init__(self, hidden=32, classes=C):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.5))
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc(self.body(x))


def make(cls=Net, seed=0, **kw):
    torch.manual_seed(seed)
    m = cls(**kw)
    with torch.no_grad():  # non-trivial running statistics
        m.train()
        for _ in range(3):
            m(torch.randn(64, D) * 2 + 1)
    return m


class Untouchable(nn.Module):
    """A model whose forward must not run (the scorer replaces it)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, C)

    def forward(self, x):
        raise AssertionError("the model's forward ran although a scorer was given")


def candidates(n=200, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randint(0, C, (n,), generator=g)


def state_of(module):
    return {k: v.clone() for k, v in module.state_dict().items()}, {m: m.training for m in module.modules()}


def same_state(a, b):
    return a[1] == b[1] and a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


# ---------------------------------------------------------------- the scorer decides, the model is not run

def test_scorer_logits_determine_the_pick_and_the_model_is_not_run():
    x, y = candidates(100)
    hard = torch.tensor([3, 17, 42, 58, 99, 7, 64, 23])
    calls = []

    def scorer(inputs):
        calls.append(inputs.shape[0])
        logits = torch.zeros(inputs.shape[0], C)
        logits[torch.arange(inputs.shape[0]), y] = 5.0  # every sample easy ...
        logits[hard, y[hard]] = -5.0                     # ... but these: the 8 largest losses
        return logits

    selector = fastsel.BatchSelector(Untouchable(), HardLoss(8), scorer=scorer)
    xb, yb, w = selector(x, y)
    assert sorted(selector.last_indices.tolist()) == sorted(hard.tolist())
    assert torch.equal(xb, x[selector.last_indices]) and torch.equal(yb, y[selector.last_indices])
    assert torch.equal(w, torch.ones(8))
    assert calls == [100]
    assert type(selector.costs) is Costs  # a scorer without observe: the usual costs
    assert selector.costs.as_dict() == {"scored": 100, "trained": 8, "steps": 1}


def test_module_scorer_is_run_in_eval_inference_mode_and_left_as_found():
    model, scorer = make(seed=0), make(seed=5, hidden=16)
    model.train()
    scorer.train()
    scorer.body[1].eval()  # a submodule deliberately in eval mode while its parent trains
    before_model, before_scorer = state_of(model), state_of(scorer)
    sizes = []
    scorer.register_forward_hook(lambda m, inp, out: sizes.append((inp[0].shape[0], m.training,
                                                                   torch.is_inference_mode_enabled())))
    selector = fastsel.BatchSelector(model, HardLoss(10), scorer=scorer, score_batch_size=64)
    x, y = candidates(150)
    xb, _, _ = selector(x, y)
    assert sizes == [(64, False, True), (64, False, True), (22, False, True)]
    assert same_state(state_of(scorer), before_scorer), "scorer's modes or BatchNorm statistics changed"
    assert same_state(state_of(model), before_model), "the model was touched"
    # The pick is the 10 largest losses of the scorer's eval-mode logits.
    scorer.eval()
    with torch.no_grad():
        expected = fastsel.score(scorer(x), y).loss
    assert sorted(selector.last_indices.tolist()) == sorted(torch.topk(expected, 10).indices.tolist())
    assert selector.costs.scored == 150


# ---------------------------------------------------------------- MMS with the scorer's head

def test_mms_uses_the_scorers_own_head():
    model, scorer = make(seed=0), make(seed=3, hidden=16)  # heads of different widths: [10, 32] vs [10, 16]
    x, y = candidates(120)
    selector = fastsel.BatchSelector(model, MMS(12), scorer=scorer)  # head=None: scorer.fc
    assert selector.head is scorer.fc
    selector(x, y)
    scorer.eval()
    with torch.no_grad():
        mms = fastsel.score(scorer(x), y, head=scorer.fc.weight).mms
    assert sorted(selector.last_indices.tolist()) == sorted(torch.topk(mms, 12, largest=False).indices.tolist())
    explicit = fastsel.BatchSelector(model, MMS(12), scorer=scorer, head=scorer.fc)
    explicit(x, y)
    assert torch.equal(explicit.last_indices, selector.last_indices)


def test_mms_head_errors_name_the_head():
    model, scorer = make(seed=0), make(seed=3, hidden=16)
    with pytest.raises(ValueError, match="head must be the classifier layer of the scorer"):
        fastsel.BatchSelector(model, MMS(8), scorer=scorer, head=model.fc)  # the model's head: refused
    with pytest.raises(ValueError, match="needs the classifier head of the scorer"):
        fastsel.BatchSelector(model, MMS(8), scorer=lambda x: torch.zeros(x.shape[0], C))  # no head to find
    with pytest.raises(ValueError, match="needs the classifier head of the scorer"):
        fastsel.BatchSelector(model, MMS(8), scorer=scorer, head=scorer.body)  # no 2-D weight
    # A plain callable with a head of the wrong number of classes: refused at the call.
    wrong = nn.Linear(16, C + 1)
    selector = fastsel.BatchSelector(model, MMS(8), scorer=lambda x: torch.zeros(x.shape[0], C), head=wrong)
    with pytest.raises(ValueError, match=r"head .* 11 rows but the logits have C = 10"):
        selector(*candidates(40))
    assert selector.costs.steps == 0


# ---------------------------------------------------------------- bad scorers

@pytest.mark.parametrize("bad", [42, "proxy", torch.zeros(3)], ids=["int", "str", "tensor"])
def test_non_callable_scorer_is_a_type_error(bad):
    with pytest.raises(TypeError, match="scorer must be callable"):
        fastsel.BatchSelector(make(), HardLoss(8), scorer=bad)


@pytest.mark.parametrize("fn", [lambda z: z[:, :, None], lambda z: z[:-1], lambda z: z[:, 0], lambda z: z.tolist()],
                         ids=["3-D", "fewer rows", "1-D", "not a tensor"])
def test_scorer_output_of_the_wrong_shape(fn):
    scorer = make(seed=2)
    selector = fastsel.BatchSelector(Untouchable(), HardLoss(8), scorer=lambda x: fn(scorer(x)))
    with pytest.raises(ValueError, match=r"scorer's output must be logits \[N, C\]"):
        selector(*candidates(40))
    assert selector.costs.steps == 0 and selector.step == 0


def test_observe_needs_a_scorer_that_learns():
    selector = fastsel.BatchSelector(make(), HardLoss(8), scorer=make(seed=1))
    with pytest.raises(TypeError, match="observe needs a scorer that learns online"):
        selector.observe(*candidates(8))


# ---------------------------------------------------------------- OnlineProxy

def vector_proxy(seed=7, **kw) -> OnlineProxy:
    torch.manual_seed(seed)
    return OnlineProxy(Net(hidden=16), **kw)


def test_observe_trains_the_proxy_only_and_is_counted():
    model = make(seed=0)
    proxy = vector_proxy()
    selector = fastsel.BatchSelector(model, MMS(16), scorer=proxy)
    assert isinstance(selector.costs, ScorerCosts) and selector.head is proxy.module.fc
    proxy_before = state_of(proxy.module)
    x, y = candidates(80)
    x_copy, y_copy = x.clone(), y.clone()
    xb, yb, _ = selector(x, y)
    assert same_state(state_of(proxy.module), proxy_before), "scoring changed the proxy"
    logits = model(xb).detach()  # the model's training forward (updates its own BatchNorm statistics)
    logits_copy = logits.clone()
    model_before = state_of(model)
    loss = selector.observe(xb, yb, logits)
    assert loss.dim() == 0 and not loss.requires_grad
    assert torch.equal(x, x_copy) and torch.equal(y, y_copy) and torch.equal(logits, logits_copy)
    after = state_of(proxy.module)
    assert after[1] == proxy_before[1], "observe restores the proxy's modes"
    changed = [k for k in after[0] if not torch.equal(after[0][k], proxy_before[0][k])]
    assert {"fc.weight", "fc.bias", "body.0.weight", "body.1.running_mean"} <= set(changed)
    assert same_state(state_of(model), model_before), "observe touched the model"
    assert proxy.steps == 1
    assert selector.costs.as_dict() == {"scored": 80, "trained": 16, "steps": 1, "scorer_trained": 16}


def test_online_proxy_learns_a_fixed_batch():
    torch.manual_seed(7)
    proxy = OnlineProxy(nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, C)), lr=0.1)
    x, y = candidates(64, seed=4)
    first = float(proxy.observe(x, y))
    for _ in range(50):
        last = float(proxy.observe(x, y))
    assert last < 0.5 * first
    assert proxy.steps == 51 and proxy.head is None  # no .fc or .head to find


def test_distillation_pulls_towards_the_model_logits():
    x, y = candidates(64, seed=4)
    teacher = torch.randn(64, C) * 3
    plain, distilled = vector_proxy(lr=0.1), vector_proxy(lr=0.1, distill=1.0)
    for _ in range(40):
        plain.observe(x, y, teacher)  # distill=0: the logits are ignored
        distilled.observe(x, y, teacher)

    def kl(p):
        return float(torch.nn.functional.kl_div(p(x).log_softmax(1), teacher.log_softmax(1), log_target=True,
                                                reduction="batchmean"))
    assert kl(distilled) < 0.5 * kl(plain)
    with pytest.raises(ValueError, match="logits must be the model's logits"):
        distilled.observe(x, y, teacher[:10])


def test_online_proxy_state_dict_round_trip_and_selector_costs():
    x, y = candidates(96)
    a = vector_proxy()
    sel_a = fastsel.BatchSelector(make(), HardLoss(32), scorer=a)
    for _ in range(2):
        xb, yb, _ = sel_a(x, y)
        sel_a.observe(xb, yb)
    b = vector_proxy(seed=99)  # another initialisation, restored from a's state
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    sel_b = fastsel.BatchSelector(make(), HardLoss(32), scorer=b)
    sel_b.load_state_dict(copy.deepcopy(sel_a.state_dict()))
    assert sel_b.costs.as_dict() == {"scored": 192, "trained": 64, "steps": 2, "scorer_trained": 64}
    assert b.steps == 2
    # The same next step (optimizer momentum included) from both.
    torch.manual_seed(5)  # the same dropout masks
    la = a.observe(x[:32], y[:32])
    torch.manual_seed(5)
    lb = b.observe(x[:32], y[:32])
    assert torch.equal(la, lb)
    assert all(torch.equal(p, q) for p, q in zip(a.module.parameters(), b.module.parameters()))
    # A state with the proxy's count cannot go into a selector without one, and vice versa.
    plain = fastsel.BatchSelector(make(), HardLoss(32))
    with pytest.raises(ValueError, match=r"state\['costs'\] has unknown keys \['scorer_trained'\]"):
        plain.load_state_dict(sel_a.state_dict())
    with pytest.raises(ValueError, match=r"state\['costs'\] is missing the key 'scorer_trained'"):
        sel_b.load_state_dict(plain.state_dict())
    assert sel_b.costs.scorer_trained == 64


def test_online_proxy_bad_state_changes_nothing():
    proxy = vector_proxy()
    before = state_of(proxy.module)
    good = proxy.state_dict()
    bad_shape = copy.deepcopy(good)
    bad_shape["module"]["fc.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"state\['module'\]\['fc.weight'\] must be a tensor of shape \(10, 16\)"):
        proxy.load_state_dict(bad_shape)
    with pytest.raises(TypeError, match=r"state\['steps'\] must be an int"):
        proxy.load_state_dict({**good, "steps": 1.5})
    with pytest.raises(ValueError, match="missing the key 'optimizer'"):
        proxy.load_state_dict({"module": good["module"], "steps": 0})
    assert same_state(state_of(proxy.module), before) and proxy.steps == 0


def test_online_proxy_arguments():
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        OnlineProxy(lambda x: x)
    with pytest.raises(ValueError, match="lr must be"):
        OnlineProxy(Net(), lr=0.0)
    with pytest.raises(ValueError, match="distill must be"):
        OnlineProxy(Net(), distill=1.5)
    with pytest.raises(ValueError, match="head must be the proxy's own classifier layer"):
        OnlineProxy(Net(), head=nn.Linear(32, C))
    with pytest.raises(ValueError, match="targets must be a 1-D tensor"):
        OnlineProxy(Net()).observe(torch.randn(4, D), torch.zeros(4, 1, dtype=torch.long))


def test_builders_shapes_and_heads():
    x = torch.randn(5, 1, 28, 28)
    for module, width in ((pooled_mlp((1, 28, 28), 10), 128), (small_cnn(1, 10), 64)):
        assert module(x).shape == (5, 10)
        assert module.fc.weight.shape == (10, width)
        assert OnlineProxy(module).head is module.fc
    # 2x2 pooling: 196 input features.
    assert pooled_mlp((1, 28, 28), 10).body[2].in_features == 196
    with pytest.raises(ValueError, match="input_shape"):
        pooled_mlp((28, 28), 10)
