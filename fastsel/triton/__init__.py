"""Triton backend of fastsel (GPU kernels; also runs on the CPU under TRITON_INTERPRET=1).

``TRITON_AVAILABLE`` says whether ``triton`` imports; the launchers are exported only
then. Each kernel lives in its own module next to its launcher:

* ``score_forward``: the fused one-pass scoring (+ the top-2 MMS from its outputs),
* ``mms_exact``: the exact Minimal Margin Score sweep (second read of the rows),
* ``score_backward``: the gradient of the loss from the saved lse.

The launchers mirror ``torch.ops.fastsel.score_forward`` / ``score_backward``.
"""

from __future__ import annotations

try:
    import triton  # noqa: F401

    TRITON_AVAILABLE = True
    TRITON_IMPORT_ERROR: str | None = None
except ImportError as exc:
    TRITON_AVAILABLE = False
    TRITON_IMPORT_ERROR = str(exc)

__all__ = ["TRITON_AVAILABLE", "TRITON_IMPORT_ERROR"]

if TRITON_AVAILABLE:
    from fastsel.triton.mms_exact import mms_exact_triton
    from fastsel.triton.score_backward import score_backward_triton
    from fastsel.triton.score_forward import score_forward_triton

    __all__ += ["score_forward_triton", "score_backward_triton", "mms_exact_triton"]

# Selection ops (docs/methods.md section 2): per-element keys of
# csrc/include/fastsel/selection_keys.h (device helpers in ``selection_math``).
if TRITON_AVAILABLE:
    from fastsel.triton.percentile_count import percentile_triton
    from fastsel.triton.race_keys import race_keys_triton
    from fastsel.triton.rank_keys import rank_keys_triton
    from fastsel.triton.replacement_draws import replacement_draws_triton

    __all__ += ["rank_keys_triton", "race_keys_triton", "replacement_draws_triton",
                "percentile_triton"]
