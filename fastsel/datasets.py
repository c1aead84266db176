"""Real data for the end-to-end benchmark: Fashion-MNIST (Xiao, Rasul & Vollgraf 2017)
from its IDX files, as shipped by Debian's package ``dataset-fashion-mnist``."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

__all__ = ["fashion_mnist", "FashionMNIST", "read_idx", "DEBIAN_FASHION_MNIST", "FASHION_MNIST_CLASSES"]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Per-pixel statistics of the training images, for normalisation.
_MEAN, _STD = 0.2860, 0.3530
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Union[str, Path]) -> np.ndarray:
    """An IDX file (optionally gzipped): magic 0x0000 <type> <ndim>, ndim big-endian uint32
    sizes, then the data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = raw[4 + 4 * ndim:]
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes), file holds {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _find(name: str, root: Optional[Union[str, Path]]) -> Path:
    candidates = []
    if root is not None:
        candidates.append(Path(root))
    if os.environ.get("FASTSEL_DATA"):
        env = Path(os.environ["FASTSEL_DATA"])
        candidates += [env, env / "fashion-mnist"]
    candidates.append(DEBIAN_FASHION_MNIST)
    for directory in candidates:
        for suffix in (".gz", ""):
            p = directory / (name + suffix)
            if p.exists():
                return p
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}(.gz) not found (looked in: {looked}). Install it with "
        f"`sudo apt-get install dataset-fashion-mnist` (files in {DEBIAN_FASHION_MNIST}), or put "
        f"the four IDX files in a directory given as root= or in $FASTSEL_DATA."
    )


class FashionMNIST(torch.utils.data.Dataset):
    """Images [1, 28, 28] float32 normalised with the training set's mean and std, labels
    int64. Everything is held in memory as two tensors (``images``, ``labels``)."""

    classes = FASHION_MNIST_CLASSES

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def fashion_mnist(root: Optional[Union[str, Path]] = None, train: bool = True) -> FashionMNIST:
    """The Fashion-MNIST training (60k) or test (10k) set, looked up in ``root``, then
    ``$FASTSEL_DATA``, then Debian's ``/usr/share/datasets/fashion-mnist``."""
    image_file, label_file = _FILES[bool(train)]
    images = read_idx(_find(image_file, root))
    labels = read_idx(_find(label_file, root))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"Fashion-MNIST files disagree: images {images.shape}, labels {labels.shape}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    x = (x - _MEAN) / _STD
    y = torch.from_numpy(labels.astype(np.int64))
    return FashionMNIST(x, y)
