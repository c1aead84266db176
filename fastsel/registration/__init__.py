"""Where fastsel's ops are registered with PyTorch: one module per op family.

* ``score``: the scoring ops ``score_forward`` / ``score_backward`` (compiled, and the
  Triton ops ``triton_score_forward`` / ``triton_score_backward`` under the same
  schemas), their fake implementations and the Triton ops' autograd (the compiled ops'
  autograd is in C++, ``csrc/score_autograd.cpp``: see ``score``).
* ``selection``: ``select_topk``, ``sample_without_replacement``,
  ``sample_with_replacement``, ``percentile`` (compiled, and ``triton_<name>`` under the
  same schemas) and their fake implementations.

The schemas come from ``fastsel.contract``; the compiled ops are defined in C++
(``csrc/ops.cpp``, from the generated ``score_contract.h``), the Triton ops here.
Importing fastsel imports both modules, so every op exists once fastsel is imported;
the Triton kernels themselves are imported at an op's first call (importing fastsel
never imports triton).
"""

from fastsel.registration import score, selection  # noqa: F401

__all__ = ["score", "selection"]
