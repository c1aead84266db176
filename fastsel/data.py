"""Dataset helpers: ``Indexed`` makes every item carry its index, so that scores computed
in the training forward can be written back to the right sample (``ScoreSampler.update``)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Indexed"]


class Indexed(torch.utils.data.Dataset):
    """Wraps a map-style dataset so that item ``i`` becomes ``(*item, i)``.

    A ``(x, y)`` item becomes ``(x, y, i)``; a non-tuple item ``x`` becomes ``(x, i)``. The
    default collate function then stacks the indices into an int64 tensor.
    """

    def __init__(self, dataset: Any):
        if not hasattr(dataset, "__getitem__"):
            raise TypeError(f"dataset must be a map-style dataset (with __getitem__), got {type(dataset).__name__}")
        try:
            n = len(dataset)
        except TypeError:
            raise TypeError(
                f"dataset must have a length (__len__): selection needs to know every sample; "
                f"got {type(dataset).__name__} without one (an IterableDataset cannot be indexed)"
            ) from None
        self.dataset = dataset
        self._len = n

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int):
        if isinstance(index, (list, tuple)) or (isinstance(index, torch.Tensor) and index.dim() > 0):
            # DataLoader(data, sampler=ScoreSampler(...)) hands each whole batch of indices
            # to __getitem__ as one index: name the fix here, not deep in collate.
            raise TypeError(f"Indexed got a batch of {len(index)} indices as one index: a fastsel.ScoreSampler "
                            "yields whole batches, so pass it as DataLoader(data, batch_sampler=sampler), "
                            "not sampler=sampler")
        if isinstance(index, torch.Tensor):
            index = int(index)
        item = self.dataset[index]
        if isinstance(item, tuple):
            return (*item, index)
        return (item, index)
