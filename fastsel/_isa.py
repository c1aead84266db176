"""Which of the vector ISAs the CPU kernels are compiled for this CPU can run
(fastsel._extension picks the widest at import). Standard library only."""

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
