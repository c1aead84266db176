"""Fashion-MNIST loader: IDX parsing on tiny files written here (every type, raw and gzipped),
malformed and hostile files (each error names the file; a gzip bomb and 1 GiB of trailing
bytes are refused in bounded memory, measured in a subprocess), lookup order and the rule
that one directory supplies both files, the error that gives the install command, and the
real data set when Debian's package is present."""

from __future__ import annotations

import gzip
import json
import os
import re
import struct
import subprocess
import sys
import threading
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from fastsel.experiments import datasets
from fastsel.experiments.datasets import DEBIAN_FASHION_MNIST, fashion_mnist, read_idx


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


# ----------------------------------------------------------------------------------
# read_idx against broken and hostile files
# ----------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def header(code: int, dims) -> bytes:
    return bytes([0, 0, code, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims)


def write_file(path: Path, data: bytes) -> Path:
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data, mtime=0))  # no file name: deflate data starts at byte 10
    else:
        path.write_bytes(data)
    return path


def raises_naming(path, *fragments, exc=ValueError):
    """pytest.raises(exc) whose message must name ``path`` and contain each fragment."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(str(s))})" for s in (path, *fragments)))


IDX_ARRAYS = {
    0x08: np.array([[0, 1, 127], [128, 254, 255]], dtype=np.uint8),
    0x09: np.array([[-128, -1, 0], [1, 126, 127]], dtype=np.int8),
    0x0B: np.array([[-32768, -2, 0], [1, 258, 32767]], dtype=np.int16),
    0x0C: np.array([[-2**31, -70000, 0], [1, 70000, 2**31 - 1]], dtype=np.int32),
    0x0D: np.array([[-np.inf, -1.5, 0.0], [1e-40, 3.25e38, np.inf]], dtype=np.float32),
    0x0E: np.array([[-np.inf, -1.5, -0.0], [5e-324, 1.7e308, np.inf]], dtype=np.float64),
}


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("code", sorted(IDX_ARRAYS), ids=lambda c: f"0x{c:02X}")
def test_read_idx_round_trip_every_type(tmp_path, code, compress):
    a = IDX_ARRAYS[code]
    path = tmp_path / ("a.gz" if compress else "a")
    write_file(path, header(code, a.shape) + a.astype(a.dtype.newbyteorder(">")).tobytes())
    got = read_idx(path)
    assert got.shape == a.shape and got.dtype == (a.dtype.newbyteorder(">") if a.itemsize > 1 else a.dtype)
    assert got.tobytes() == a.astype(got.dtype).tobytes()  # bit for bit (signed zeros, infinities)
    assert np.array_equal(got, a)
    assert read_idx(path, a.nbytes, dtype=got.dtype, shape=(None, 3)).tobytes() == got.tobytes()


@pytest.mark.parametrize("max_bytes", [None, 10**6], ids=["no-limit", "max_bytes"])
@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_read_idx_in_chunks(tmp_path, monkeypatch, compress, max_bytes):
    # Tiny chunks and no up-front allocation for gzip without max_bytes: every read path,
    # with the payload spread over many chunks and the last one partial.
    monkeypatch.setattr(datasets, "_CHUNK", 7)
    monkeypatch.setattr(datasets, "_PREALLOCATE", 0)
    a = np.random.default_rng(0).integers(-2**31, 2**31, size=(5, 3, 11), dtype=np.int64).astype(">i4")
    path = write_file(tmp_path / ("a.gz" if compress else "a"), header(0x0C, a.shape) + a.tobytes())
    got = read_idx(path, max_bytes)
    assert got.shape == a.shape and np.array_equal(got, a)


def test_read_idx_from_a_pipe(tmp_path):
    # Not a regular file: no size from os.stat, so the end of the stream is checked by reading.
    a = np.arange(6, dtype=np.uint8)
    for extra, ok in ((b"", True), (b"\x00", False)):
        fifo = tmp_path / f"fifo{len(extra)}"
        os.mkfifo(fifo)
        writer = threading.Thread(target=lambda p=fifo, e=extra: p.write_bytes(header(0x08, a.shape) + a.tobytes() + e),
                                  daemon=True)  # a reader that never opens the pipe must not hang the run
        writer.start()
        try:
            if ok:
                assert np.array_equal(read_idx(fifo), a)
            else:
                with raises_naming(fifo, "trailing bytes"):
                    read_idx(fifo)
        finally:
            writer.join(5)


def _gzip_corrupt(kind):
    def build(path):
        good = gzip.compress(header(0x08, (200,)) + bytes(range(200)), mtime=0)
        if kind == "not gzip":
            data = header(0x08, (200,)) + bytes(range(200))
        elif kind == "cut":
            data = good[:-12]
        elif kind == "crc":
            data = good[:-8] + bytes([good[-8] ^ 1]) + good[-7:]
        else:  # an invalid deflate block type in the first byte of the deflate data
            data = good[:10] + b"\xff" + good[11:]
        path.write_bytes(data)
    return build


@pytest.mark.parametrize("kind, cause", [("not gzip", gzip.BadGzipFile), ("cut", EOFError),
                                         ("crc", gzip.BadGzipFile), ("deflate", zlib.error)])
def test_read_idx_corrupt_gzip(tmp_path, kind, cause):
    path = tmp_path / "a.gz"
    _gzip_corrupt(kind)(path)
    with raises_naming(path, "corrupt gzip stream", cause.__name__) as info:
        read_idx(path)
    assert isinstance(info.value.__cause__, cause)


BAD_FILES = {
    # name: (content, fragments the message must hold besides the path)
    "empty": (b"", ["truncated header", "4-byte magic", "0 byte"]),
    "short magic": (b"\x00\x00", ["truncated header", "4-byte magic", "2 byte"]),
    "bad magic": (b"\x01\x02\x08\x01" + bytes(8), ["not an IDX file", "bad magic number 01020801"]),
    "gzip without .gz": (gzip.compress(header(0x08, (1,)) + b"\x00"), ["bad magic number 1f8b", "*.gz"]),
    "unknown type": (header(0x0A, (2,)) + bytes(2), ["unknown data type code 0x0A", "0x08"]),
    "ndim 0": (header(0x08, ()), ["0 dimensions", "expected 1 to 32"]),
    "ndim absurd": (header(0x08, (1,) * 200), ["200 dimensions", "expected 1 to 32"]),
    "short dims": (header(0x08, (2, 3, 4))[:-3], ["truncated header", "3 dimensions need 12 bytes", "holds 9"]),
    "short payload": (header(0x08, (2, 3)) + bytes(5), ["truncated payload", "(2, 3)", "6 bytes"]),
    "no payload": (header(0x0C, (2, 3)), ["truncated payload", "(2, 3)", "24 bytes"]),
    "trailing": (header(0x08, (2, 3)) + bytes(7), ["trailing", "(2, 3)", "6 bytes"]),
    "wrapping size": (header(0x08, (1 << 16,) * 4), ["18446744073709551616 bytes"]),  # 2^64: 0 in int64
}


@pytest.mark.parametrize("name, compress", [(name, compress) for name in BAD_FILES for compress in (True, False)
                                             if not (compress and name == "gzip without .gz")])
def test_read_idx_rejects_malformed(tmp_path, name, compress):
    content, fragments = BAD_FILES[name]
    path = write_file(tmp_path / ("bad.gz" if compress else "bad"), content)
    with raises_naming(path, *fragments):
        read_idx(path)


def test_read_idx_missing_file(tmp_path):
    for name in ("nothing", "nothing.gz"):
        with raises_naming(tmp_path / name, exc=FileNotFoundError):
            read_idx(tmp_path / name)


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_read_idx_checks_header_before_payload(tmp_path, compress):
    # No payload follows these headers: an error about the payload instead of the header
    # would mean it was read (or allocated) first.
    path = tmp_path / ("a.gz" if compress else "a")
    write_file(path, header(0x0C, (2, 3)))
    with raises_naming(path, "expected data type uint8", "int32 (code 0x0C)"):
        read_idx(path, dtype=np.uint8)
    with raises_naming(path, "expected shape (n, 3, 4)", "(2, 3)"):
        read_idx(path, shape=(None, 3, 4))
    with raises_naming(path, "expected shape (n,)", "(2, 3)"):
        read_idx(path, shape=(None,))
    with raises_naming(path, "24 bytes", "max_bytes=23"):
        read_idx(path, max_bytes=23)


@pytest.mark.parametrize("max_bytes", [None, 1000])
@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_read_idx_enormous_header_allocates_nothing(tmp_path, compress, max_bytes):
    path = write_file(tmp_path / ("a.gz" if compress else "a"), header(0x0E, (2**32 - 1,) * 3) + bytes(64))
    tracemalloc.start()
    try:
        fragments = ["(4294967295, 4294967295, 4294967295)", str(8 * (2**32 - 1) ** 3) + " bytes"]
        with raises_naming(path, *fragments, *([] if max_bytes is None else ["max_bytes=1000"])):
            read_idx(path, max_bytes)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MiB


# Runs read_idx on each path of argv in a fresh interpreter and reports, per file, the
# growth of the peak RSS (VmHWM, reset before each file) and the peak of traced Python
# allocations during the call.
MEMORY_PROBE = r"""
import json, resource, sys, time, tracemalloc
from fastsel.experiments.datasets import read_idx

def peak_kb():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
results = {}
for path in sys.argv[1:]:
    try:
        with open("/proc/self/clear_refs", "w") as f:  # peak RSS := current RSS
            f.write("5")
    except OSError:
        pass
    base = peak_kb()
    tracemalloc.start()
    start = time.perf_counter()
    try:
        read_idx(path)
        error = None
    except Exception as e:
        error = [type(e).__name__, str(e)]
    seconds = time.perf_counter() - start
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    results[path] = {"error": error, "seconds": seconds, "rss": (peak_kb() - base) * 1024, "traced": traced}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory):
    """A gzip bomb (header: 4 bytes; stream: 200 MiB of zeros, ~1 MB on disk) and a raw file
    with 1 GiB of trailing bytes (sparse), with what reading each cost: one subprocess for
    both, as starting one (torch) dominates the time."""
    d = tmp_path_factory.mktemp("hostile")
    bomb, trailing = d / "bomb-idx1-ubyte.gz", d / "big-idx1-ubyte"
    zeros = bytes(MiB)
    with gzip.GzipFile(bomb, "wb", compresslevel=1, mtime=0) as f:
        f.write(header(0x08, (4,)) + b"abcd")
        for _ in range(200):
            f.write(zeros)
    trailing.write_bytes(header(0x08, (4,)) + b"abcd")
    os.truncate(trailing, 1 << 30)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(bomb), str(trailing)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout.strip().splitlines()[-1])
    return {"bomb": (bomb, results[str(bomb)]), "trailing": (trailing, results[str(trailing)])}


def assert_refused_cheaply(path: Path, r: dict, fragment: str) -> None:
    assert r["error"] is not None and r["error"][0] == "ValueError", r
    assert r["rss"] < 50 * MiB and r["traced"] < 50 * MiB, r
    assert r["seconds"] < 5, r
    assert str(path) in r["error"][1] and fragment in r["error"][1], r


def test_gzip_bomb_is_rejected_in_bounded_memory(hostile_files):
    path, r = hostile_files["bomb"]
    assert path.stat().st_size < 2 * MiB
    assert_refused_cheaply(path, r, "trailing bytes")


def test_raw_trailing_bytes_are_not_read(hostile_files):
    path, r = hostile_files["trailing"]
    assert_refused_cheaply(path, r, f"{(1 << 30) - 12} trailing byte(s)")


# ----------------------------------------------------------------------------------
# fashion_mnist: what the files must hold, and where they come from
# ----------------------------------------------------------------------------------

def test_loader_rejects_labels_out_of_range(tmp_path):
    tiny_set(tmp_path, n=5)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 9, 12, 10, 255], dtype=np.uint8))
    with raises_naming(tmp_path / "train-labels-idx1-ubyte.gz", "[0, 10)", "found 12 at index 2"):
        fashion_mnist(root=tmp_path)


def test_loader_rejects_count_mismatch(tmp_path):
    tiny_set(tmp_path, n=5)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, dtype=np.uint8))
    with raises_naming(tmp_path / "train-images-idx3-ubyte.gz", tmp_path / "train-labels-idx1-ubyte.gz",
                       "5 images", "4 labels"):
        fashion_mnist(root=tmp_path)
    tiny_set(tmp_path, n=0)
    with raises_naming(tmp_path / "train-labels-idx1-ubyte.gz", "1 to 60000"):
        fashion_mnist(root=tmp_path)


@pytest.mark.parametrize("train", [True, False])
def test_loader_checks_headers_before_payload(tmp_path, train):
    # Headers alone, no payload: the declared type, shape and size must be refused first.
    prefix, limit = ("train", 60000) if train else ("t10k", 10000)
    images, labels = tmp_path / f"{prefix}-images-idx3-ubyte", tmp_path / f"{prefix}-labels-idx1-ubyte"
    labels.write_bytes(header(0x08, (3,)) + bytes(3))
    cases = [
        (header(0x0C, (3, 28, 28)), images, ["expected data type uint8", "int32"]),
        (header(0x08, (3, 28, 29)), images, ["expected shape (n, 28, 28)", "(3, 28, 29)"]),
        (header(0x08, (3, 784)), images, ["expected shape (n, 28, 28)", "(3, 784)"]),
        (header(0x08, (limit + 1, 28, 28)), images, [f"max_bytes={limit * 784}"]),
        (header(0x08, (2**32 - 1, 28, 28)), images, [f"max_bytes={limit * 784}"]),
    ]
    for content, path, fragments in cases:
        path.write_bytes(content)
        with raises_naming(path, *fragments):
            fashion_mnist(root=tmp_path, train=train)
    write_idx(images, np.zeros((3, 28, 28), dtype=np.uint8), compress=False)
    for content, fragments in [(header(0x08, (3, 1)), ["expected shape (n,)"]),
                               (header(0x08, (limit + 1,)), [f"max_bytes={limit}"])]:
        labels.write_bytes(content)
        with raises_naming(labels, *fragments):
            fashion_mnist(root=tmp_path, train=train)


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Complete sets (train and test) in $FASTSEL_DATA and in the system directory, each with
    its own size: a load that used any of their files shows it."""
    env, system = tmp_path / "env", tmp_path / "system"
    for directory, n in ((env, 11), (system, 13)):
        directory.mkdir()
        tiny_set(directory, n=n, seed=n)
        tiny_set(directory, n=n, train=False, seed=n)
    monkeypatch.setenv("FASTSEL_DATA", str(env))
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", system)
    return env, system


@pytest.mark.parametrize("keep", ["images", "labels"])
def test_partial_root_is_not_mixed(tmp_path, monkeypatch, elsewhere, keep):
    root = tmp_path / "root"
    root.mkdir()
    tiny_set(root, n=3)
    missing = "train-labels-idx1-ubyte" if keep == "images" else "train-images-idx3-ubyte"
    (root / (missing + ".gz")).unlink()
    with raises_naming(root, missing, "not found in root", exc=FileNotFoundError):
        fashion_mnist(root=root)
    monkeypatch.delenv("FASTSEL_DATA")  # nor with the system copy alone
    with raises_naming(root, missing, exc=FileNotFoundError):
        fashion_mnist(root=root)


def test_root_may_mix_gz_and_raw(tmp_path, elsewhere):
    images, labels = tiny_set(tmp_path, n=3)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, compress=False)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    ds = fashion_mnist(root=tmp_path)
    assert len(ds) == 3 and torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64)))


def test_lookup_takes_the_first_complete_directory(tmp_path, elsewhere):
    env, system = elsewhere
    sub = env / "fashion-mnist"
    sub.mkdir()
    tiny_set(sub, n=7, seed=7)
    # $FASTSEL_DATA lacks its labels, $FASTSEL_DATA/fashion-mnist its images: neither counts.
    (env / "train-labels-idx1-ubyte.gz").unlink()
    (sub / "train-images-idx3-ubyte.gz").unlink()
    ds = fashion_mnist()
    want_images, want_labels = tiny_set(tmp_path, n=13, seed=13)  # what the system directory holds
    assert len(ds) == 13 and torch.equal(ds.labels, torch.from_numpy(want_labels.astype(np.int64)))
    assert len(fashion_mnist(train=False)) == 11  # the test split is complete in $FASTSEL_DATA
    (system / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        fashion_mnist()
    for directory in (env, sub, system):
        assert str(directory) in str(info.value)


def test_lookup_is_per_split(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTSEL_DATA", raising=False)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    tiny_set(tmp_path, n=4, train=False, compress=False)
    assert len(fashion_mnist(root=tmp_path, train=False)) == 4
    with raises_naming(tmp_path, "train-images-idx3-ubyte", "train-labels-idx1-ubyte", exc=FileNotFoundError):
        fashion_mnist(root=tmp_path, train=True)
