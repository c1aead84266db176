"""Loads the compiled ``fastsel._C`` extension if it was built.

Importing it registers the ``torch.ops.fastsel.*`` operators (schemas and CPU kernels).
When it is missing or cannot be loaded, fastsel keeps working on the pure-PyTorch
backend, and says so once, at import, with the reason and the fix (a silent fallback
is far slower, and nothing else would tell): ``build_info()`` holds the same.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import warnings

import torch  # noqa: F401  (the extension links against libtorch, load it first)



class ExtensionWarning(RuntimeWarning):
    """fastsel runs without its compiled extension (``build_info()`` says why)."""


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_REBUILD = "pip install --no-build-isolation -e . (from the source tree; needs g++), or pip install --no-build-isolation ."


def _compiled_builds_elsewhere() -> list[str]:
    """Package directories, other than this one, that hold a compiled ``_C``: an installed
    build that the imported copy shadows (run from the source tree's root, whose
    ``fastsel/`` comes first on ``sys.path``)."""
    places = [os.path.join(p, "fastsel") for p in sys.path if p and os.path.isdir(os.path.join(p, "fastsel"))]
    try:  # an editable install points at its source tree
        from importlib import metadata

        url = json.loads(metadata.distribution("fastsel").read_text("direct_url.json") or "{}").get("url", "")
        if url.startswith("file://"):
            places.append(os.path.join(url[len("file://"):], "fastsel"))
    except Exception:  # no metadata (never installed): nothing more to look at
        pass
    found = []
    for place in places:
        place = os.path.abspath(place)
        if place != _PACKAGE_DIR and place not in found and glob.glob(os.path.join(place, "_C*.so")) + \
                glob.glob(os.path.join(place, "_C*.pyd")):
            found.append(place)
    return found


def _diagnose(error: str) -> tuple[str, str]:
    """(reason, fix) for an ``ImportError`` of ``fastsel._C`` (or an ``AttributeError`` of a
    build older than this source)."""
    if "has no attribute" in error:
        return (f"fastsel._C was built from an older fastsel source than this one ({error})",
                f"rebuild it: {_REBUILD}")
    if "undefined symbol" in error:
        return (f"fastsel._C was built against another torch than the installed {torch.__version__} ({error})",
                f"rebuild it: {_REBUILD}")
    built_here = glob.glob(os.path.join(_PACKAGE_DIR, "_C*.so")) + glob.glob(os.path.join(_PACKAGE_DIR, "_C*.pyd"))
    if built_here:
        return (f"{built_here[0]} could not be loaded ({error})", f"rebuild it: {_REBUILD}")
    elsewhere = _compiled_builds_elsewhere()
    if elsewhere:
        return (f"fastsel was imported from {_PACKAGE_DIR}, which holds no compiled extension, and shadows the "
                f"build in {elsewhere[0]} (Python puts the current directory first on sys.path)",
                "run from another directory than the source tree's root, or build in place: "
                "pip install --no-build-isolation -e .")
    return (f"fastsel._C is not built in {_PACKAGE_DIR} ({error})",
            f"install fastsel with a C++ compiler present: {_REBUILD}")


def choose_isa(requested: str, compiled: list, runnable: list) -> str:
    """The instruction set the CPU kernels run on: the widest compiled one the CPU runs, or
    ``requested`` (``FASTSEL_CPU_ISA``), which must be compiled and runnable."""
    if requested in ("", "auto"):
        return next(isa for isa in compiled if isa in runnable or isa == "none")
    if requested not in ("avx512", "avx2", "none"):
        raise RuntimeError(f"FASTSEL_CPU_ISA must be auto, avx512, avx2 or none, got {requested!r}")
    if requested not in compiled:
        raise RuntimeError(f"FASTSEL_CPU_ISA={requested}: fastsel's CPU kernels were compiled for "
                           f"{', '.join(compiled)} only")
    if requested != "none" and requested not in runnable:
        raise RuntimeError(f"FASTSEL_CPU_ISA={requested}: this CPU cannot run {requested} code (it runs "
                           f"{', '.join(runnable) or 'only the portable code'}); use a lower one or auto")
    return requested


try:
    from fastsel import _C  # noqa: F401

    CPU_EXTENSION_AVAILABLE = True
    CUDA_EXTENSION_AVAILABLE = bool(_C.build_cuda())
    EXTENSION_ERROR: str | None = None
    EXTENSION_REASON: str | None = None
    EXTENSION_FIX: str | None = None
    COMPILED_ISAS: list = list(_C.compiled_isas())
    RUNNABLE_ISAS: list = list(_C.runnable_isas())
    _C.set_active_isa(choose_isa(os.environ.get("FASTSEL_CPU_ISA", "auto").lower(), COMPILED_ISAS,
                                 RUNNABLE_ISAS))
except (ImportError, AttributeError) as exc:  # not built, shadowed, corrupt, built against another torch or
    # from an older fastsel source (a function this source calls is missing)
    CPU_EXTENSION_AVAILABLE = False
    CUDA_EXTENSION_AVAILABLE = False
    COMPILED_ISAS, RUNNABLE_ISAS = [], []
    EXTENSION_ERROR = str(exc)
    EXTENSION_REASON, EXTENSION_FIX = _diagnose(EXTENSION_ERROR)
    if os.environ.get("FASTSEL_ALLOW_FALLBACK") != "1":
        warnings.warn(
            f"\n\n*** fastsel is running WITHOUT its compiled extension: every op falls back to pure "
            f"PyTorch, many times slower on the CPU. ***\nWhy: {EXTENSION_REASON}.\nFix: {EXTENSION_FIX}.\n"
            "fastsel.build_info() says this again; FASTSEL_ALLOW_FALLBACK=1 accepts the fallback silently.\n",
            ExtensionWarning,
            stacklevel=2,
        )


def build_info() -> dict:
    """How the extension was compiled and runs: ``isa``, the instruction set the CPU
    kernels run on (the widest of ``isas_compiled`` in ``isas_runnable``, or
    ``FASTSEL_CPU_ISA``), OpenMP, CUDA; or why it is absent: ``error`` (the import
    error), ``reason`` and ``fix``."""
    if not CPU_EXTENSION_AVAILABLE:
        return {"available": False, "error": EXTENSION_ERROR, "reason": EXTENSION_REASON, "fix": EXTENSION_FIX,
                "package_dir": _PACKAGE_DIR}
    return {"available": True, "isa": _C.active_isa(), "isas_compiled": list(COMPILED_ISAS),
            "isas_runnable": list(RUNNABLE_ISAS), "openmp": _C.build_openmp(), "cuda": CUDA_EXTENSION_AVAILABLE}
