"""Launch helpers shared by the Triton kernels of fastsel (no kernels here).

Every kernel of this package processes a 2-D tile of ``BLOCK_N`` rows by ``BLOCK_C``
columns per step and loops over the columns of its rows in blocks of ``BLOCK_C``:

* ``BLOCK_C`` is a power of two (``tl.arange`` needs one), ``min(next_pow2(C), 4096)``
  by default: wide rows are streamed through the online recurrences instead of being
  held in registers at once.
* ``BLOCK_N`` packs several short rows into one program. On a GPU the tile is capped at
  ``GPU_TILE_ELEMENTS`` (register budget) and rows are spread so that there are enough
  programs to fill the device. Under ``TRITON_INTERPRET=1`` every program and every
  ``tl`` operation is a Python-level numpy call, so the interpreter prefers few, large
  tiles (``INTERPRETER_TILE_ELEMENTS``).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton

MAX_BLOCK_C = 4096
GPU_TILE_ELEMENTS = 4096
INTERPRETER_TILE_ELEMENTS = 1 << 14
# On a GPU, stop packing rows once fewer than this many programs would remain.
GPU_MIN_PROGRAMS = 256


def interpreting() -> bool:
    """True when Triton runs kernels with its numpy interpreter (``TRITON_INTERPRET=1``)."""
    return bool(triton.knobs.runtime.interpret)


def check_device(tensor: torch.Tensor, op: str) -> None:
    """Triton kernels need a GPU tensor, or CPU tensors under the interpreter."""
    if tensor.device.type == "cpu" and not interpreting():
        raise ValueError(
            f"{op}: the Triton backend needs tensors on a GPU (got CPU tensors); "
            "set TRITON_INTERPRET=1 before importing triton to run it on the CPU interpreter"
        )


def device_guard(tensor: torch.Tensor):
    """Makes the tensor's GPU current: Triton launches on the current device."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def _is_power_of_two(x: int) -> bool:
    return x >= 1 and (x & (x - 1)) == 0


def tile_shape(n_rows: int, n_classes: int, block_c: Optional[int] = None,
               block_n: Optional[int] = None) -> tuple[int, int]:
    """``(BLOCK_N, BLOCK_C)`` for a [n_rows, n_classes] input; explicit values win.

    Explicit sizes are for tests (a small ``block_c`` makes the column loop run on small
    inputs) and tuning; both must be powers of two.
    """
    if block_c is None:
        block_c = min(triton.next_power_of_2(max(n_classes, 1)), MAX_BLOCK_C)
    if not _is_power_of_two(block_c):
        raise ValueError(f"block_c must be a power of two, got {block_c}")
    if block_n is None:
        rows = triton.next_power_of_2(max(n_rows, 1))
        if interpreting():
            block_n = min(max(1, INTERPRETER_TILE_ELEMENTS // block_c), rows)
        else:
            by_registers = max(1, GPU_TILE_ELEMENTS // block_c)
            by_occupancy = triton.next_power_of_2(max(1, n_rows // GPU_MIN_PROGRAMS))
            block_n = min(by_registers, by_occupancy, rows)
    if not _is_power_of_two(block_n):
        raise ValueError(f"block_n must be a power of two, got {block_n}")
    return block_n, block_c


def num_warps_for(block_n: int, block_c: int) -> int:
    """Warps per program: 4 for tiles up to 2048 elements, else 8."""
    return 4 if block_n * block_c <= 2048 else 8
