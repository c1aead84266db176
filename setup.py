"""Builds fastsel._C: the C++ CPU kernels, plus the CUDA kernels when they can be built.

Build with ``pip install --no-build-isolation -e .`` so the extension is compiled
against the torch already installed (a build-isolated torch could differ).

The CPU kernels are compiled once per vector ISA into the one extension (csrc/cpu/isa/):
AVX-512 (F, BW, VL, DQ; ``at::vec::Vectorized<float>`` on 512-bit registers), AVX2 + FMA
(256-bit) and ATen's portable fallback, on x86-64; the portable code alone elsewhere.
At import fastsel picks the widest the running CPU supports (``FASTSEL_CPU_ISA=avx2|none``
forces a lower one), so one build runs on every x86-64 CPU. ``FASTSEL_BUILD_ISAS=none``
compiles the portable code alone (a faster build).

CUDA: ``FASTSEL_BUILD_CUDA=auto|0|1`` (default auto). The CUDA kernels (csrc/cuda) are
compiled only when torch is a CUDA build and a CUDA toolkit of the same major version is
found; no GPU is needed to build. ``1`` fails loudly when that is not the case.
"""

import os
import platform
import re
import runpy
import subprocess
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


# The C++ side of the scoring op's contract, generated from fastsel/contract.py, its one
# definition, so that a changed contract is built as it is.
runpy.run_path(os.path.join(HERE, "csrc", "write_contract_header.py"))["write_header"]()


def _isas() -> list:
    """The ISAs to compile, portable first (see _IsaBuild: the link order)."""
    choice = os.environ.get("FASTSEL_BUILD_ISAS", "auto").lower()
    if choice not in ("auto", "none"):
        sys.exit(f"FASTSEL_BUILD_ISAS must be auto or none, got {choice!r}")
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return ["portable", "avx2", "avx512"] if x86 and choice == "auto" else ["portable"]


ISA_FLAGS = {  # -m flags of each ISA's translation units (csrc/cpu/isa/*_<isa>.cpp)
    "portable": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
}
KERNELS = ["score_kernel", "select_kernel"]


class _IsaBuild(BuildExtension):
    """Compiles each ISA's kernel sources with that ISA's flags (the extension's own sources
    get none), then links them into the one extension. Objects are linked after the
    extension's own and the portable ones first, so that an inline function of a torch
    header compiled into several ISAs' objects keeps the least demanding copy
    (tests/test_isa_dispatch.py checks the binary for vector code outside the ISA paths)."""

    def build_extension(self, ext):
        if getattr(ext, "isa_sources", None):
            objects = []
            for isa, sources in ext.isa_sources:
                args = ext.extra_compile_args
                args = ({k: list(v) + (ISA_FLAGS[isa] if k == "cxx" else []) for k, v in args.items()}
                        if isinstance(args, dict) else list(args) + ISA_FLAGS[isa])
                objects += self.compiler.compile(sources, output_dir=self.build_temp, macros=ext.define_macros,
                                                 include_dirs=ext.include_dirs, debug=self.debug,
                                                 extra_postargs=args, depends=ext.depends)
            ext.extra_objects = objects + list(ext.extra_objects or [])
        super().build_extension(ext)


def _build_cuda() -> bool:
    choice = os.environ.get("FASTSEL_BUILD_CUDA", "auto").lower()
    if choice not in ("auto", "0", "1"):
        sys.exit(f"FASTSEL_BUILD_CUDA must be auto, 0 or 1, got {choice!r}")
    if choice == "0":
        return False
    reasons = []
    if torch.version.cuda is None:  # a CPU (or ROCm) build of torch; decided without a GPU
        reasons.append("torch is not a CUDA build")
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if not nvcc or not os.path.exists(nvcc):
        reasons.append("no CUDA toolkit found (set CUDA_HOME)")
    elif torch.version.cuda:  # BuildExtension refuses a major-version mismatch
        found = re.search(r"release (\d+)\.", subprocess.check_output([nvcc, "--version"], text=True))
        if found and found.group(1) != torch.version.cuda.split(".")[0]:
            reasons.append(f"nvcc is CUDA {found.group(1)} but torch was built with {torch.version.cuda}")
    if reasons:
        if choice == "1":
            sys.exit("FASTSEL_BUILD_CUDA=1 but " + "; ".join(reasons))
        print("fastsel: building without CUDA: " + "; ".join(reasons), file=sys.stderr)
        return False
    return True


isas = _isas()
with_cuda = _build_cuda()
# -ffp-contract=off: the selection keys (selection_keys.h) must round exactly like the
# other backends, so no multiply-add may be fused behind the code's back.
cxx_flags = ["-O3", "-std=c++17", "-fvisibility=hidden", "-ffp-contract=off"]
cxx_flags += [f"-DFASTSEL_WITH_{isa.upper()}" for isa in isas if isa != "portable"]
if sys.platform.startswith("linux"):
    cxx_flags += ["-fopenmp"]

print(f"fastsel: building the CPU kernels for {', '.join(isas)}, CUDA: {with_cuda}", file=sys.stderr)

sources = [
    "csrc/ops.cpp",
    "csrc/score_autograd.cpp",
    "csrc/cpu/dispatch.cpp",
]
isa_sources = [(isa, [f"csrc/cpu/isa/{kernel}_{isa}.cpp" for kernel in KERNELS]) for isa in isas]
extension = CppExtension
compile_args = {"cxx": cxx_flags}
if with_cuda:
    sources += ["csrc/cuda/score_kernel.cu", "csrc/cuda/ops_cuda.cu", "csrc/cuda/select_kernel.cu"]
    extension = CUDAExtension
    compile_args = {
        "cxx": cxx_flags + ["-DFASTSEL_WITH_CUDA"],
        # No fast-math: the tests hold the kernels to float32 accuracy.
        "nvcc": ["-O3", "-std=c++17", "-DFASTSEL_WITH_CUDA"],
    }
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"  # no GPU to ask: Ampere and Hopper

ext = extension(
    name="fastsel._C",
    sources=sources,
    include_dirs=[os.path.join(HERE, "csrc", "include"), os.path.join(HERE, "csrc")],
    extra_compile_args=compile_args,
    extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [],
    depends=[os.path.join(root, f) for root, _, files in os.walk(os.path.join(HERE, "csrc"))
             for f in files if f.endswith((".h", ".cuh", ".cpp"))],
)
ext.isa_sources = isa_sources
setup(ext_modules=[ext], cmdclass={"build_ext": _IsaBuild.with_options(use_ninja=True)})
