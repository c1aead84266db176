"""Builds fastsel._C: the C++ CPU kernels, plus the CUDA kernels when they can be built.

Build with ``pip install --no-build-isolation -e .`` so the extension is compiled
against the torch already installed (a build-isolated torch could differ).

The vector ISA is decided at build time from the building CPU:
``FASTSEL_CPU_ISA=auto|avx512|avx2|none`` (default auto: the widest the CPU has). The
kernels use ``at::vec::Vectorized<float>`` on 512-bit registers with AVX-512 (F, BW, VL,
DQ), on 256-bit registers with AVX2 + FMA, and otherwise the same source compiles against
ATen's portable fallback. The extension runs only on CPUs with the ISA it was built for.

CUDA: ``FASTSEL_BUILD_CUDA=auto|0|1`` (default auto). The CUDA kernels (csrc/cuda) are
compiled only when torch is a CUDA build and a CUDA toolkit of the same major version is
found; no GPU is needed to build. ``1`` fails loudly when that is not the case.
"""

import importlib.util
import os
import re
import subprocess
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_isa_module():
    # fastsel/_isa.py by path: the package itself cannot be imported before it is built.
    spec = importlib.util.spec_from_file_location("fastsel_isa", os.path.join(HERE, "fastsel", "_isa.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _vector_isa() -> str:
    choice = os.environ.get("FASTSEL_CPU_ISA", "auto").lower()
    isa = _load_isa_module()
    if choice != "auto" and choice not in isa.ISA_FLAGS:
        sys.exit(f"FASTSEL_CPU_ISA must be auto, {', '.join(isa.ISA_FLAGS)}, got {choice!r}")
    return isa.widest() if choice == "auto" else choice


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


isa = _vector_isa()
with_cuda = _build_cuda()
# -ffp-contract=off: the selection keys (selection_keys.h) must round exactly like the
# other backends, so no multiply-add may be fused behind the code's back.
cxx_flags = ["-O3", "-std=c++17", "-fvisibility=hidden", "-ffp-contract=off"]
if isa == "avx2":
    cxx_flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"]
elif isa == "avx512":
    cxx_flags += ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                  "-DCPU_CAPABILITY_AVX512"]
cxx_flags.append(f'-DFASTSEL_BUILD_ISA="{isa}"')
if sys.platform.startswith("linux"):
    cxx_flags += ["-fopenmp"]

print(f"fastsel: building the CPU kernels for ISA '{isa}', CUDA: {with_cuda}", file=sys.stderr)

sources = [
    "csrc/ops.cpp",
    "csrc/score_autograd.cpp",
    "csrc/cpu/score_kernel.cpp",
    "csrc/cpu/select_kernel.cpp",
]
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

setup(
    ext_modules=[
        extension(
            name="fastsel._C",
            sources=sources,
            include_dirs=[os.path.join(HERE, "csrc", "include")],
            extra_compile_args=compile_args,
            extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
