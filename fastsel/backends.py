"""The backends of fastsel's ops, in one place: their names, which ones this process can
use, and which one a call runs on. ``fastsel.ops`` (scoring) and ``fastsel.selection``
(selection) both dispatch through ``resolve_backend``."""

from __future__ import annotations

import os

import torch

from fastsel._extension import CPU_EXTENSION_AVAILABLE, CUDA_EXTENSION_AVAILABLE

__all__ = ["BACKENDS", "FLOAT_DTYPES", "available_backends", "check_backend_name", "resolve_backend",
           "triton_importable"]

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # what the ops take


def triton_importable() -> bool:
    """Whether Triton can be imported, without importing it (see fastsel/registration/)."""
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def available_backends() -> list[str]:
    """Backends usable in this process, in the order ``auto`` prefers them."""
    names = []
    if torch.cuda.is_available():
        if triton_importable():
            names.append("triton")
        if CUDA_EXTENSION_AVAILABLE:
            names.append("cuda")
    if CPU_EXTENSION_AVAILABLE:
        names.append("cpu")
    names.append("torch")
    return names


def check_backend_name(backend: object) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend a call on ``device`` runs on: ``auto`` resolved by preference, a named
    one checked to be built and to run on that device (else a clear error)."""
    if backend == "auto":
        if device.type == "cpu":
            return "cpu" if CPU_EXTENSION_AVAILABLE else "torch"
        if device.type == "cuda":
            if triton_importable():
                return "triton"
            if CUDA_EXTENSION_AVAILABLE:
                return "cuda"
        return "torch"
    compiled = {  # backend: (built?, device it runs on, how to get it built)
        "cpu": (CPU_EXTENSION_AVAILABLE, "cpu",
                "the compiled extension fastsel._C, which is not built; run "
                "`pip install --no-build-isolation -e .` or use backend='torch'"),
        "cuda": (CUDA_EXTENSION_AVAILABLE, "cuda",
                 "fastsel._C built with CUDA (a CUDA toolkit and a CUDA build of torch at "
                 "build time; FASTSEL_BUILD_CUDA=1 to insist)"),
    }
    if backend in compiled:
        built, runs_on, needs = compiled[backend]
        if not built:
            raise RuntimeError(f"backend={backend!r} needs {needs}")
        if device.type != runs_on:
            raise ValueError(f"backend={backend!r} runs on {runs_on.upper()} tensors, got tensors on {device}")
    if backend == "triton":
        if not triton_importable():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' runs on CUDA tensors (or on the CPU under "
                f"TRITON_INTERPRET=1), got tensors on {device}"
            )
    return backend
