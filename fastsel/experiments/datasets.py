"""Real data for the end-to-end benchmark: Fashion-MNIST (Xiao, Rasul & Vollgraf 2017)
from its IDX files, as shipped by Debian's package ``dataset-fashion-mnist``."""

from __future__ import annotations

import gzip
import os
import stat
import sys
import zlib
from pathlib import Path
from typing import BinaryIO, Optional, Sequence, Tuple, Union

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
# Number of samples in the published training and test sets: the most a file may declare.
_SIZES = {True: 60000, False: 10000}
_IMAGE_SHAPE = (28, 28)
# Per-pixel statistics of the training images, for normalisation.
_MEAN, _STD = 0.2860, 0.3530
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
# numpy's own limit on the number of dimensions (32 in numpy 1.x; 2.x allows 64).
_MAX_NDIM = 32
# Payload bytes read per call: what a read holds beyond the result.
_CHUNK = 1 << 20
# A gzip stream's decompressed size is unknown in advance, so without max_bytes the result
# is allocated up front only up to this size; past it, it grows with what the stream
# actually delivers, so a header declaring terabytes over a short stream fails as
# truncated instead of reserving terabytes.
_PREALLOCATE = 64 << 20


def _describe_dtype(code: int) -> str:
    return f"{np.dtype(_IDX_DTYPES[code]).name} (code 0x{code:02X})"


def _read_exact(f: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes (fewer only at the end of the stream); ``n`` is small here."""
    parts, got = [], 0
    while got < n:
        part = f.read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _read_payload(f: BinaryIO, n: int, preallocate: bool) -> Tuple[np.ndarray, int]:
    """Up to ``n`` bytes in chunks of ``_CHUNK``: (uint8 buffer, bytes read)."""
    if preallocate:
        # np.empty does not touch its pages: memory is committed only as chunks arrive.
        buf = np.empty(n, dtype=np.uint8)
        view, got = memoryview(buf), 0
        while got < n:
            k = f.readinto(view[got:got + _CHUNK])
            if not k:
                break
            got += k
        return buf, got
    grown = bytearray()
    while len(grown) < n:
        part = f.read(min(_CHUNK, n - len(grown)))
        if not part:
            break
        grown += part
    return np.frombuffer(grown, dtype=np.uint8), len(grown)


def _read_idx_stream(f: BinaryIO, path: Path, compressed: bool, max_bytes: Optional[int],
                     dtype: Optional[np.dtype], shape: Optional[Sequence[Optional[int]]]) -> np.ndarray:
    magic = _read_exact(f, 4)
    if len(magic) < 4:
        raise ValueError(f"{path}: truncated header: expected a 4-byte magic number, the file holds "
                         f"{len(magic)} byte(s)")
    if magic[0] != 0 or magic[1] != 0:
        hint = " (gzip data: name the file *.gz)" if magic[:2] == b"\x1f\x8b" else ""
        raise ValueError(f"{path} is not an IDX file: bad magic number {magic.hex()}, expected "
                         f"0000<type><ndim>{hint}")
    code, ndim = magic[2], magic[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise ValueError(f"{path} is not an IDX file: unknown data type code 0x{code:02X} "
                         f"(magic {magic.hex()}), expected one of {known}")
    if not 1 <= ndim <= _MAX_NDIM:
        raise ValueError(f"{path}: header declares {ndim} dimensions, expected 1 to {_MAX_NDIM}")
    dims = _read_exact(f, 4 * ndim)
    if len(dims) < 4 * ndim:
        raise ValueError(f"{path}: truncated header: {ndim} dimensions need {4 * ndim} bytes of sizes "
                         f"after the magic number, the file holds {len(dims)}")
    found_shape = tuple(int.from_bytes(dims[4 * i:4 * i + 4], "big") for i in range(ndim))
    item = np.dtype(_IDX_DTYPES[code])

    # Everything about the declared size is settled before a payload byte is read, so a
    # hostile header never causes an allocation.
    if dtype is not None and item != np.dtype(dtype):
        raise ValueError(f"{path}: expected data type {np.dtype(dtype).name}, header declares "
                         f"{_describe_dtype(code)}")
    if shape is not None and (len(shape) != ndim
                              or any(want is not None and want != got for want, got in zip(shape, found_shape))):
        want = "(" + ", ".join("n" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        raise ValueError(f"{path}: expected shape {want}, header declares {found_shape}")
    n = item.itemsize
    for d in found_shape:  # Python ints: no overflow however large the dimensions
        n *= d
    header_bytes = 4 + 4 * ndim
    if max_bytes is not None and n > max_bytes:
        raise ValueError(f"{path}: header says shape {found_shape} of {item.name} = {n} bytes, "
                         f"more than the limit max_bytes={max_bytes}")
    if n > sys.maxsize:
        raise ValueError(f"{path}: header says shape {found_shape} of {item.name} = {n} bytes, "
                         f"more than any buffer can hold")

    # Raw regular files: the size on disk settles truncation and trailing bytes without
    # reading the excess.
    size_checked = False
    if not compressed:
        st = os.fstat(f.fileno())
        if stat.S_ISREG(st.st_mode):
            held = st.st_size - header_bytes
            if held < n:
                raise ValueError(f"{path}: truncated payload: header says shape {found_shape} of "
                                 f"{item.name} = {n} bytes, the file holds {held} after the header")
            if held > n:
                raise ValueError(f"{path}: {held - n} trailing byte(s): header says shape "
                                 f"{found_shape} of {item.name} = {n} bytes, the file holds {held} "
                                 f"after the header")
            size_checked = True
    preallocate = size_checked or max_bytes is not None or n <= _PREALLOCATE
    buf, got = _read_payload(f, n, preallocate)
    if got < n:
        raise ValueError(f"{path}: truncated payload: header says shape {found_shape} of "
                         f"{item.name} = {n} bytes, the {'stream' if compressed else 'file'} ends "
                         f"after {got}")
    # Ends there? For gzip this also reads the trailer, so a CRC or length mismatch surfaces.
    if f.read(1):
        raise ValueError(f"{path}: trailing bytes: header says shape {found_shape} of {item.name} "
                         f"= {n} bytes, the {'stream' if compressed else 'file'} holds more")
    return buf.view(item).reshape(found_shape)


def read_idx(path: Union[str, Path], max_bytes: Optional[int] = None, *,
             dtype: Optional[np.dtype] = None,
             shape: Optional[Sequence[Optional[int]]] = None) -> np.ndarray:
    """An IDX file, gzipped if its name ends in ``.gz``: magic ``00 00 <type> <ndim>``,
    ``ndim`` big-endian uint32 sizes, then the data (type codes 0x08 uint8, 0x09 int8,
    0x0B >i2, 0x0C >i4, 0x0D >f4, 0x0E >f8; multi-byte types keep their big-endian dtype).

    The file is streamed: the header is checked first (against ``dtype``, ``shape`` —
    ``None`` entries match any size — and ``max_bytes``, the largest payload accepted),
    then exactly the declared payload is read in 1 MiB chunks, and the stream must end
    there. Memory is bounded by the declared payload size plus a chunk, never by what a
    stream decompresses to or by trailing bytes.

    Raises ``FileNotFoundError`` if ``path`` does not exist, and ``ValueError`` naming
    ``path`` for a bad magic number or type code, 0 or more than 32 dimensions, a header or
    payload cut short, trailing bytes, a corrupt gzip stream, or a header that does not
    match ``dtype`` / ``shape`` / ``max_bytes``.
    """
    path = Path(path)
    compressed = path.suffix == ".gz"
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            return _read_idx_stream(f, path, compressed, max_bytes, dtype, shape)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        if not compressed:
            raise
        raise ValueError(f"{path}: corrupt gzip stream, expected a valid gzip file "
                         f"({type(e).__name__}: {e})") from e


def _find(names: Sequence[str], root: Optional[Union[str, Path]]) -> Tuple[Path, ...]:
    """The files ``names`` (each ``name.gz`` or ``name``), all from one directory: ``root``
    alone if given, else the first of ``$FASTSEL_DATA``, ``$FASTSEL_DATA/fashion-mnist``
    and ``DEBIAN_FASHION_MNIST`` that holds them all. Files from different directories are
    never mixed: a partial copy next to a complete one would pair unrelated images and
    labels."""

    def lookup(directory: Path) -> Tuple[Tuple[Path, ...], Tuple[str, ...]]:
        found, missing = [], []
        for name in names:
            p = next((directory / (name + s) for s in (".gz", "") if (directory / (name + s)).is_file()), None)
            (found.append(p) if p is not None else missing.append(name))
        return tuple(found), tuple(missing)

    install = (f"Install it with `sudo apt-get install dataset-fashion-mnist` (files in "
               f"{DEBIAN_FASHION_MNIST}), or put the four IDX files in a directory given as root= "
               f"or in $FASTSEL_DATA.")
    if root is not None:
        found, missing = lookup(Path(root))
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST file(s) {', '.join(m + '(.gz)' for m in missing)} not found in "
                f"root={root} (with root= no other directory is searched). {install}")
        return found
    candidates = []
    if os.environ.get("FASTSEL_DATA"):
        env = Path(os.environ["FASTSEL_DATA"])
        candidates += [env, env / "fashion-mnist"]
    candidates.append(DEBIAN_FASHION_MNIST)
    looked = []
    for directory in candidates:
        found, missing = lookup(directory)
        if not missing:
            return found
        looked.append(f"{directory} (lacks {', '.join(missing)})" if found else str(directory))
    raise FileNotFoundError(
        f"Fashion-MNIST files {' and '.join(n + '(.gz)' for n in names)} not found together in one "
        f"directory (looked in: {', '.join(looked)}). {install}")


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
    """The Fashion-MNIST training (60k) or test (10k) set. Both files come from one
    directory: ``root`` alone if given (``FileNotFoundError`` naming it and the missing
    file otherwise), else the first of ``$FASTSEL_DATA``, ``$FASTSEL_DATA/fashion-mnist``
    and Debian's ``/usr/share/datasets/fashion-mnist`` that holds both.

    The headers must declare uint8 images ``(n, 28, 28)`` and labels ``(n,)`` with
    1 <= n <= 60000 (train) or 10000 (test) — checked before any payload is read, so
    memory stays bounded by the real set's size — and every label must be in [0, 10);
    otherwise ``ValueError`` naming the file (see ``read_idx`` for malformed files)."""
    train = bool(train)
    image_path, label_path = _find(_FILES[train], root)
    limit = _SIZES[train]
    images = read_idx(image_path, max_bytes=limit * _IMAGE_SHAPE[0] * _IMAGE_SHAPE[1], dtype=np.uint8,
                      shape=(None,) + _IMAGE_SHAPE)
    labels = read_idx(label_path, max_bytes=limit, dtype=np.uint8, shape=(None,))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"Fashion-MNIST files disagree: {image_path} holds {images.shape[0]} images, "
                         f"{label_path} holds {labels.shape[0]} labels")
    if labels.shape[0] == 0:
        raise ValueError(f"{label_path}: expected 1 to {limit} samples, the files hold none")
    bad = labels >= len(FASHION_MNIST_CLASSES)  # uint8: never negative
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{label_path}: labels must be in [0, {len(FASHION_MNIST_CLASSES)}), found "
                         f"{int(labels[i])} at index {i}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    x = (x - _MEAN) / _STD
    y = torch.from_numpy(labels.astype(np.int64))
    return FashionMNIST(x, y)
