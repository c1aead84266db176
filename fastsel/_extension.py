"""Loads the compiled ``fastsel._C`` extension if it was built.

Importing it registers the ``torch.ops.fastsel.*`` operators (schemas and CPU kernels).
When it is missing, fastsel keeps working on the pure-PyTorch backend.
"""

from __future__ import annotations

import warnings

import torch  # noqa: F401  (the extension links against libtorch, load it first)

try:
    from fastsel import _C  # noqa: F401

    CPU_EXTENSION_AVAILABLE = True
    CUDA_EXTENSION_AVAILABLE = bool(_C.build_cuda())
    EXTENSION_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    CPU_EXTENSION_AVAILABLE = False
    CUDA_EXTENSION_AVAILABLE = False
    EXTENSION_ERROR = str(exc)
    if "undefined symbol" in EXTENSION_ERROR:
        warnings.warn(
            f"fastsel._C does not match the installed torch ({EXTENSION_ERROR}); "
            "rebuild it with `pip install --no-build-isolation -e .`. "
            "Falling back to the pure-PyTorch backend.",
            RuntimeWarning,
            stacklevel=2,
        )


def build_info() -> dict:
    """How the extension was compiled (vector ISA, OpenMP), or why it is absent."""
    if not CPU_EXTENSION_AVAILABLE:
        return {"available": False, "error": EXTENSION_ERROR}
    return {"available": True, "isa": _C.build_isa(), "openmp": _C.build_openmp(),
            "cuda": CUDA_EXTENSION_AVAILABLE}
