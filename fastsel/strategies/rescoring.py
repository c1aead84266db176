"""Scoring a whole data set in inference mode: DynaMS's selection pass and the ``refresh``
passes of the epoch-style rules (docs/methods.md section 5). Its cost is counted: the
samples forwarded go to ``ScoreSampler.costs.scored`` through the strategy's
``last_scored``."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch

from fastsel.ops import score
from fastsel.forward import scoring_forward
from fastsel._checks import check_choice, check_int, check_positive_int, sized_length
from fastsel.strategies.base import TABLE_FIELDS, seeded_generator

__all__ = ["Rescorer"]


class _Proxy(torch.nn.Module):
    """Calls ``proxy(inputs)`` as the forward of a module that holds the model (and the
    proxy when it is a module), so that ``scoring_forward`` switches every one of their
    submodules to eval mode and restores each one's mode afterwards."""

    def __init__(self, model: Optional[torch.nn.Module], proxy: Callable[[Any], torch.Tensor]):
        super().__init__()
        self.model = model
        self.proxy_module = proxy if isinstance(proxy, torch.nn.Module) else None
        self._call = proxy

    def forward(self, inputs: Any) -> torch.Tensor:
        return self._call(inputs)


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


class Rescorer:
    """Scores every sample of a data set with the model (or a cheaper proxy that shares its
    parameters) in inference mode, for the table fields a strategy reads.

    The forward runs as ``fastsel.forward.scoring_forward`` runs it: the model (and the
    proxy, when it is a module) in eval mode, ``torch.inference_mode()``, every
    submodule's train/eval mode restored afterwards, so no BatchNorm running statistic,
    parameter or gradient is touched. Batches of ``batch_size`` are read in data-set order
    from a ``DataLoader`` without shuffling (a seeded generator, so that worker
    randomness cannot change the scores); each item must be ``(x, y, index)``
    (``fastsel.Indexed``), index i being training sample i. Pass an un-augmented
    ``Indexed`` view of the training set as ``data`` to score clean inputs (the default
    is the data set the sampler passes, read through its own transforms).

    Args:
        model: the model being trained; the default proxy.
        proxy: a callable ``inputs -> logits [B, C]`` cheaper than the model and sharing
            its parameters (an ``nn.Module``, or any callable when ``model`` is given so
            that its mode can be set and restored).
        head: the classifier layer whose ``weight`` [C, D] the MMS needs (``"mms"`` field).
        mms: ``"exact"`` or ``"top2"``, for the ``"mms"`` field.
        data: the data set scored; default the one ``score_all`` is given.
        batch_size, num_workers, collate_fn: of the scoring ``DataLoader``.
        device: where the inputs go (default: the device of the model's first parameter,
            else CPU).
        backend: the ``fastsel.score`` backend.

    ``last_scored`` counts the samples forwarded by the last ``score_all``.
    """

    def __init__(self, model: Optional[torch.nn.Module] = None, *, proxy: Optional[Callable[[Any], torch.Tensor]] = None,
                 head: Optional[torch.nn.Module] = None, mms: str = "exact", data: Any = None,
                 batch_size: int = 256, num_workers: int = 0, collate_fn: Optional[Callable] = None,
                 device: Union[str, torch.device, None] = None, backend: str = "auto"):
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if proxy is None and model is None:
            raise ValueError("scoring the whole data set needs model= (the proxy is then the model itself) "
                             "and/or proxy= (a callable inputs -> logits sharing the model's parameters)")
        if proxy is not None and not callable(proxy):
            raise TypeError(f"proxy must be callable (inputs -> logits), got {type(proxy).__name__}")
        if proxy is not None and model is None and not isinstance(proxy, torch.nn.Module):
            raise ValueError("a proxy that is not an nn.Module needs model= as well, so that the model can be "
                             "put in eval mode for scoring and its mode restored afterwards")
        if head is not None and not isinstance(getattr(head, "weight", None), torch.Tensor):
            raise TypeError(f"head must be the classifier layer (a module with a .weight [C, D]), "
                            f"got {type(head).__name__}")
        check_choice("mms", mms, ("exact", "top2"))
        if data is not None:
            sized_length("data", data, "be a map-style data set with a length")
        check_positive_int("batch_size", batch_size)
        check_int("num_workers", num_workers, 0)
        self.model = model
        self.proxy = proxy
        self.head = head
        self.mms = mms
        self.data = data
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.collate_fn = collate_fn
        self.device = None if device is None else torch.device(device)
        self.backend = backend
        self._forward = _Proxy(model, proxy if proxy is not None else model)
        self.last_scored = 0

    def _device(self) -> torch.device:
        if self.device is not None:
            return self.device
        for module in (self.model, self.proxy):
            if isinstance(module, torch.nn.Module):
                p = next(iter(module.parameters()), None)
                if p is not None:
                    return p.device
        return torch.device("cpu")

    def score_all(self, data: Any, fields: tuple[str, ...], *, seed: int = 0, epoch: int = 0,
                  n: Optional[int] = None) -> dict[str, torch.Tensor]:
        """``{field: [N] float32 (CPU)}`` for every table field in ``fields``, from one
        inference pass over ``self.data`` (or ``data``). ``n``: the number of samples the
        caller expects (the sampler's). Counts the forwarded samples in ``last_scored``."""
        source = self.data if self.data is not None else data
        if source is None:
            raise ValueError("scoring needs the data set: use the strategy through fastsel.ScoreSampler (which "
                             "passes it) or give the Rescorer data=")
        size = len(source)
        if n is not None and size != n:
            raise ValueError(f"the scored data set has {size} samples but the sampler has {n}")
        if "mms" in fields and self.head is None:
            raise ValueError("the MMS of a rescoring pass needs the classifier layer: Rescorer(..., head=model.fc)")
        values = {f: torch.full((size,), float("nan")) for f in fields}
        seen = torch.zeros(size, dtype=torch.bool)
        loader = torch.utils.data.DataLoader(source, batch_size=self.batch_size, shuffle=False,
                                             num_workers=self.num_workers, collate_fn=self.collate_fn,
                                             generator=seeded_generator(seed, epoch))
        device = self._device()
        self.last_scored = 0
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) != 3:
                raise ValueError("scoring reads items (x, y, index): wrap the data set in fastsel.Indexed, whose "
                                 f"items are (x, y, i); got a batch of {type(batch).__name__}"
                                 + (f" with {len(batch)} fields" if isinstance(batch, (tuple, list)) else ""))
            x, y, idx = batch
            if not isinstance(idx, torch.Tensor) or idx.dim() != 1:
                raise ValueError(f"the last field of each item must be the sample index; got {idx!r:.80}")
            logits = scoring_forward(self._forward, _to(x, device))
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != idx.numel():
                got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise ValueError(f"the proxy must return logits [B, C] with B = {idx.numel()} (the batch), got {got}")
            weight = self.head.weight.detach() if "mms" in fields else None
            with torch.inference_mode():
                s = score(logits, torch.as_tensor(y).to(logits.device), head=weight, mms=self.mms,
                          backend=self.backend)
                for f in fields:
                    values[f][idx.to(torch.int64)] = TABLE_FIELDS[f](s).to("cpu", torch.float32)
            seen[idx.to(torch.int64)] = True
            self.last_scored += idx.numel()
        if not bool(seen.all()):
            raise ValueError(f"scoring covered {int(seen.sum())} of {size} samples: the items' indices must be "
                             "0 .. N-1 (use fastsel.Indexed)")
        return values

    def __repr__(self) -> str:
        model = type(self.model).__name__ if self.model is not None else None
        proxy = type(self.proxy).__name__ if self.proxy is not None else None
        return (f"Rescorer(model={model}, proxy={proxy}, head={self.head is not None}, mms={self.mms!r}, "
                f"batch_size={self.batch_size})")
