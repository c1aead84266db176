"""Fashion-MNIST loader: IDX parsing on tiny files written here, lookup order, the error
that gives the install command, and the real data set when Debian's package is present."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from fastsel import datasets
from fastsel.datasets import DEBIAN_FASHION_MNIST, fashion_mnist, read_idx


def write_idx(path, array: np.ndarray, code: int = 0x08, compress: bool = True) -> None:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def tiny_set(directory, n=5, train=True, compress=True, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
    prefix = "train" if train else "t10k"
    write_idx(directory / f"{prefix}-images-idx3-ubyte", images, compress=compress)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels, compress=compress)
    return images, labels


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, compress):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a", a, compress=compress)
    got = read_idx(tmp_path / ("a.gz" if compress else "a"))
    assert got.shape == (2, 3, 4) and np.array_equal(got, a)
    b = np.array([[1.5, -2.0]], dtype=np.float32)
    write_idx(tmp_path / "b", b, code=0x0D, compress=False)
    assert np.array_equal(read_idx(tmp_path / "b"), b)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    a = np.zeros((2, 2), dtype=np.uint8)
    write_idx(tmp_path / "short", a, compress=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(tmp_path / "short")


@pytest.mark.parametrize("train", [True, False])
def test_loader_reads_root_and_normalises(tmp_path, train):
    images, labels = tiny_set(tmp_path, n=7, train=train)
    ds = fashion_mnist(root=tmp_path, train=train)
    assert len(ds) == 7
    x, y = ds[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and int(y) == int(labels[3])
    want = (torch.from_numpy(images[3].astype(np.float32)) / 255.0 - 0.2860) / 0.3530
    torch.testing.assert_close(x[0], want)


def test_loader_uses_fastsel_data_env(tmp_path, monkeypatch):
    (tmp_path / "fashion-mnist").mkdir()
    tiny_set(tmp_path / "fashion-mnist", n=3)
    monkeypatch.setenv("FASTSEL_DATA", str(tmp_path))
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    assert len(fashion_mnist()) == 3


def test_missing_data_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTSEL_DATA", raising=False)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist(root=tmp_path / "empty")


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.exists(),
                    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist():
    train, test = fashion_mnist(), fashion_mnist(train=False)
    assert len(train) == 60000 and len(test) == 10000
    assert torch.equal(train.labels.bincount(), torch.full((10,), 6000))
    assert abs(float(train.images.mean())) < 1e-3 and abs(float(train.images.std()) - 1) < 1e-2
