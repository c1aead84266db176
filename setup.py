"""Builds fastsel._C, the C++ CPU kernels, with torch's CppExtension.

Build with ``pip install --no-build-isolation -e .`` so the extension is compiled
against the torch already installed (a build-isolated torch could differ).

The vector ISA is decided at build time from the building CPU:
``FASTSEL_CPU_ISA=auto|avx2|none`` (default auto). With AVX2 + FMA the kernels use
``at::vec::Vectorized<float>`` on 256-bit registers; otherwise the same source compiles
against its portable fallback.
"""

import os
import platform
import sys

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _vector_isa() -> str:
    choice = os.environ.get("FASTSEL_CPU_ISA", "auto").lower()
    if choice not in ("auto", "avx2", "none"):
        sys.exit(f"FASTSEL_CPU_ISA must be auto, avx2 or none, got {choice!r}")
    if choice != "auto":
        return choice
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "none"
    flags = _cpu_flags()
    return "avx2" if {"avx2", "fma", "f16c"} <= flags else "none"


isa = _vector_isa()
cxx_flags = ["-O3", "-std=c++17", "-fvisibility=hidden"]
if isa == "avx2":
    cxx_flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DFASTSEL_ISA_AVX2"]
cxx_flags.append(f'-DFASTSEL_BUILD_ISA="{isa}"')
if sys.platform.startswith("linux"):
    cxx_flags += ["-fopenmp"]

print(f"fastsel: building the CPU extension for ISA '{isa}'", file=sys.stderr)

sources = [
    "csrc/ops.cpp",
    "csrc/cpu/score_kernel.cpp",
    "csrc/cpu/mms_kernel.cpp",
]

setup(
    ext_modules=[
        CppExtension(
            name="fastsel._C",
            sources=sources,
            include_dirs=[os.path.join(HERE, "csrc", "include")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
