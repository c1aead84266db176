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
* ``test_selection_keys_header_matches_reference_on_host``: ``csrc/include/fastsel/
  selection_keys.h`` (the per-element math of the selection ops, shared by the CPU and
  CUDA kernels) compiled as host C++ with ``-ffp-contract=off``: Philox4x32-10 passes
  Random123's known-answer vectors, and Philox, the uniforms, ``neg_log_unit``, the rank
  keys, ``race_scale`` (of single maxima, and of the max of each race vector), the race
  keys (importance vectors with NaN, mixed magnitudes, all tiny down to 1e-45, all huge up
  to FLT_MAX), the draw targets and the integer weights of sampling with replacement agree
  bit for bit with ``fastsel/reference.py`` on a few thousand inputs each.
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
EXPECTED_CUDA_SOURCES = ("score_kernel.cu", "ops_cuda.cu", "select_kernel.cu")
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


# ---- host check of selection_keys.h against fastsel/reference.py ------------------------

_SELECTION_KEYS_PROGRAM = r"""
// Prints the per-element math of selection_keys.h (compiled as plain host C++, as the CPU
// kernels use it) for a few thousand inputs; the Python side recomputes every line with
// fastsel/reference.py and compares bits. Also checks Philox4x32-10 against the
// known-answer vectors of Random123 (kat_vectors), exiting with 1 on a mismatch.
// All numbers are printed in hex; floats as their bit patterns.
#include "fastsel/selection_keys.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <utility>
#include <vector>

using namespace fastsel;

static float f32(uint32_t bits) { return bits_to_float(bits); }
static uint64_t f64_bits(double x) {
  union { double d; uint64_t u; } v{x};
  return v.u;
}
static double f64(uint64_t bits) {
  union { uint64_t u; double d; } v{bits};
  return v.d;
}

static std::mt19937_64 rng(20240611);
static uint32_t rand32() { return static_cast<uint32_t>(rng()); }
// A positive normal float32 with a uniformly random exponent in [lo, hi] (biased).
static uint32_t rand_positive_bits(uint32_t lo, uint32_t hi) {
  const uint32_t exponent = lo + static_cast<uint32_t>(rng() % (hi - lo + 1));
  return (exponent << 23) | (rand32() & 0x007FFFFFu);
}

static const uint32_t kSpecialFloats[] = {
    0x00000000u, 0x80000000u,              // +0, -0
    0x3F800000u, 0xBF800000u,              // 1, -1
    0x7F800000u, 0xFF800000u,              // +inf, -inf
    0x7FC00000u, 0xFFC00000u, 0x7F800001u, 0xFFFFFFFFu,  // NaNs, both signs, payloads
    0x00000001u, 0x80000001u, 0x007FFFFFu, 0x00800000u,  // subnormals, smallest normal
    0x7F7FFFFFu, 0xFF7FFFFFu,              // +-FLT_MAX
    0x3F000000u, 0x40000000u, 0x0DA24260u, 0x7149F2CAu,  // 0.5, 2, 1e-30, 1e30
};

static void print_philox(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  const Philox4x32 r = philox4x32_10(c0, c1, c2, c3, k0, k1);
  std::printf("philox %x %x %x %x %x %x %x %x %x %x\n", c0, c1, c2, c3, k0, k1, r.x[0], r.x[1], r.x[2], r.x[3]);
}

// Checks the header against the known answers and prints the three lines, so that the
// Python side holds the reference's Philox to them as well.
static int kat_vectors() {
  struct Kat { uint32_t c[4], k[2], out[4]; };
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, {0xffffffffu, 0xffffffffu},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, {0xa4093822u, 0x299f31d0u},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  int bad = 0;
  for (const Kat& t : kats) {
    const Philox4x32 r = philox4x32_10(t.c[0], t.c[1], t.c[2], t.c[3], t.k[0], t.k[1]);
    for (int w = 0; w < 4; ++w) {
      if (r.x[w] != t.out[w]) {
        std::fprintf(stderr,
                     "Philox KAT mismatch: ctr %08x %08x %08x %08x key %08x %08x word %d: %08x, "
                     "expected %08x\n",
                     t.c[0], t.c[1], t.c[2], t.c[3], t.k[0], t.k[1], w, r.x[w], t.out[w]);
        ++bad;
      }
    }
    print_philox(t.c[0], t.c[1], t.c[2], t.c[3], t.k[0], t.k[1]);
  }
  return bad;
}

int main() {
  const int kat_failures = kat_vectors();
  for (int i = 0; i < 200; ++i) print_philox(rand32(), rand32(), rand32(), rand32(), rand32(), rand32());

  // Uniforms from one word, and -log(u) of the open-interval ones.
  std::vector<uint32_t> words = {0u,          1u,          0x1FFu,      0x200u,      0xFFu,
                                 0x100u,      0x7FFFFFFFu, 0x80000000u, 0xFFFFFE00u, 0xFFFFFFFFu};
  for (int i = 0; i < 2000; ++i) words.push_back(rand32());
  for (uint32_t w : words) {
    std::printf("unit %x %x %x\n", w, float_to_bits(open_unit_float(w)), float_to_bits(unit_float(w)));
  }
  std::vector<uint32_t> units;  // bit patterns of u in (0, 1)
  for (uint32_t w : words) units.push_back(float_to_bits(open_unit_float(w)));
  for (int i = 0; i < 1000; ++i) units.push_back(rand_positive_bits(1, 126));  // [2^-126, 1)
  for (uint32_t e = 100; e <= 126; e += 2) {  // mantissas around the sqrt(2) split of m
    for (uint32_t m = 0x3504F0u; m <= 0x3504F6u; ++m) units.push_back((e << 23) | m);
  }
  for (uint32_t u : units) std::printf("neglog %x %x\n", u, float_to_bits(neg_log_unit(f32(u))));

  // Rank keys: every kind of float32 and float64 bit pattern, both directions.
  std::vector<uint32_t> scores(std::begin(kSpecialFloats), std::end(kSpecialFloats));
  for (int i = 0; i < 3000; ++i) scores.push_back(rand32());
  for (uint32_t x : scores) {
    for (int largest = 0; largest < 2; ++largest) {
      std::printf("rank %x %d %x\n", x, largest, rank_key_bits(f32(x), largest != 0));
    }
  }
  std::vector<uint64_t> scores64;
  for (uint32_t x : kSpecialFloats) scores64.push_back(f64_bits(static_cast<double>(f32(x))));
  scores64.push_back(0xFFF8000000000001ull);  // a negative NaN with a payload
  for (int i = 0; i < 1000; ++i) scores64.push_back(rng());
  for (uint64_t x : scores64) {
    for (int largest = 0; largest < 2; ++largest) {
      std::printf("rank64 %llx %d %llx\n", static_cast<unsigned long long>(x), largest,
                  static_cast<unsigned long long>(rank_key_bits64(f64(x), largest != 0)));
    }
  }

  // The race scale of single maxima: normal, subnormal, powers of two (normal and
  // subnormal), zeros, negatives and NaN (+inf is outside the domain: the public API
  // rejects infinite importance).
  std::vector<uint32_t> maxima = {0x00000000u, 0x80000000u, 0x00000001u, 0x00000002u, 0x00000003u,
                                  0x007FFFFFu, 0x00800000u, 0x00800001u, 0x3F000000u, 0x3F7FFFFFu,
                                  0x3F800000u, 0x7F7FFFFFu, 0x7F000000u, 0xBF800000u, 0xFF7FFFFFu,
                                  0x80000001u, 0x7FC00000u, 0xFFC00000u, 0x7F800001u};
  for (uint32_t e = 1; e <= 254; ++e) maxima.push_back(e << 23);           // 2^(e - 127)
  for (uint32_t b = 0; b < 23; ++b) maxima.push_back(1u << b);             // 2^(b - 149)
  for (uint32_t e = 1; e <= 254; ++e) maxima.push_back((e << 23) | 0x007FFFFFu);  // just below
  for (int i = 0; i < 1500; ++i) maxima.push_back(rand_positive_bits(1, 254));
  for (int i = 0; i < 500; ++i) maxima.push_back((rand32() & 0x007FFFFFu) | 1u);  // subnormal
  for (int i = 0; i < 200; ++i) maxima.push_back(rand_positive_bits(1, 254) | 0x80000000u);
  for (uint32_t m : maxima) {
    const RaceScale scale = race_scale(f32(m));
    std::printf("rscale %x %x %x\n", m, float_to_bits(scale.a), float_to_bits(scale.b));
  }

  // Race keys of whole importance vectors (item i uses Philox element i), scaled by
  // race_scale of the vector's maximum (torch.max's: NaN if any entry is NaN).
  const uint64_t kMaxSeed = (uint64_t(1) << 63) - 1;
  const uint64_t seeds_counters[][2] = {{0, 0}, {1, 0}, {0, 1}, {kMaxSeed, kMaxSeed},
                                        {0x243f6a8885a308d3ull, 0x13198a2e03707344ull},
                                        {12345, uint64_t(1) << 32}, {(uint64_t(1) << 32) + 7, 5}};
  const uint32_t kTiny = 0x000AE398u;  // 1e-39f (subnormal)
  const uint32_t kHuge = 0x7F61B1E6u;  // 3e38f
  for (const auto& sc : seeds_counters) {
    std::vector<std::pair<const char*, std::vector<uint32_t>>> cases;
    std::vector<uint32_t> w(std::begin(kSpecialFloats), std::end(kSpecialFloats));
    for (int i = 0; i < 500; ++i) w.push_back(i % 5 == 0 ? 0x3F800000u : rand_positive_bits(1, 254));
    cases.push_back({"specials", w});  // NaN inside: unit scale
    w.clear();
    for (int i = 0; i < 300; ++i) {  // every exponent, no NaN/inf: max somewhere near FLT_MAX
      w.push_back(i % 10 == 0 ? 0u : i % 7 == 0 ? 0x80000000u : rand_positive_bits(1, 254));
    }
    cases.push_back({"mixed", w});
    w.clear();
    for (int i = 0; i < 300; ++i) {  // 1e-45 .. 1e2, and zeros
      const uint64_t kind = rng() % 6;
      w.push_back(kind == 0 ? 0x00000001u : kind == 1 ? 0u : kind == 2 ? kTiny
                  : kind == 3 ? (rand32() & 0x007FFFFFu) | 1u : rand_positive_bits(1, 133));
    }
    cases.push_back({"mixed", w});
    w.clear();
    for (int i = 0; i < 200; ++i) w.push_back(i % 3 == 0 ? kTiny : i % 3 == 1 ? 0x00000001u : 0u);
    cases.push_back({"tiny", w});  // 1e-39 and 1e-45: E / w alone overflows
    w.assign(150, 0x00000001u);
    cases.push_back({"tiny", w});  // all 1e-45
    w.assign(150, kTiny);
    w[17] = 0u;
    cases.push_back({"tiny", w});  // all 1e-39 but one zero
    w.clear();
    for (int i = 0; i < 200; ++i) w.push_back((rand32() & 0x007FFFFFu) | 1u);
    cases.push_back({"tiny", w});  // random subnormals
    w.clear();
    for (int i = 0; i < 200; ++i) {
      w.push_back(i % 4 == 0 ? kHuge : i % 4 == 1 ? 0x7F7FFFFFu : i % 4 == 2 ? rand_positive_bits(250, 254) : 0u);
    }
    cases.push_back({"huge", w});  // 3e38, FLT_MAX: E / w alone underflows
    w.assign(150, kHuge);
    cases.push_back({"huge", w});  // all 3e38
    for (auto& [name, v] : cases) {
      std::shuffle(v.begin(), v.end(), rng);
      float max_w = f32(v[0]);
      for (uint32_t b : v) {
        const float x = f32(b);
        if (std::isnan(x) || std::isnan(max_w)) {
          max_w = std::nanf("");
        } else if (x > max_w) {
          max_w = x;
        }
      }
      const RaceScale scale = race_scale(max_w);
      std::printf("race %s %llx %llx %x %x ", name, static_cast<unsigned long long>(sc[0]),
                  static_cast<unsigned long long>(sc[1]), float_to_bits(scale.a), float_to_bits(scale.b));
      for (size_t i = 0; i < v.size(); ++i) std::printf("%s%x", i ? "," : "", v[i]);
      std::printf(" ");
      for (size_t i = 0; i < v.size(); ++i) {
        std::printf("%s%x", i ? "," : "", race_key_bits(f32(v[i]), scale, sc[0], sc[1], i));
      }
      std::printf("\n");
    }
  }

  // Draw targets, including element indices beyond 32 bits.
  const int64_t totals[] = {1, 2, 3, 1000, 123456789, (int64_t(1) << 52) - 1, int64_t(1) << 52,
                            (int64_t(1) << 53) - 1};
  std::vector<uint64_t> draws;
  for (uint64_t j = 0; j < 100; ++j) draws.push_back(j);
  for (uint64_t j : {0xFFFFFFFFull, 0x100000000ull, (1ull << 40) + 3, 1ull << 62}) draws.push_back(j);
  for (const auto& sc : seeds_counters) {
    for (int64_t total : totals) {
      for (uint64_t j : draws) {
        std::printf("target %llx %llx %llx %llx %llx\n", static_cast<unsigned long long>(sc[0]),
                    static_cast<unsigned long long>(sc[1]), static_cast<unsigned long long>(total),
                    static_cast<unsigned long long>(j),
                    static_cast<unsigned long long>(replacement_target(sc[0], sc[1], j, total)));
      }
    }
  }

  // Integer weights of sampling with replacement: scale from the largest importance as
  // reference.replacement_weights (and the CPU/CUDA kernels) do, then quantized_importance.
  std::vector<std::vector<uint32_t>> vectors;
  for (int n : {1, 2, 7, 100, 1000, 4097}) {
    std::vector<uint32_t> w;
    for (int i = 0; i < n; ++i) {
      const uint64_t kind = rng() % 10;  // 10% zeros, 10% finite negatives, else 2^-37 .. 2^14
      w.push_back(kind == 0   ? 0u
                  : kind == 1 ? (rand_positive_bits(1, 254) | 0x80000000u)
                              : rand_positive_bits(90, 140));
    }
    vectors.push_back(w);
  }
  vectors.push_back(std::vector<uint32_t>(33, 0x3F800000u));                    // all equal
  vectors.push_back({0x40000000u, 0x3F800000u, 0x00000001u, 0x3F000000u});      // max a power of two
  vectors.push_back({0x00000001u, 0x00000003u, 0x007FFFFFu, 0x00000000u});      // subnormal max
  vectors.push_back({0x7F7FFFFFu, 0x7F000000u, 0x3F800000u, 0x00800000u});      // FLT_MAX
  vectors.push_back({0x00000000u, 0x80000000u, 0x00000000u});                   // all zero
  for (const auto& w : vectors) {
    float max_w = f32(w[0]);
    for (uint32_t b : w) max_w = std::max(max_w, f32(b));
    int bit_length = 0;
    for (uint64_t rest = w.size(); rest != 0; rest >>= 1) ++bit_length;
    int exponent = 0;
    std::frexp(max_w, &exponent);
    const double scale = std::ldexp(1.0, (52 - bit_length) - exponent);
    std::printf("quant ");
    for (size_t i = 0; i < w.size(); ++i) std::printf("%s%x", i ? "," : "", w[i]);
    std::printf(" ");
    for (size_t i = 0; i < w.size(); ++i) {
      std::printf("%s%llx", i ? "," : "",
                  static_cast<unsigned long long>(quantized_importance(f32(w[i]), scale)));
    }
    std::printf("\n");
  }
  return kat_failures == 0 ? 0 : 1;
}
"""


def _signed(bits: int, width: int) -> int:
    """The two's complement value of an unsigned ``width``-bit pattern."""
    return bits - (1 << width) if bits >= 1 << (width - 1) else bits


def _floats32(bits: list[int]):
    """float32 tensor with the given bit patterns."""
    import torch

    return torch.tensor([_signed(b, 32) for b in bits], dtype=torch.int32).view(torch.float32)


def _floats64(bits: list[int]):
    """float64 tensor with the given bit patterns."""
    import torch

    return torch.tensor([_signed(b, 64) for b in bits], dtype=torch.int64).view(torch.float64)


def _bits32(x) -> list[int]:
    """Bit patterns (unsigned) of a float32 tensor."""
    import torch

    return [b & 0xFFFFFFFF for b in x.view(torch.int32).tolist()]


class _Comparison:
    """Counts and examples of disagreements between the header (host C++) and the reference."""

    def __init__(self):
        self.count = 0
        self.examples: list[str] = []
        self.checked: dict[str, int] = {}

    def compare(self, what: str, inputs: list, got: list[int], want: list[int], context: str = "") -> None:
        """Element-wise comparison of the header's values ``got`` for ``inputs`` with the
        reference's ``want``; ``what`` names the function (counts are kept per function)."""
        self.checked[what] = self.checked.get(what, 0) + len(got)
        assert len(got) == len(want), f"{what}: {len(got)} values from C++, {len(want)} from the reference"
        for x, g, w in zip(inputs, got, want):
            if g != w:
                self.count += 1
                if len(self.examples) < 20:
                    x = f"{x:#x}" if isinstance(x, int) else x
                    self.examples.append(f"{what}{context} of {x}: header {g:#x}, reference {w:#x}")

    def fail(self, message: str) -> None:
        """A failed check that is not a header/reference comparison."""
        self.count += 1
        if len(self.examples) < 20:
            self.examples.append(message)


def _compare_with_reference(output: str) -> _Comparison:
    import torch

    from fastsel import reference as ref

    lines: dict[str, list[list[str]]] = {}
    for line in output.splitlines():
        tag, *fields = line.split()
        lines.setdefault(tag, []).append(fields)
    bad = _Comparison()

    # Philox4x32-10, word by word (the reference's 16-bit-split multiply in int64).
    for f in lines["philox"]:
        c0, c1, c2, c3, k0, k1, *out = (int(x, 16) for x in f)
        words = ref.philox4x32_10(*(torch.tensor([c]) for c in (c0, c1, c2, c3)), k0, k1)
        bad.compare("philox4x32_10", [f"ctr ({c0:#x}, {c1:#x}, {c2:#x}, {c3:#x}) key ({k0:#x}, {k1:#x})"] * 4,
                    out, [int(w) for w in words])

    rows = [[int(x, 16) for x in f] for f in lines["unit"]]
    words = torch.tensor([r[0] for r in rows])
    bad.compare("open_unit_float", [r[0] for r in rows], [r[1] for r in rows],
                _bits32(ref.open_unit_float(words)))
    bad.compare("unit_float", [r[0] for r in rows], [r[2] for r in rows], _bits32(ref.unit_float(words)))

    rows = [[int(x, 16) for x in f] for f in lines["neglog"]]
    bad.compare("neg_log_unit", [r[0] for r in rows], [r[1] for r in rows],
                _bits32(ref.neg_log_unit(_floats32([r[0] for r in rows]))))

    for largest in (False, True):
        rows = [[int(x, 16) for x in f] for f in lines["rank"] if int(f[1]) == largest]
        keys = ref.rank_key_bits(_floats32([r[0] for r in rows]), largest)
        bad.compare("rank_key_bits", [r[0] for r in rows], [r[2] for r in rows], keys.tolist(),
                    f"(largest={largest})")
        # float64: the header's uint64 key with its top bit flipped, read as a signed int64,
        # is the reference's key (the same order in int64 arithmetic).
        rows = [[int(x, 16) for x in f] for f in lines["rank64"] if int(f[1]) == largest]
        keys = ref.rank_key_bits(_floats64([r[0] for r in rows]), largest)
        flipped = [_signed(r[2] ^ (1 << 63), 64) for r in rows]
        bad.compare("rank_key_bits64", [r[0] for r in rows], flipped, keys.tolist(), f"(largest={largest})")

    rows = [[int(x, 16) for x in f] for f in lines["rscale"]]
    for m, a, b in rows:
        want = _bits32(ref.race_scale(_floats32([m])))
        bad.compare("race_scale", [f"max bits {m:#x}"] * 2, [a, b], want)

    kinds: dict[str, int] = {}
    for f in lines["race"]:
        kind, seed, counter = f[0], int(f[1], 16), int(f[2], 16)
        kinds[kind] = kinds.get(kind, 0) + 1
        scale = [int(f[3], 16), int(f[4], 16)]
        w = [int(x, 16) for x in f[5].split(",")]
        got = [int(x, 16) for x in f[6].split(",")]
        w32 = _floats32(w)
        context = f"({kind}, seed={seed:#x}, counter={counter:#x})"
        bad.compare("race_scale", [f"max of {kind} importance"] * 2, scale, _bits32(ref.race_scale(w32)), context)
        want = ref.race_key_bits(w32, seed, counter).tolist()
        bad.compare("race_key_bits", [f"importance bits {b:#x} at index {i}" for i, b in enumerate(w)],
                    got, want, context)
        if kind in ("tiny", "huge"):
            # The cases the scale is for: unscaled, E / w overflows to inf (tiny) or
            # underflows towards 0 (huge); scaled, every positive importance of these
            # vectors (all within a factor 2^23 of their max) races with a finite, non-zero key.
            if scale == [0x3F800000, 0x3F800000]:
                bad.fail(f"race_scale of the max of a {kind} importance vector is 1 {context}")
            degenerate = [i for i, (b, k) in enumerate(zip(w, got)) if b != 0 and k in (0, 0x7F800000)]
            if degenerate:
                bad.fail(f"{len(degenerate)} positive {kind} importances got key 0 or inf {context}, "
                         f"e.g. index {degenerate[0]}: importance bits {w[degenerate[0]]:#x}")
    for kind in ("specials", "mixed", "tiny", "huge"):
        if not kinds.get(kind):
            bad.fail(f"no {kind} race vector was checked")

    groups: dict[tuple[int, int, int], list[tuple[int, int]]] = {}
    for f in lines["target"]:
        seed, counter, total, draw, t = (int(x, 16) for x in f)
        groups.setdefault((seed, counter, total), []).append((draw, t))
    for (seed, counter, total), pairs in groups.items():
        # reference.sample_with_replacement_reference's draw targets, for these draws.
        r = ref.philox_block(seed, counter, torch.tensor([d for d, _ in pairs]))
        total_t = torch.tensor(total)
        t = (ref.unit_double(r[0], r[1]) * total_t.to(torch.float64)).to(torch.int64)
        t = torch.minimum(t, total_t - 1)
        bad.compare("replacement_target", [f"draw {d:#x}" for d, _ in pairs], [t_ for _, t_ in pairs],
                    t.tolist(), f"(seed={seed:#x}, counter={counter:#x}, total={total})")

    for f in lines["quant"]:
        w = [int(x, 16) for x in f[0].split(",")]
        got = [int(x, 16) for x in f[1].split(",")]
        want = ref.replacement_weights(_floats32(w)).tolist()
        bad.compare("quantized_importance", [f"importance bits {b:#x}" for b in w], got, want, f"(N={len(w)})")
    return bad


def test_selection_keys_header_matches_reference_on_host(tmp_path):
    """selection_keys.h compiled as host C++ (-ffp-contract=off, as the CPU kernels): Philox
    against Random123's known answers, and the keys, uniforms, -log, draw targets and
    integer weights bit for bit against fastsel/reference.py. The CUDA kernels run the same
    header with __fmul_rn & co., which round as these host operations."""
    pytest.importorskip("torch")
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++ / c++ / $CXX)")
    src = tmp_path / "selection_keys_dump.cpp"
    exe = tmp_path / "selection_keys_dump"
    src.write_text(_SELECTION_KEYS_PROGRAM)
    cmd = [cxx, f"-std={CXX_STD}", "-O2", "-ffp-contract=off", "-Wall", "-Wextra",
           f"-I{CSRC / 'include'}", str(src), "-o", str(exe)]
    built = _run(cmd)
    assert built.returncode == 0, (
        f"selection_keys.h does not compile as host C++:\n$ {shlex.join(cmd)}\n{built.stderr}"
    )
    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, f"Philox4x32-10 fails Random123's known-answer test:\n{ran.stderr}"
    bad = _compare_with_reference(ran.stdout)
    assert bad.count == 0, (
        f"{bad.count} values of selection_keys.h differ from fastsel/reference.py:\n"
        + "\n".join(bad.examples)
    )
    for what, count in bad.checked.items():
        assert count >= 500, f"only {count} values of {what} were compared"
