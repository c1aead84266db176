"""Build checks of the CUDA backend that need no GPU.

* ``test_cuda_source_compiles``: every ``csrc/cuda/*.cu`` file compiles with ``nvcc`` for
  sm_80 and sm_90, with the flags torch's ``CUDAExtension`` would pass. Skipped when
  ``nvcc`` is not on PATH. All (file, arch) compiles run concurrently, once per session.
* ``test_row_scores_header_merge_on_host``: ``csrc/include/fastsel/row_scores.h`` still
  compiles as plain host C++ (the CPU kernels include it), and a small program checks
  the part of it that only the CUDA kernels use: splitting a row over threads as the
  kernels do (thread k of G takes columns k, k + G, ...), merging the per-thread
  ``SoftmaxState`` / ``Top2`` with the same reduction tree as ``csrc/cuda/row_group.cuh``
  and finalizing gives the scores of the one-thread ``push`` path that the CPU tests
  compare with the reference.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CSRC = REPO_ROOT / "csrc"
CUDA_DIR = CSRC / "cuda"
CUDA_SOURCES = sorted(p.name for p in CUDA_DIR.glob("*.cu"))
EXPECTED_CUDA_SOURCES = ("score_kernel.cu", "ops_cuda.cu")
ARCHS = ("sm_80", "sm_90")
CXX_STD = "c++17"  # the standard setup.py compiles the C++ sources with
COMPILE_TIMEOUT_S = 1200

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH (no CUDA toolkit)")

# What torch.utils.cpp_extension passes to nvcc for every CUDAExtension (used if that
# module does not expose them).
_FALLBACK_COMMON_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]


def _nvcc_flags() -> list[str]:
    """nvcc flags of a CUDAExtension build of fastsel._C, without the -arch."""
    torch = pytest.importorskip("torch")
    torch_include = Path(torch.__file__).resolve().parent / "include"
    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS as common
    except ImportError:
        common = _FALLBACK_COMMON_NVCC_FLAGS
    flags = [
        "-c",
        f"-std={CXX_STD}",
        f"-I{torch_include}",
        f"-I{torch_include / 'torch' / 'csrc' / 'api' / 'include'}",
        f"-I{sysconfig.get_paths()['include']}",
        f"-I{CSRC / 'include'}",
        f"-I{CSRC}",
        *common,
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
        "-Xcompiler",
        "-fPIC",
    ]
    # CPU-only torch wheels ship the c10/cuda headers but not the CMake-generated
    # c10/cuda/impl/cuda_cmake_macros.h that c10/cuda/CUDAMacros.h includes. On Linux
    # that file only defines export macros for Windows, so skipping it is harmless.
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return flags


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(cmd, -1, exc.stdout or "",
                                           f"timed out after {COMPILE_TIMEOUT_S} s\n{exc.stderr or ''}")


@pytest.fixture(scope="module")
def nvcc_results(tmp_path_factory) -> dict:
    """{(source, arch): (command, CompletedProcess)} for every CUDA source and arch.

    The compiles are independent, so they run concurrently (one per core): each one is
    dominated by parsing the ATen headers and by ptxas, not by I/O.
    """
    out_dir = tmp_path_factory.mktemp("nvcc")
    flags = _nvcc_flags()
    jobs = {
        (source, arch): [NVCC, *flags, f"-arch={arch}", str(CUDA_DIR / source), "-o",
                         str(out_dir / f"{Path(source).stem}.{arch}.o")]
        for source in CUDA_SOURCES
        for arch in ARCHS
    }
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {key: pool.submit(_run, cmd) for key, cmd in jobs.items()}
        return {key: (jobs[key], future.result()) for key, future in futures.items()}


def test_cuda_sources_present():
    """The glob below must find the backend (an empty parameter list would skip silently)."""
    missing = [name for name in EXPECTED_CUDA_SOURCES if name not in CUDA_SOURCES]
    assert not missing, f"missing CUDA sources under {CUDA_DIR}: {missing}"


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", CUDA_SOURCES)
def test_cuda_source_compiles(nvcc_results, source, arch):
    cmd, proc = nvcc_results[(source, arch)]
    assert proc.returncode == 0, (
        f"nvcc failed with code {proc.returncode} for {source} ({arch}):\n"
        f"$ {shlex.join(cmd)}\n{proc.stderr}{proc.stdout}"
    )


# ---- host-only check of row_scores.h ---------------------------------------------------

_HOST_PROGRAM = r"""
// Emulates the CUDA kernels' per-row reduction on the host with row_scores.h only.
#include "fastsel/row_scores.h"

#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

using fastsel::RowScores;
using fastsel::SoftmaxState;
using fastsel::Top2;

struct Pass {
  SoftmaxState<float> s;
  Top2<float> t;
  void push(float x, int64_t j) { s.push(x); t.push(x, j); }
  void merge(const Pass& o) { s.merge(o.s); t.merge(o.t); }
};

static RowScores<float> finalize(const Pass& p, const std::vector<float>& z, int64_t y) {
  return fastsel::finalize_row(p.s, p.t, y >= 0 ? z[y] : 0.f, y);
}

// The one-thread path (as the CPU's scalar loop).
static Pass one_thread(const std::vector<float>& z) {
  Pass p;
  for (size_t j = 0; j < z.size(); ++j) p.push(z[j], static_cast<int64_t>(j));
  return p;
}

// As csrc/cuda/row_group.cuh: thread k of G pushes columns k, k + G, ...; each warp
// (segments of min(G, 32) lanes) reduces by shuffle-down (lane l merges lane l + offset,
// offsets halving), then the warp results are merged in warp order.
static Pass grouped(const std::vector<float>& z, int G) {
  std::vector<Pass> lanes(G);
  for (size_t j = 0; j < z.size(); ++j) lanes[j % G].push(z[j], static_cast<int64_t>(j));
  const int width = G < 32 ? G : 32;
  for (int w0 = 0; w0 < G; w0 += width) {
    for (int offset = width / 2; offset > 0; offset /= 2) {
      for (int l = 0; l < width - offset; ++l) lanes[w0 + l].merge(lanes[w0 + l + offset]);
    }
  }
  Pass total = lanes[0];
  for (int w0 = width; w0 < G; w0 += width) total.merge(lanes[w0]);
  return total;
}

static bool close(float got, float want) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return std::fabs(got - want) <= 2e-5f * std::fmax(1.f, std::fabs(want));
}

static int failures = 0;

static void check(const std::string& name, const std::vector<float>& z, int64_t y, int G) {
  const Pass ref = one_thread(z);
  const Pass got = grouped(z, G);
  const RowScores<float> a = finalize(got, z, y), b = finalize(ref, z, y);
  bool has_nan = false;
  for (float x : z) has_nan = has_nan || std::isnan(x);
  bool ok = a.valid == b.valid && close(a.loss, b.loss) && close(a.entropy, b.entropy) &&
            close(a.margin, b.margin) && close(a.true_margin, b.true_margin) &&
            close(a.grad_norm, b.grad_norm) && close(a.confidence, b.confidence) &&
            close(a.lse, b.lse);
  // With a NaN the kernels take pred from the first NaN instead; Top2 has no order then.
  if (!has_nan) ok = ok && a.pred == b.pred && got.t.i2 == ref.t.i2 && got.t.v2 == ref.t.v2;
  if (!ok && failures++ < 20) {
    std::printf("MISMATCH %s C=%zu y=%lld G=%d: valid %d/%d loss %g/%g entropy %g/%g margin %g/%g "
                "true_margin %g/%g grad_norm %g/%g confidence %g/%g lse %g/%g pred %lld/%lld "
                "i2 %lld/%lld\n",
                name.c_str(), z.size(), static_cast<long long>(y), G, a.valid, b.valid, a.loss,
                b.loss, a.entropy, b.entropy, a.margin, b.margin, a.true_margin, b.true_margin,
                a.grad_norm, b.grad_norm, a.confidence, b.confidence, a.lse, b.lse,
                static_cast<long long>(a.pred), static_cast<long long>(b.pred),
                static_cast<long long>(got.t.i2), static_cast<long long>(ref.t.i2));
  }
}

int main() {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.f, 3.f);
  std::uniform_int_distribution<int> small_int(-2, 2);
  int rows = 0;
  for (int C : {1, 2, 3, 7, 10, 33, 100, 257, 1000, 5000}) {
    std::uniform_int_distribution<int> col(0, C - 1);
    std::vector<std::pair<std::string, std::vector<float>>> cases;
    std::vector<float> z(C);
    for (auto& x : z) x = normal(rng);
    cases.push_back({"normal", z});
    for (auto& x : z) x = 1e4f + normal(rng);  // large logits: relative sums must not cancel
    cases.push_back({"offset", z});
    for (auto& x : z) x = static_cast<float>(small_int(rng));  // many exact ties
    cases.push_back({"ties", z});
    for (auto& x : z) x = normal(rng);
    for (int k = 0; k < C / 3; ++k) z[col(rng)] = -inf;  // zero-probability classes
    cases.push_back({"some -inf", z});
    cases.push_back({"all -inf", std::vector<float>(C, -inf)});
    for (auto& x : z) x = normal(rng);
    z[col(rng)] = inf;
    cases.push_back({"+inf", z});
    for (auto& x : z) x = normal(rng);
    z[col(rng)] = nan;
    cases.push_back({"nan", z});
    cases.push_back({"constant", std::vector<float>(C, 0.5f)});
    for (const auto& [name, row] : cases) {
      for (int G : {1, 8, 32, 256}) {
        for (int64_t y : {int64_t(-1), int64_t(0), static_cast<int64_t>(col(rng)), int64_t(C - 1)}) {
          check(name, row, y, G);
          ++rows;
        }
      }
    }
  }
  std::printf("%d rows checked, %d mismatches\n", rows, failures);
  return failures == 0 ? 0 : 1;
}
"""


def test_row_scores_header_merge_on_host(tmp_path):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++ / c++ / $CXX)")
    src = tmp_path / "row_scores_merge.cpp"
    exe = tmp_path / "row_scores_merge"
    src.write_text(_HOST_PROGRAM)
    cmd = [cxx, f"-std={CXX_STD}", "-O1", "-Wall", "-Wextra", f"-I{CSRC / 'include'}", str(src),
           "-o", str(exe)]
    built = _run(cmd)
    assert built.returncode == 0, (
        f"row_scores.h no longer compiles as host C++:\n$ {shlex.join(cmd)}\n{built.stderr}"
    )
    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, f"merged per-thread states disagree with one pass:\n{ran.stdout}{ran.stderr}"
