"""Which vector ISA the CPU kernels can be built for on this machine.

Single source for setup.py (which loads this file by path, before fastsel is importable)
and for the tests that rebuild the extension for each ISA. No imports beyond the
standard library, so that setup.py can load it without torch's extension built.
"""

from __future__ import annotations

import platform

# Widest first: the CPU flags (as in /proc/cpuinfo) each build needs.
ISA_FLAGS = {
    "avx512": frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"}),
    "avx2": frozenset({"avx2", "fma", "f16c"}),
    "none": frozenset(),
}


def cpu_flags() -> set:
    """The flags of the first CPU in /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def runnable(isa: str) -> bool:
    """Whether this CPU can run code built for ``isa``."""
    if isa != "none" and platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return ISA_FLAGS[isa] <= cpu_flags()


def widest() -> str:
    """The widest ISA this CPU can run."""
    return next(isa for isa in ISA_FLAGS if runnable(isa))
