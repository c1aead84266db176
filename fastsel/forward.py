"""The scoring forward: a model's logits for a batch, in inference mode with the model in
eval mode and every submodule's mode restored, and the batch-structure helpers it
needs. Below the training layer: the selector, the batch queue, the strategies that
rescore (DynaMS, ``Rescorer``, RHO-LOSS) and the integrations all use it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch

__all__ = ["scoring_forward", "output_logits", "default_logits_fn", "batch_size_of", "map_batch"]


def batch_size_of(batch: Any) -> int:
    """The batch size of a tensor, or of the first tensor of a (named)tuple / list / dict."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, (tuple, list)) and batch:
        return batch_size_of(batch[0])
    if isinstance(batch, dict) and batch:
        return batch_size_of(next(iter(batch.values())))
    raise TypeError(f"cannot find the batch size of a {type(batch).__name__}")


def map_batch(batch: Any, take) -> Any:
    """``take(t)`` for a tensor, or for each tensor of a (named)tuple / list / dict, keeping
    the structure (the batch is in dimension 0 of every tensor)."""
    if isinstance(batch, torch.Tensor):
        return take(batch)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple (kept by default_collate)
        return type(batch)(*(map_batch(b, take) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_batch(b, take) for b in batch)
    if isinstance(batch, dict):
        return {k: map_batch(v, take) for k, v in batch.items()}
    raise TypeError(f"cannot select samples from a {type(batch).__name__}; inputs must be a tensor "
                    "or a tuple/list/dict of tensors with the batch in dimension 0")


def output_logits(output: Any) -> Any:
    """The logits of a model's output: the output itself when it is a tensor, else its
    ``logits`` (a Hugging Face ``ModelOutput``, a dict or any object with that field).
    Anything else is returned as is (the caller reports it)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    return output if logits is None else logits


def default_logits_fn(model: Callable, inputs: Any) -> Any:
    """``model(inputs)``, unwrapped by ``output_logits``."""
    return output_logits(model(inputs))


def scoring_forward(model: torch.nn.Module, inputs: Any, chunk_size: Optional[int] = None,
                    logits_fn: Optional[Callable[[Any, Any], Any]] = None) -> torch.Tensor:
    """``logits_fn(model, inputs)`` (default: ``model(inputs)``, its ``.logits`` if it
    has one) in inference mode with the model in eval mode, restoring the mode of every
    submodule afterwards (BatchNorm running statistics stay untouched).

    ``chunk_size`` runs the forward on consecutive slices of the batch and concatenates
    the logits: for large candidate batches on the CPU, activations that fit the caches
    can make that faster than one big forward (eval mode makes the slices independent)."""
    fn = default_logits_fn if logits_fn is None else logits_fn
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            n = batch_size_of(inputs) if chunk_size else 0
            if not chunk_size or n <= chunk_size:
                return fn(model, inputs)
            parts = [fn(model, map_batch(inputs, lambda t, i=i: t[i:i + chunk_size])) for i in range(0, n, chunk_size)]
            bad = next((p for p in parts if not isinstance(p, torch.Tensor)), None)
            return bad if bad is not None else torch.cat(parts)  # the caller reports a non-tensor
    finally:
        for m, training in modes:
            m.training = training
