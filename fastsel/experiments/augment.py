"""Batch augmentations for the end-to-end benchmark, on whole batches of image tensors
[N, C, H, W], every random draw from a ``torch.Generator`` (one seed, one result).

Each augmentation returns the augmented batch and its ``Targets``: K label sets with
per-sample weights that sum to 1, so that the training loss is the convex combination

    loss_i = sum_k weights[i, k] * CE(logits_i, labels[i, k])

computed with one ``fastsel.score`` call per label set (``mixed_scores`` in
``fastsel.experiments.harness``), which keeps every per-sample score available.

Score-based strategies need ONE score per sample: they use the scores of the dominant
(largest-weight) label. The mixing augmentations below are arranged so that the dominant
label is always the sample's own label (position i keeps most of image i), so a score
recorded for dataset sample i is a score of its own label:

* ``none``: K = 1.
* ``crop_flip``: the standard augmentation; a random 28x28 crop of the image padded by 4
  pixels of background (``fill``: the normalised value of a black pixel), then a
  horizontal flip with probability 1/2, independently per sample. K = 1.
* ``mixup`` (Zhang, Cisse, Dauphin & Lopez-Paz 2018): x = lam x_i + (1 - lam) x_perm(i),
  one lam ~ Beta(alpha, alpha) per batch, alpha = 0.2 (the paper's range for ImageNet is
  0.1-0.4; 1.0 was its CIFAR-10 setting: ``alpha=`` to change it). lam is folded to
  max(lam, 1 - lam), as fastai does; with a random permutation this leaves the
  distribution of mixed pairs unchanged (mixup is symmetric in the pair) and only puts
  each mix at the position of its dominant image. K = 2.
* ``cutmix`` (Yun et al. 2019): with probability ``prob`` = 0.5 (the paper's CIFAR
  setting) a box of area ratio 1 - lam, lam ~ Beta(1, 1), from x_perm(i) is pasted into
  x_i, one box per batch; lam is recomputed from the box after clipping at the border.
  Deviation: lam is folded to max(lam, 1 - lam) first, so the pasted box covers at most
  half of the image (the base image stays dominant). Not applied: weights (1, 0). K = 2.
* ``ricap`` (Takahashi, Matsubara & Uehara 2018): a boundary point (w, h) with
  w = round(W Beta(beta, beta)), h = round(H Beta(beta, beta)), beta = 0.3 (the paper's
  default), splits the output into four patches of sizes (w, h), (W - w, h),
  (w, H - h), (W - w, H - h); patch k is a crop (at a random position, one per patch
  and batch, as in the authors' code) of the images of a random permutation of the
  batch, and label k weighs its area fraction. Deviation: the largest patch takes the
  identity permutation (the sample's own image) instead of a random one; the patches'
  permutations are still independent and uniformly random, so the distribution of the
  batch is unchanged. K = 4.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Targets", "AUGMENTATIONS", "get_augmentation", "none", "crop_flip", "mixup", "cutmix", "ricap",
           "MIXUP_ALPHA", "CUTMIX_ALPHA", "CUTMIX_PROB", "RICAP_BETA", "CROP_PADDING"]

MIXUP_ALPHA = 0.2
CUTMIX_ALPHA = 1.0
CUTMIX_PROB = 0.5
RICAP_BETA = 0.3
CROP_PADDING = 4


class Targets(NamedTuple):
    """K label sets of a batch: ``labels`` [N, K] int64, ``weights`` [N, K] float32 with
    rows summing to 1."""

    labels: torch.Tensor
    weights: torch.Tensor

    @staticmethod
    def hard(y: torch.Tensor) -> "Targets":
        return Targets(y[:, None], torch.ones(y.shape[0], 1))

    @property
    def k(self) -> int:
        return self.labels.shape[1]

    def dominant_k(self) -> torch.Tensor:
        """[N] index of the largest weight (the first one on ties)."""
        return self.weights.argmax(dim=1)

    def dominant(self) -> torch.Tensor:
        """[N] the dominant (largest-weight) label of each sample."""
        return self.labels.gather(1, self.dominant_k()[:, None]).squeeze(1)

    def index(self, idx: torch.Tensor) -> "Targets":
        return Targets(self.labels[idx], self.weights[idx])


Augmentation = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, Targets]]


def _beta(alpha: float, generator: torch.Generator) -> float:
    """One draw of Beta(alpha, alpha), determined by the torch generator."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _randint(high: int, generator: torch.Generator) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(0, high, (1,), generator=generator))


def none(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, Targets]:
    return x, Targets.hard(y)


def crop_flip(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, *, padding: int = CROP_PADDING,
              fill: float = 0.0) -> tuple[torch.Tensor, Targets]:
    n, c, h, w = x.shape
    if n == 0:
        return x, Targets.hard(y)
    padded = F.pad(x, (padding, padding, padding, padding), value=fill)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(h)
    cols = dx[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    return out, Targets.hard(y)


def mixup(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, *,
          alpha: float = MIXUP_ALPHA) -> tuple[torch.Tensor, Targets]:
    n = x.shape[0]
    lam = _beta(alpha, generator)
    lam = max(lam, 1.0 - lam)
    perm = torch.randperm(n, generator=generator)
    out = lam * x + (1.0 - lam) * x[perm]
    weights = torch.tensor([lam, 1.0 - lam], dtype=torch.float32).expand(n, 2).contiguous()
    return out, Targets(torch.stack([y, y[perm]], dim=1), weights)


def cutmix(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, *, alpha: float = CUTMIX_ALPHA,
           prob: float = CUTMIX_PROB) -> tuple[torch.Tensor, Targets]:
    n, _, h, w = x.shape
    apply = float(torch.rand(1, generator=generator)) < prob
    lam = _beta(alpha, generator)
    lam = max(lam, 1.0 - lam)
    perm = torch.randperm(n, generator=generator)
    cy, cx = _randint(h, generator), _randint(w, generator)
    labels = torch.stack([y, y[perm]], dim=1)
    if not apply:
        return x, Targets(labels, torch.tensor([1.0, 0.0]).expand(n, 2).contiguous())
    cut = (1.0 - lam) ** 0.5
    ch, cw = int(h * cut), int(w * cut)
    y1, y2 = min(max(cy - ch // 2, 0), h), min(max(cy + ch // 2, 0), h)
    x1, x2 = min(max(cx - cw // 2, 0), w), min(max(cx + cw // 2, 0), w)
    out = x.clone()
    out[:, :, y1:y2, x1:x2] = x[perm][:, :, y1:y2, x1:x2]
    lam = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
    weights = torch.tensor([lam, 1.0 - lam], dtype=torch.float32).expand(n, 2).contiguous()
    return out, Targets(labels, weights)


def ricap(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, *,
          beta: float = RICAP_BETA) -> tuple[torch.Tensor, Targets]:
    n, _, h, w = x.shape
    bw = int(round(w * _beta(beta, generator)))
    bh = int(round(h * _beta(beta, generator)))
    widths = [bw, w - bw, bw, w - bw]
    heights = [bh, bh, h - bh, h - bh]
    areas = [pw * ph for pw, ph in zip(widths, heights)]
    largest = max(range(4), key=lambda k: (areas[k], -k))  # the first largest patch
    patches, labels, weights = [], [], []
    for k in range(4):
        perm = torch.arange(n) if k == largest else torch.randperm(n, generator=generator)
        oy = _randint(h - heights[k] + 1, generator)
        ox = _randint(w - widths[k] + 1, generator)
        patches.append(x[perm][:, :, oy:oy + heights[k], ox:ox + widths[k]])
        labels.append(y[perm])
        weights.append(areas[k] / (h * w))
    top = torch.cat([patches[0], patches[1]], dim=3)
    bottom = torch.cat([patches[2], patches[3]], dim=3)
    out = torch.cat([top, bottom], dim=2)
    mix = torch.tensor(weights, dtype=torch.float32).expand(n, 4).contiguous()
    return out, Targets(torch.stack(labels, dim=1), mix)


AUGMENTATIONS: dict[str, Augmentation] = {"none": none, "crop_flip": crop_flip, "ricap": ricap, "mixup": mixup,
                                          "cutmix": cutmix}


def get_augmentation(name: str, *, fill: float = 0.0) -> Augmentation:
    """The augmentation ``name``; ``fill`` is the padding value of ``crop_flip`` (the
    normalised value of a black pixel)."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; known: {', '.join(AUGMENTATIONS)}")
    if name == "crop_flip":
        return lambda x, y, g: crop_flip(x, y, g, fill=fill)
    return AUGMENTATIONS[name]
