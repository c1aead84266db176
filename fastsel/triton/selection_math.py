"""Per-element math of the selection ops as ``@triton.jit`` device helpers.

Mirrors ``csrc/include/fastsel/selection_keys.h`` function for function and operation for
operation (and therefore ``fastsel.reference``, section "selection ops"), so that one seed
selects bit-identical indices on the torch, C++ CPU, CUDA and Triton backends. Read the
header for the design; this module only records what it takes to get the same bits out of
Triton:

* Integers: the Philox state and keys are ``uint32`` tensors. Triton's ``*`` and ``+`` on
  ``uint32`` wrap modulo 2^32 (the low half of the product) and ``tl.umulhi`` gives the
  high half, which is ``mulhilo32`` of the header. ``>>`` on an unsigned tensor is a
  logical shift. Literals >= 2^31 (the Philox constants, masks) are typed ``uint32`` by
  Triton, so no operand is promoted to a signed or wider type by accident.
* Seeds and counters (< 2^63) are passed to the kernels as their two uint32 halves
  (``split_words``), in parameters annotated ``tl.uint32`` and excluded from
  specialization: one compiled variant for every seed, and no 64-bit shift of a value
  whose width depends on how it was typed (see ``split_words``).
* Floating point: every float operation is a single IEEE round-to-nearest operation, as
  in the header. Two things would break that on a GPU and are excluded:
    - contraction of ``a * b + c`` into an FMA (one rounding instead of two): Triton fuses
      by default, so **every kernel calling these helpers must be launched with
      ``enable_fp_fusion=False``** (it turns off LLVM's contraction and passes
      ``--fmad=false`` to ptxas; the PTX then holds ``mul.rn.f32`` / ``add.rn.f32``, which
      ptxas never contracts), the counterpart of ``-ffp-contract=off`` on the CPU and
      ``__fmul_rn`` / ``__fadd_rn`` in CUDA. ``EXACT_FP_LAUNCH`` holds that option;
      tests/triton/test_triton_select.py compiles the kernels to PTX to check it;
    - Triton's ``/`` on float32, which is the approximate ``div.full.f32`` (2 ulp):
      divisions use ``tl.math.div_rn`` (``div.rn.f32``, correctly rounded), as
      ``FASTSEL_DIV`` / ``__fdiv_rn``.
  Float literals are rounded to float32 from the Python double; for every constant used
  here that gives the same bits as the header's ``f``-suffixed decimal literal (checked
  once against a C++ compiler: 0x3FB504F3, 0x3DE38E39, 0x3E124925, 0x3E4CCCCD, 0x3EAAAAAB,
  0x3F317218, 0x33800000).
  No libdevice function is used (the interpreter has none, and the library log differs
  between backends in the last ulp: that is why ``neg_log_unit`` exists).
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastsel.triton._launch import interpreting

# Module-level constants reach @triton.jit code only as tl.constexpr instances.

# Philox4x32-10 round multipliers and Weyl key increments (Salmon et al. 2011, Random123).
PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)

# 2^-24 and 2^-53: the unit of the float32 / float64 uniforms (exact powers of two).
TWO_POW_M24 = tl.constexpr(5.9604644775390625e-8)
TWO_POW_M53 = tl.constexpr(1.1102230246251565e-16)

# Rank of "no key": all ones, after every real key (NaN score, zero importance).
KEY_LAST = tl.constexpr(0xFFFFFFFF)
SIGN_BIT = tl.constexpr(0x80000000)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of the counter (c0, c1, c2, c3) under the key (k0, k1), all ``uint32``
    (header: ``philox4x32_10``). Per round, with (hi, lo) the halves of the 64-bit product:
    (c0, c1, c2, c3) <- (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0)),
    then the key is bumped by the Weyl constants. Returns the four output words."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = tl.mul(c0, PHILOX_M0, sanitize_overflow=False)  # low half: wraps mod 2^32
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = tl.mul(c2, PHILOX_M1, sanitize_overflow=False)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = tl.add(k0, PHILOX_W0, sanitize_overflow=False)
        k1 = tl.add(k1, PHILOX_W1, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def philox_block(seed_lo, seed_hi, counter_lo, counter_hi, index):
    """The four random words of element ``index`` (int64 tensor) in call ``counter`` under
    ``seed`` (header: ``philox_block``): counter = (index lo, index hi, counter lo,
    counter hi), key = (seed lo, seed hi). Seed and counter come as their uint32 halves
    (``split_words`` on the host, kernel parameters annotated ``tl.uint32``; the casts
    below are no-ops when compiled, but the interpreter ignores the annotation and types
    each argument from its value: see ``split_words``)."""
    index = index.to(tl.int64)
    zero = tl.zeros(index.shape, dtype=tl.uint32)
    c0 = index.to(tl.uint32)  # truncation: the low word
    c1 = (index >> 32).to(tl.uint32)
    c2 = zero + counter_lo.to(tl.uint32)  # broadcast the call counter to the block
    c3 = zero + counter_hi.to(tl.uint32)
    return philox4x32_10(c0, c1, c2, c3, seed_lo.to(tl.uint32), seed_hi.to(tl.uint32))


@triton.jit
def open_unit_float(word):
    """(2 k + 1) 2^-24 with k the top 23 bits of the ``uint32`` word: uniform in (0, 1),
    exact in float32, never 0 or 1 (header: ``open_unit_float``)."""
    k = word >> 9
    return (2 * k + 1).to(tl.float32) * TWO_POW_M24


@triton.jit
def unit_float(word):
    """k 2^-24 with k the top 24 bits: uniform in [0, 1), exact in float32 (header:
    ``unit_float``)."""
    return (word >> 8).to(tl.float32) * TWO_POW_M24


@triton.jit
def unit_double(lo, hi):
    """(hi << 21 | lo >> 11) 2^-53: 53 random bits as a float64 in [0, 1), exact (header:
    ``unit_double``)."""
    k = (hi.to(tl.uint64) << 21) | (lo >> 11).to(tl.uint64)
    return k.to(tl.float64) * TWO_POW_M53


@triton.jit
def neg_log_unit(u):
    """-log(u) for float32 u in (0, 1) by the header's fixed sequence of float32 operations
    (header: ``neg_log_unit``): u = m 2^e with m in (sqrt(1/2), sqrt(2)], then
    log m = 2 atanh(s), s = (m - 1) / (m + 1), by its series up to s^9.

    Each line below is one correctly rounded operation in the header's order; the sums of
    products must not become FMAs (launch with ``enable_fp_fusion=False``) and the division
    is ``div_rn`` (Triton's ``/`` is approximate on GPUs)."""
    bits = u.to(tl.uint32, bitcast=True)
    e = (bits >> 23).to(tl.int32) - 127
    m = ((bits & 0x007FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)  # [1, 2)
    big = m > 1.41421356
    m = tl.where(big, m * 0.5, m)
    e = tl.where(big, e + 1, e)
    f = m + (-1.0)  # exact (Sterbenz)
    s = tl.math.div_rn(f, f + 2.0)
    z = s * s
    p = tl.full(z.shape, 0.111111111, tl.float32)  # 1/9
    p = p * z + 0.142857143  # 1/7   (two roundings: no FMA)
    p = p * z + 0.2  # 1/5
    p = p * z + 0.333333333  # 1/3
    two_s = s * 2.0
    log_m = two_s + two_s * (p * z)
    log_u = e.to(tl.float32) * 0.693147182 + log_m
    return -log_u


@triton.jit
def pow2_float(p):
    """2^p (float32) for integer p in [-126, 127], from the exponent bits (exact)."""
    return ((p + 127) << 23).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def race_scale(top):
    """The two power-of-two factors (2^a, 2^(s - a)) of the header's ``race_scale`` for
    the largest importance ``top`` (float32): 2^s = 2^-e with top = f 2^e, f in [0.5, 1)
    (frexp), a = floor(s / 2); (1, 1) when top is not positive and finite. Computed in
    the kernel from the maximum, where the reference spends several torch ops."""
    bits = top.to(tl.uint32, bitcast=True)
    exponent_field = (bits >> 23).to(tl.int32)
    # A subnormal's frexp exponent comes from its leading one: the float value of the
    # mantissa bits (exact below 2^24) has that position as its exponent.
    lead = ((bits.to(tl.float32).to(tl.uint32, bitcast=True) >> 23).to(tl.int32) - 127)
    e = tl.where(exponent_field != 0, exponent_field - 126, lead - 148)
    s = tl.where((top > 0.0) & (bits < 0x7F800000), -e, 0)
    a = s >> 1  # arithmetic shift: floor(s / 2) for negative s too
    return pow2_float(a), pow2_float(s - a)


@triton.jit
def race_key_bits(w, scale_a, scale_b, seed_lo, seed_hi, counter_lo, counter_hi, index):
    """Exponential-race key of importance ``w`` (float32) for element ``index`` (header:
    ``race_key_bits``): the bits of E / ((w scale_a) scale_b), the two power-of-two
    factors of ``race_scale`` (computed once per call from the largest importance, so
    that tiny importances do not overflow the key), E = -log(open uniform of Philox word 2,
    ``kWordRaceTime``), a non-negative float, so unsigned order is numeric order; all ones
    when w is not positive (zero importance, also NaN), after every positive importance."""
    _, _, race_word, _ = philox_block(seed_lo, seed_hi, counter_lo, counter_hi, index)
    e = neg_log_unit(open_unit_float(race_word))
    has_key = w > 0.0
    # The header returns before dividing when w <= 0; lanes compute in lockstep here, so
    # those divide by 1 instead (their result is discarded) rather than by 0 or NaN.
    scaled = (w * scale_a) * scale_b
    bits = tl.math.div_rn(e, tl.where(has_key, scaled, 1.0)).to(tl.uint32, bitcast=True)
    return tl.where(has_key, bits, KEY_LAST)


@triton.jit
def rank_key_bits(x, LARGEST: tl.constexpr):
    """Rank key of a float32 score, smaller = better (header: ``rank_key_bits``): the
    order-preserving map of the float to uint32 (negative: complement; non-negative: set
    the sign bit), complemented for largest-first; -0 maps like +0; NaN is all ones.

    The header writes -0 -> +0 as ``x + 0.0f``; here it is the equivalent select
    ``x == 0 ? +0 : x`` (equal for every non-NaN x, including subnormals), which no
    compiler can drop as an identity the way it may drop ``x + 0.0`` under relaxed
    floating-point flags."""
    x = tl.where(x == 0.0, 0.0, x)
    b = x.to(tl.uint32, bitcast=True)
    # Complement as xor with all ones: the interpreter's ``~`` fails on uint32 (Triton
    # 3.8 builds the all-ones constant as -1 in a uint32 numpy array).
    ascending = tl.where((b & SIGN_BIT) != 0, b ^ KEY_LAST, b | SIGN_BIT)
    if LARGEST:
        key = ascending ^ KEY_LAST
    else:
        key = ascending
    return tl.where(x != x, KEY_LAST, key)


@triton.jit
def pack_key_index_signed(key, index):
    """(key, index) as one int64 whose signed order is (key, then index) order (header:
    ``pack_key_index_signed``): the key's top bit is flipped so that keys >= 2^31 stay above
    those below once the word is read as signed; ``index`` < 2^32."""
    flipped = (key ^ SIGN_BIT).to(tl.uint64)
    return ((flipped << 32) | index.to(tl.uint64)).to(tl.int64, bitcast=True)


@triton.jit
def replacement_target(seed_lo, seed_hi, counter_lo, counter_hi, draw, total):
    """Draw ``draw`` (int64 tensor) of sampling with replacement: t = trunc(u total) with
    u = ``unit_double`` of Philox words 0 (low) and 1 (high), clamped to total - 1 (header:
    ``replacement_target``). ``total`` (int64, < 2^53) converts exactly; the product is one
    correctly rounded float64 multiplication and the conversion truncates (t >= 0)."""
    w0, w1, _, _ = philox_block(seed_lo, seed_hi, counter_lo, counter_hi, draw)
    u = unit_double(w0, w1)
    t = (u * total.to(tl.float64)).to(tl.int64)
    return tl.minimum(t, total - 1)


# ---- host side: launch parameters shared by the selection kernels ------------------------

# Every selection kernel is launched with these options: no FMA contraction (see above).
EXACT_FP_LAUNCH = {"enable_fp_fusion": False}


def split_words(x: int) -> tuple[int, int]:
    """(low, high) uint32 halves of a seed or counter in [0, 2^63), for kernel parameters
    annotated ``tl.uint32``.

    Why halves: Triton types a Python int argument from its value. Compiled, the
    annotation fixes the type. The interpreter (Triton 3.8) ignores it and, for a value in
    [2^31, 2^32), declares the argument int64 while storing it in a uint32 numpy array, so
    a 64-bit ``x >> 32`` in the kernel would shift a 32-bit number by its full width and
    return garbage. Halves are below 2^32 and only ever truncated to uint32 in the kernel
    (``philox_block``), which is exact under either typing.
    """
    if not 0 <= x < 1 << 63:
        raise ValueError(f"seeds and counters must be in [0, 2^63), got {x}")
    return x & 0xFFFFFFFF, x >> 32

GPU_BLOCK = 1024
INTERPRETER_MAX_BLOCK = 1 << 13


def elements_per_program(n: int) -> int:
    """``BLOCK`` of a 1-D selection kernel over n elements: 1024 on a GPU (one size, one
    compilation); under the interpreter, which pays per program and per operation, the
    whole input in one program up to 8192 elements."""
    if interpreting():
        return min(triton.next_power_of_2(max(n, 1)), INTERPRETER_MAX_BLOCK)
    return GPU_BLOCK
