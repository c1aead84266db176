"""Cheap scorers for in-batch selection: a small proxy network that learns online.

Experimental (kept with the benchmark code, not exported by ``fastsel``): on the
benchmark CNN the proxy below costs ~0.07x the model's inference forward per candidate
batch, but its ranking agrees only moderately with the model's (Spearman ~0.6 for the
loss, ~0.7 for the MMS, top-128 overlap ~0.45-0.65 of 640) and selection with it did not
beat uniform sampling at equal wall-clock (bench/results/proxy/report.md; in the 3-seed
benchmark grid, MMS scored by it at half the budget: +0.13 ± 0.45 points against uniform
at the same wall-clock, the ``mms_proxy`` row of bench/results/train/train_bench.md).

In-batch selection forwards every candidate (e.g. 640 for 128 kept) through the model in
inference mode; on a small CNN that forward costs more than the training step it selects
for. A proxy (Coleman et al. 2020, "Selection via Proxy") is a much smaller network whose
ranking of the candidates stands in for the model's. ``OnlineProxy`` trains it alongside
the model, one optimizer step on each batch the model trains on, so that it follows the
model's progress; its whole cost (its forwards on the candidates and its training steps)
is counted by the ``BatchSelector`` it scores for:

    proxy = OnlineProxy(pooled_mlp((1, 28, 28), 10))
    selector = fastsel.BatchSelector(model, fastsel.strategies.HardLoss(keep=128), scorer=proxy)
    for x, y in loader:
        xb, yb, w = selector(x, y)
        logits = model(xb)
        (fastsel.score(logits, yb).loss * w).mean().backward(); opt.step(); opt.zero_grad()
        selector.observe(xb, yb, logits)  # the proxy's step: costs.scorer_trained += len(yb)

A proxy ranks by its own scores: the loss of its logits, or, for MMS, the MMS of its
logits with its own classifier layer (``OnlineProxy.head``), never the model's head.
Whether a proxy pays depends on how well its ranking agrees with the model's for the rule
used: bench/proxy_bench.py measures it for the benchmark CNN.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastsel import _state
from fastsel._checks import check_int, check_real
from fastsel.forward import scoring_forward

__all__ = ["OnlineProxy", "pooled_mlp", "small_cnn"]


def pooled_mlp(input_shape: Sequence[int], num_classes: int, *, pool: int = 2, hidden: int = 128) -> nn.Module:
    """Average-pooled pixels -> ``hidden`` ReLU units -> ``num_classes`` logits (``.fc``).

    ``input_shape`` is (channels, height, width); ``pool`` x ``pool`` average pooling
    divides the input features by pool² (28x28 -> 14x14 = 196 for pool 2), which
    is what makes the forward cheap: its cost is ~ N (C H W / pool² · hidden + hidden ·
    num_classes) multiply-adds."""
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (channels, height, width), got {tuple(input_shape)!r}")
    c, h, w = (int(v) for v in input_shape)
    check_int("pool", pool, 1)
    check_int("hidden", hidden, 1)
    check_int("num_classes", num_classes, 1)
    if h < pool or w < pool:
        raise ValueError(f"pool={pool} is larger than the input ({h}x{w})")
    return _Sequential(nn.AvgPool2d(pool), nn.Flatten(), nn.Linear(c * (h // pool) * (w // pool), hidden),
                       nn.ReLU(inplace=True), fc=nn.Linear(hidden, num_classes))


def small_cnn(in_channels: int, num_classes: int, *, width: int = 8, hidden: int = 64) -> nn.Module:
    """One 5x5 stride-2 convolution of ``width`` channels, ReLU, adaptive average pooling
    to 4x4, ``hidden`` ReLU units, ``num_classes`` logits (``.fc``)."""
    for name, v in (("in_channels", in_channels), ("num_classes", num_classes), ("width", width),
                    ("hidden", hidden)):
        check_int(name, v, 1)
    return _Sequential(nn.Conv2d(in_channels, width, 5, stride=2, padding=2), nn.ReLU(inplace=True),
                       nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * width, hidden), nn.ReLU(inplace=True),
                       fc=nn.Linear(hidden, num_classes))


class _Sequential(nn.Module):
    """``body`` then the classifier layer ``fc`` (exposed for the MMS)."""

    def __init__(self, *body: nn.Module, fc: nn.Linear):
        super().__init__()
        self.body = nn.Sequential(*body)
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class OnlineProxy:
    """A small network scoring candidates in place of the model, trained online.

    Args:
        module: the proxy network, ``inputs -> logits [N, C]`` (any ``nn.Module``; see
            ``pooled_mlp`` and ``small_cnn``). Owned by the proxy: its parameters are
            updated by ``observe`` only, never shared with the model.
        lr, momentum, weight_decay, nesterov: of the proxy's own SGD. The learning rate
            is constant: the proxy has to keep following a model that changes until the
            end of its schedule.
        distill: weight in [0, 1] of the distillation term when ``observe`` is given the
            model's logits: loss = (1 - distill) CE(proxy, y) + distill T² KL(softmax(
            model / T) || softmax(proxy / T)) (Hinton et al. 2015), which pulls the
            proxy's scores towards the model's rather than towards the labels alone.
        temperature: T of the distillation term.
        head: the proxy's classifier layer for the MMS (default ``module.fc`` or
            ``module.head``).
        chunk_size: score the candidates in slices of this many (as ``scoring_forward``).

    ``proxy(inputs)`` returns the proxy's logits in inference mode (``scoring_forward``:
    eval mode, modes restored, no BatchNorm statistic updated). ``observe(inputs,
    targets, logits=None)`` takes one optimizer step on that batch in train mode (the
    module's modes restored afterwards) and returns the loss (a 0-d tensor, not synced
    to the host). ``steps`` counts those steps; ``state_dict()`` holds the module, the
    optimizer and ``steps``.
    """

    def __init__(self, module: nn.Module, *, lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4,
                 nesterov: bool = True, distill: float = 0.0, temperature: float = 1.0,
                 head: Optional[nn.Module] = None, chunk_size: Optional[int] = None):
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module (the proxy network), got {type(module).__name__}")
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("module has no trainable parameters: an online proxy learns")
        for name, v in (("lr", lr), ("temperature", temperature)):
            check_real(name, v, low=0.0, low_inclusive=False, finite=True)
        check_real("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
        check_real("weight_decay", weight_decay, low=0.0, finite=True)
        check_real("distill", distill, low=0.0, high=1.0)
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov must be a bool, got {nesterov!r}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        check_int("chunk_size", chunk_size, 1, optional=True)
        if head is None:
            head = next((m for m in (getattr(module, "fc", None), getattr(module, "head", None))
                         if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2), None)
        elif not any(m is head for m in module.modules()):
            raise ValueError("head must be the proxy's own classifier layer (a submodule of module)")
        self.module = module
        self.head = head
        self.distill = float(distill)
        self.temperature = float(temperature)
        self.chunk_size = chunk_size
        self.optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                         nesterov=nesterov)
        self.steps = 0

    @property
    def fc(self) -> Optional[nn.Module]:
        """The classifier layer (``BatchSelector`` looks for ``.head`` or ``.fc``)."""
        return self.head

    def __call__(self, inputs: Any) -> torch.Tensor:
        return scoring_forward(self.module, inputs, self.chunk_size)

    def observe(self, inputs: Any, targets: torch.Tensor, logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One SGD step of the proxy on (inputs, targets); ``logits``, the model's output
        on the same inputs, adds the distillation term (``distill`` > 0). Neither the
        inputs nor the model's logits are modified (the logits are detached)."""
        if not isinstance(targets, torch.Tensor) or targets.dim() != 1:
            raise ValueError(f"targets must be a 1-D tensor of class indices, got {targets!r:.80}")
        modes = [(m, m.training) for m in self.module.modules()]
        self.module.train()
        try:
            out = self.module(inputs)
            if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != targets.shape[0]:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"module output must be logits [N, C] with N = {targets.shape[0]}, got {got}")
            loss = F.cross_entropy(out, targets.to(out.device))
            if logits is not None and self.distill > 0:
                if not isinstance(logits, torch.Tensor) or logits.shape != out.shape:
                    got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                    raise ValueError(f"logits must be the model's logits {tuple(out.shape)} on these inputs, got {got}")
                t = self.temperature
                teacher = F.log_softmax(logits.detach().to(out.device, out.dtype) / t, dim=1)
                # KL(p_teacher || p_proxy) scaled by T² so its gradient keeps the CE's scale.
                kd = F.kl_div(F.log_softmax(out / t, dim=1), teacher, log_target=True, reduction="batchmean")
                loss = (1 - self.distill) * loss + self.distill * t * t * kd
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        finally:
            for m, training in modes:
                m.training = training
        self.steps += 1
        return loss.detach()

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        """Restores a ``state_dict()``; the keys, the module's entries (names and
        shapes) and ``steps`` are checked before anything is loaded."""
        _state.require_keys("state", state, ("module", "optimizer", "steps"))
        steps = _state.check_int("state['steps']", state["steps"], 0)
        own = self.module.state_dict()
        saved = state["module"]
        if not isinstance(saved, dict) or set(saved) != set(own):
            raise ValueError("state['module'] must hold exactly the proxy module's entries "
                             f"{sorted(own)}, got {sorted(saved) if isinstance(saved, dict) else type(saved).__name__}")
        for k, v in own.items():
            if not isinstance(saved[k], torch.Tensor) or saved[k].shape != v.shape:
                raise ValueError(f"state['module'][{k!r}] must be a tensor of shape {tuple(v.shape)}")
        if not isinstance(state["optimizer"], dict):
            raise TypeError("state['optimizer'] must be an optimizer state_dict()")
        self.module.load_state_dict(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = steps

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.module.parameters())
        return (f"OnlineProxy({type(self.module).__name__}, {n} parameters, steps={self.steps}, "
                f"distill={self.distill:g})")
