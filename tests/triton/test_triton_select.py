"""Triton selection ops against the specification ``fastsel.reference``, bit for bit.

The design promise is that one seed selects the same indices on every backend, so nothing
here has a tolerance: indices, keys and random words must be equal, and float results are
compared by their bits. Runs on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1,
see conftest.py); the device helpers of ``fastsel.triton.selection_math`` are checked
directly through small test kernels (Philox known-answer vectors, the uniforms, an
exhaustive check of ``neg_log_unit`` over every uniform the race can draw), then the four
custom ops end to end. One test compiles the kernels to PTX (no GPU needed) to check what
the interpreter cannot: no FMA contraction and correctly rounded division.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton", reason="the Triton backend needs the triton package")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import fastsel  # noqa: E402,F401  (registers torch.ops.fastsel.triton_*)
from fastsel import reference as ref  # noqa: E402
from fastsel.triton import race_keys_triton, rank_keys_triton  # noqa: E402
from fastsel.triton.selection_math import (  # noqa: E402
    neg_log_unit,
    open_unit_float,
    philox4x32_10,
    philox_block,
    race_scale,
    split_words,
    unit_double,
    unit_float,
)

ops = torch.ops.fastsel
SIZES = (1, 7, 100, 1000, 4097)
LOW_WORD = 0xFFFFFFFF
NAN, INF = float("nan"), float("inf")
# (seed, counter) pairs around every word boundary the kernels split on: int32 / uint32 /
# int64 kernel-argument typing, the low/high halves, and the largest allowed values.
SEEDS_COUNTERS = (
    (0, 0), (1, 0), (0, 1), (42, 7),
    (2**31 - 1, 2**31), (2**32 - 1, 2**32), (2**32, 2**32 - 1),
    (0x0123456789ABCDEF, 0x7EDCBA9876543210),
    (ref.MAX_SEED - 1, 3), (ref.MAX_SEED, ref.MAX_SEED),
)


def float_bits(x: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor (so NaN == NaN and -0 != +0 in comparisons)."""
    return x.view({torch.float32: torch.int32, torch.float64: torch.int64}[x.dtype])


def unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint32 key, index) of packed signed int64s (inverse of pack_key_index_signed)."""
    return ((packed >> 32) & LOW_WORD) ^ 0x80000000, packed & LOW_WORD


def assert_same_indices(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == torch.int64, f"{what}: dtype {got.dtype}"
    assert torch.equal(got, want), f"{what}:\n got  {got.tolist()}\n want {want.tolist()}"


def check_topk(scores: torch.Tensor, k: int, largest: bool, what: str = "") -> torch.Tensor:
    """triton_select_topk, asserted equal to select_topk_reference; returns the indices."""
    got = ops.triton_select_topk(scores, k, largest)
    want = ref.select_topk_reference(scores, k, largest)
    assert_same_indices(got, want, f"topk k={k} largest={largest} {scores.dtype} {what}")
    return got


SAMPLERS = {
    "without": (ops.triton_sample_without_replacement, ref.sample_without_replacement_reference),
    "with": (ops.triton_sample_with_replacement, ref.sample_with_replacement_reference),
}


def check_sample(replacement: str, w: torch.Tensor, k: int, seed: int, counter: int,
                 what: str = "") -> torch.Tensor:
    """Sampling ``with`` / ``without`` replacement, asserted equal to the reference."""
    op, reference = SAMPLERS[replacement]
    got = op(w, k, seed, counter)
    assert_same_indices(got, reference(w, k, seed, counter),
                        f"{replacement} replacement n={w.numel()} k={k} {w.dtype} "
                        f"seed={seed} counter={counter} {what}")
    return got


# ---- device helpers through test kernels --------------------------------------------------

@triton.jit
def _philox_rows_kernel(out_ptr, in_ptr, BLOCK: tl.constexpr):
    # Row r of in: (c0, c1, c2, c3, k0, k1) as int64 holding uint32; of out: 4 words.
    row = tl.arange(0, BLOCK).to(tl.int64)
    c0 = tl.load(in_ptr + row * 6 + 0).to(tl.uint32)
    c1 = tl.load(in_ptr + row * 6 + 1).to(tl.uint32)
    c2 = tl.load(in_ptr + row * 6 + 2).to(tl.uint32)
    c3 = tl.load(in_ptr + row * 6 + 3).to(tl.uint32)
    k0 = tl.load(in_ptr + row * 6 + 4).to(tl.uint32)
    k1 = tl.load(in_ptr + row * 6 + 5).to(tl.uint32)
    r0, r1, r2, r3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + row * 4 + 0, r0.to(tl.int64))
    tl.store(out_ptr + row * 4 + 1, r1.to(tl.int64))
    tl.store(out_ptr + row * 4 + 2, r2.to(tl.int64))
    tl.store(out_ptr + row * 4 + 3, r3.to(tl.int64))


@triton.jit
def _uniforms_kernel(out_ptr, index_ptr, n, seed_lo: tl.uint32, seed_hi: tl.uint32,
                     counter_lo: tl.uint32, counter_hi: tl.uint32, BLOCK: tl.constexpr):
    # Row i of out: the 4 Philox words of element index[i], then the bits of
    # open_unit_float(word 2), unit_float(word 3), unit_double(word 0, word 1).
    i = tl.arange(0, BLOCK).to(tl.int64)
    mask = i < n
    index = tl.load(index_ptr + i, mask=mask, other=0)
    w0, w1, w2, w3 = philox_block(seed_lo, seed_hi, counter_lo, counter_hi, index)
    row = out_ptr + i * 7
    tl.store(row + 0, w0.to(tl.int64), mask=mask)
    tl.store(row + 1, w1.to(tl.int64), mask=mask)
    tl.store(row + 2, w2.to(tl.int64), mask=mask)
    tl.store(row + 3, w3.to(tl.int64), mask=mask)
    tl.store(row + 4, open_unit_float(w2).to(tl.uint32, bitcast=True).to(tl.int64), mask=mask)
    tl.store(row + 5, unit_float(w3).to(tl.uint32, bitcast=True).to(tl.int64), mask=mask)
    tl.store(row + 6, unit_double(w0, w1).to(tl.int64, bitcast=True), mask=mask)


@triton.jit
def _neg_log_unit_kernel(out_ptr, u_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    u = tl.load(u_ptr + i, mask=mask, other=0.5)
    tl.store(out_ptr + i, neg_log_unit(u), mask=mask)


def test_philox_matches_random123_known_answer_vectors():
    rows = torch.tensor([
        [0, 0, 0, 0, 0, 0],
        [LOW_WORD] * 6,
        [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0],
        [0, 0, 0, 0, 0, 0],  # padding to a power of two rows
    ], dtype=torch.int64)
    out = torch.zeros(4, 4, dtype=torch.int64)
    _philox_rows_kernel[(1,)](out, rows, BLOCK=4)
    assert [[hex(w) for w in row] for row in out[:3].tolist()] == [
        ["0x6627e8d5", "0xe169c58d", "0xbc57ac4c", "0x9b00dbd8"],
        ["0x408f276d", "0x41c83b0e", "0xa20bc7c6", "0x6d5451fd"],
        ["0xd16cfe09", "0x94fdcceb", "0x5001e420", "0x24126ea1"],
    ]


@pytest.mark.parametrize("seed,counter", SEEDS_COUNTERS)
def test_philox_block_and_uniforms_match_reference(seed, counter):
    # Element indices beyond 2^32 exercise the counter's second word.
    index = torch.cat([torch.arange(60), torch.tensor([2**31, 2**32 - 1, 2**32, 2**32 + 5,
                                                       2**40 + 3, 2**62 + 1])])
    n = index.numel()
    out = torch.empty(n, 7, dtype=torch.int64)
    _uniforms_kernel[(1,)](out, index, n, *split_words(seed), *split_words(counter),
                           BLOCK=triton.next_power_of_2(n))
    words = ref.philox_block(seed, counter, index)
    for j in range(4):
        assert torch.equal(out[:, j], words[j]), f"Philox word {j}"
    as_uint32 = lambda x: float_bits(x).to(torch.int64) & LOW_WORD  # noqa: E731
    assert torch.equal(out[:, 4], as_uint32(ref.open_unit_float(words[2])))
    assert torch.equal(out[:, 5], as_uint32(ref.unit_float(words[3])))
    assert torch.equal(out[:, 6], float_bits(ref.unit_double(words[0], words[1])))


def test_neg_log_unit_matches_reference_on_every_open_uniform():
    # Every value open_unit_float can produce ((2 k + 1) 2^-24, k < 2^23), then random
    # normal float32 values in (0, 1) that the race never draws.
    grid = ref.open_unit_float(torch.arange(1 << 23) << 9)
    g = torch.Generator().manual_seed(0)
    exponents = torch.randint(1, 127, (1 << 14,), generator=g)  # biased 1..126: 2^-126 <= u < 1
    mantissas = torch.randint(0, 1 << 23, (1 << 14,), generator=g)
    random_u = ((exponents << 23) | mantissas).to(torch.int32).view(torch.float32)
    u = torch.cat([grid, random_u])
    got = torch.empty_like(u)
    block = 1 << 20
    _neg_log_unit_kernel[(triton.cdiv(u.numel(), block),)](got, u, u.numel(), BLOCK=block)
    want = ref.neg_log_unit(u)
    mismatch = (float_bits(got) != float_bits(want)).nonzero().flatten()
    assert mismatch.numel() == 0, (f"{mismatch.numel()} mismatches, first u = "
                                   f"{u[mismatch[:5]].tolist()}: {got[mismatch[:5]].tolist()} "
                                   f"!= {want[mismatch[:5]].tolist()}")
    # The shared definition is also a good -log: within 2 ulp of the exact value.
    exact = -torch.log(u.double())
    ulp = (torch.nextafter(exact.float(), torch.tensor(INF)).double() - exact.float().double())
    assert float(((want.double() - exact).abs() / ulp).max()) < 2.0


# ---- keys of the kernels against the reference keys -------------------------------------

def special_scores(n: int, seed: int = 0) -> torch.Tensor:
    """float32 scores with ties (values on a coarse grid), NaN, -0 / +0 and +-inf."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(-4, 5, (n,), generator=g).to(torch.float32) * 0.25
    specials = torch.tensor([NAN, -0.0, 0.0, INF, -INF, NAN, 1e-45, -1e-45, 3.4028235e38])
    picks = torch.randint(0, n, (min(n, 2 * specials.numel()),), generator=g)
    s[picks] = specials.repeat(2)[: picks.numel()]
    return s


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("largest", [True, False])
def test_rank_keys_match_reference_bits(n, largest):
    scores = special_scores(n, seed=n)
    key, index = unpack(rank_keys_triton(scores, largest))
    assert torch.equal(index, torch.arange(n))
    assert torch.equal(key, ref.rank_key_bits(scores, largest))


# numpy (the interpreter) warns about the intended E / 1e-45 = inf
@pytest.mark.filterwarnings("ignore:overflow encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("seed,counter", SEEDS_COUNTERS[::3])
def test_race_keys_match_reference_bits(n, seed, counter):
    w = torch.rand(n, generator=torch.Generator().manual_seed(n))
    w[::4] = 0.0
    w[1::4] = 1e-45  # subnormal: a key that would overflow without the common scale
    key, index = unpack(race_keys_triton(w, seed, counter))
    assert torch.equal(index, torch.arange(n))
    assert torch.equal(key, ref.race_key_bits(w, seed, counter))
    assert bool((key[::4] == LOW_WORD).all()), "zero importance must get the all-ones key"


# ---- top-k ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("largest", [True, False])
def test_select_topk_matches_reference(n, dtype, largest):
    scores = special_scores(n, seed=n + 1).to(dtype)
    for k in sorted({0, 1, n // 2, n}):
        assert check_topk(scores, k, largest).shape == (k,)


def test_select_topk_orders_ties_nan_and_signed_zeros():
    scores = torch.tensor([1.0, NAN, -0.0, INF, 0.0, 1.0, -INF, NAN, 1.0])
    assert ops.triton_select_topk(scores, 9, True).tolist() == [3, 0, 5, 8, 2, 4, 6, 1, 7]
    assert ops.triton_select_topk(scores, 9, False).tolist() == [6, 2, 4, 0, 5, 8, 3, 1, 7]


# ---- sampling ------------------------------------------------------------------------------

def importance_with_zeros(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Positive importances spanning several binades, every third one zero (not all)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=g, dtype=torch.float64) * torch.exp2(
        torch.randint(-6, 6, (n,), generator=g).double())
    w[1::3] = 0.0
    return w.to(dtype)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_sample_without_replacement_matches_reference(n, dtype):
    w = importance_with_zeros(n, dtype, seed=n)
    positive = (w > 0).nonzero().flatten()
    n_positive = positive.numel()
    for seed, counter in SEEDS_COUNTERS:
        for k in sorted({0, 1, n_positive}):
            got = check_sample("without", w, k, seed, counter)
        # k = every positive importance: exactly those, each once (zeros never drawn).
        assert torch.equal(got.sort().values, positive)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_sample_with_replacement_matches_reference(n, dtype):
    w = importance_with_zeros(n, dtype, seed=n + 1)
    for seed, counter in SEEDS_COUNTERS:
        for k in (0, 1, n, 3 * n + 5):
            got = check_sample("with", w, k, seed, counter)
            assert bool((w[got] > 0).all()), "an index of zero importance was drawn"


@pytest.mark.parametrize("position", [0, 499, 999])
def test_sample_with_replacement_single_positive_importance(position):
    # Only one item can be drawn: the binary search must land on it from either end.
    w = torch.zeros(1000)
    w[position] = 0.3
    got = ops.triton_sample_with_replacement(w, 64, 5, 6)
    assert got.tolist() == [position] * 64


def test_float64_importance_below_float32_range_is_never_drawn():
    # Both samplers use the importance in float32: 1e-50 rounds to 0 there.
    w = torch.tensor([1e-50, 1.0, 1e-50, 2.0, 1e-300], dtype=torch.float64)
    for seed, counter in SEEDS_COUNTERS[:4]:
        got = check_sample("without", w, 5, seed, counter)
        assert sorted(got[:2].tolist()) == [1, 3] and got[2:].tolist() == [0, 2, 4]
        got = check_sample("with", w, 40, seed, counter)
        assert set(got.tolist()) <= {1, 3}


def test_non_contiguous_inputs():
    base = special_scores(2 * 1000, seed=3)
    scores = base[::2]
    assert not scores.is_contiguous()
    for largest in (True, False):
        check_topk(scores, 37, largest, "stride 2")
    strided = importance_with_zeros(3 * 1000, torch.float32, seed=4)[::3]  # stride 3
    column = importance_with_zeros(2 * 1000, torch.float64, seed=5).view(1000, 2).t()[1]
    for imp in (strided, column):
        assert not imp.is_contiguous() and bool((imp > 0).sum() >= 50)
        for seed, counter in SEEDS_COUNTERS[::4]:
            check_sample("without", imp, 50, seed, counter, f"stride {imp.stride(0)}")
            check_sample("with", imp, 50, seed, counter, f"stride {imp.stride(0)}")
    values, history = base[1::2], base[::4]
    assert torch.equal(float_bits(ops.triton_percentile(values, history)),
                       float_bits(ref.percentile_reference(values, history)))


# ---- percentile ----------------------------------------------------------------------------

def percentile_values(seed: int) -> torch.Tensor:
    """Values on the history's grid (ties), between grid points, and the special values."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.randint(-8, 9, (40,), generator=g).to(torch.float32) * 0.5
    between = grid + 0.25
    return torch.cat([grid, between, torch.tensor([NAN, -0.0, 0.0, INF, -INF, 100.0, -100.0])])


@pytest.mark.parametrize("history_len", [0, 1, 2, 3, 31, 1023, 1024, 1025])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float16, torch.bfloat16),
                                    (torch.float64, torch.float32), (torch.float32, torch.float64)])
def test_percentile_matches_reference(history_len, dtypes):
    value_dtype, history_dtype = dtypes
    g = torch.Generator().manual_seed(history_len)
    history = torch.randint(-8, 9, (history_len,), generator=g).to(torch.float32) * 0.5
    if history_len >= 3:  # NaN, infinities and a signed zero among the entries
        history[torch.randperm(history_len, generator=g)[:3]] = torch.tensor([NAN, INF, -0.0])
    if history_len >= 31:
        history[::7] = NAN
        history[1] = -INF
    values = percentile_values(history_len).to(value_dtype)
    history = history.to(history_dtype)
    got = ops.triton_percentile(values, history)
    want = ref.percentile_reference(values, history)
    assert got.dtype == torch.float32 and got.shape == values.shape
    assert torch.equal(float_bits(got), float_bits(want)), f"{got.tolist()} != {want.tolist()}"


def test_percentile_integer_inputs_compare_like_the_reference():
    # 2^24 + 1 is not a float32: the comparison must not round it to 2^24.
    values = torch.tensor([2**24, 2**24 + 1, 2**24 + 2])
    history = torch.tensor([2**24 + 1, 0, 2**24])
    got = ops.triton_percentile(values, history)
    assert torch.equal(float_bits(got), float_bits(ref.percentile_reference(values, history)))
    assert got.tolist() == [float(torch.tensor(1.0) / 3), float(torch.tensor(2.0) / 3), 1.0]


def test_percentile_special_cases():
    values = torch.tensor([NAN, -INF, 0.0, 1.0, INF])
    all_nan = torch.full((5,), NAN)
    empty = torch.empty(0)
    for history in (empty, all_nan):  # no valid entry: every value ranks at 1, NaN stays NaN
        got = ops.triton_percentile(values, history)
        assert got[0].isnan() and got[1:].tolist() == [1.0] * 4
    got = ops.triton_percentile(values, torch.tensor([NAN, 0.0, -0.0, 2.0]))
    two_thirds = float(torch.tensor(2.0) / torch.tensor(3.0))  # float32 division
    assert got[0].isnan() and got[1:].tolist() == [0.0, 0.0, two_thirds, 1.0]  # m = 3, not 4


# ---- edge sizes, argument checks, custom-op registration ----------------------------------

def test_empty_inputs_and_k_zero():
    empty = torch.empty(0)
    assert ops.triton_select_topk(empty, 0, True).shape == (0,)
    assert ops.triton_sample_without_replacement(empty, 0, 1, 2).shape == (0,)
    assert ops.triton_sample_with_replacement(empty, 0, 1, 2).shape == (0,)
    assert ops.triton_sample_with_replacement(empty, 3, 1, 2).shape == (0,)
    assert ops.triton_percentile(empty, torch.randn(5)).shape == (0,)
    w = torch.rand(10)
    for op in (ops.triton_sample_without_replacement, ops.triton_sample_with_replacement):
        out = op(w, 0, 1, 2)
        assert out.shape == (0,) and out.dtype == torch.int64
    assert ops.triton_select_topk(w, 0, False).shape == (0,)


def test_k_larger_than_n_selects_everything_like_the_reference():
    assert check_topk(special_scores(7, seed=9), 10, True).shape == (7,)
    assert check_sample("without", torch.rand(7), 10, 3, 4).shape == (7,)


def test_rejects_negative_k_seed_counter_and_non_1d():
    w = torch.rand(5)
    with pytest.raises(ValueError, match="k must be >= 0"):
        ops.triton_sample_with_replacement(w, -1, 0, 0)
    with pytest.raises(ValueError, match="seed and counter"):
        ops.triton_sample_without_replacement(w, 2, -1, 0)
    with pytest.raises(ValueError, match="seed and counter"):
        ops.triton_sample_with_replacement(w, 2, 0, -5)
    with pytest.raises(ValueError, match="1-D"):
        ops.triton_select_topk(torch.rand(2, 3), 1, True)


@pytest.mark.parametrize("op,args", [
    ("triton_select_topk", (torch.randn(33), 5, True)),
    ("triton_select_topk", (torch.randn(33, dtype=torch.float64), 5, False)),
    ("triton_sample_without_replacement", (torch.rand(33), 5, 2**40, 3)),
    ("triton_sample_with_replacement", (torch.rand(33), 50, 7, 2**40)),
    ("triton_percentile", (torch.randn(17), torch.randn(12))),
])
def test_opcheck(op, args):
    # The full opcheck, including torch.compile's aot_dispatch: the compiled graph calls the
    # custom op on real (CPU) tensors, which the interpreter runs.
    torch.library.opcheck(getattr(ops, op).default, args)


# ---- what the interpreter cannot check: the GPU code ---------------------------------------

def test_every_selection_kernel_is_launched_without_fp_fusion(monkeypatch):
    """The interpreter ignores launch options, so record them: an FMA on a GPU would change
    the rounding of neg_log_unit (and so the sample) without any interpreter test noticing."""
    from fastsel.triton import percentile_count, race_keys, rank_keys, replacement_draws

    kernels = {
        "rank": rank_keys._rank_keys_kernel, "race": race_keys._race_keys_kernel,
        "draws": replacement_draws._replacement_draws_kernel,
        "percentile": percentile_count._percentile_count_kernel,
    }
    fusion = {}
    for name, kernel in kernels.items():
        def recording_run(*args, _name=name, _run=kernel.run, **kwargs):
            fusion[_name] = kwargs.get("enable_fp_fusion", "default (True)")
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", recording_run)
    x = torch.rand(9)
    ops.triton_select_topk(x, 3, True)
    ops.triton_sample_without_replacement(x, 3, 1, 2)
    ops.triton_sample_with_replacement(x, 3, 1, 2)
    ops.triton_percentile(x, x)
    assert fusion == {name: False for name in kernels}


_PTX_CHECK = textwrap.dedent("""
    import json, re
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastsel.triton.percentile_count import _percentile_count_kernel
    from fastsel.triton.race_keys import _race_keys_kernel
    from fastsel.triton.rank_keys import _rank_keys_kernel
    from fastsel.triton.replacement_draws import _replacement_draws_kernel
    from fastsel.triton.selection_math import EXACT_FP_LAUNCH

    def ptx(fn, signature, constexprs):
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        options = {**EXACT_FP_LAUNCH, "num_warps": 4}
        return triton.compile(src, target=GPUTarget("cuda", 80, 32), options=options).asm["ptx"]

    kernels = {
        "race_keys": ptx(_race_keys_kernel, {"packed_ptr": "*i64", "importance_ptr": "*fp32",
            "max_ptr": "*fp32", "n": "i32", "stride": "i32", "seed_lo": "u32", "seed_hi": "u32", "counter_lo": "u32",
            "counter_hi": "u32", "BLOCK": "constexpr"},
            {"BLOCK": 1024}),
        "rank_keys": ptx(_rank_keys_kernel, {"packed_ptr": "*i64", "scores_ptr": "*bf16",
            "n": "i32", "stride": "i32", "LARGEST": "constexpr", "BLOCK": "constexpr"},
            {"LARGEST": True, "BLOCK": 1024}),
        "replacement_draws": ptx(_replacement_draws_kernel, {"index_ptr": "*i64",
            "cum_ptr": "*i64", "n": "i32", "k": "i32", "n_search_steps": "i32", "seed_lo": "u32",
            "seed_hi": "u32", "counter_lo": "u32", "counter_hi": "u32", "BLOCK": "constexpr"},
            {"BLOCK": 1024}),
        "percentile_count": ptx(_percentile_count_kernel, {"out_ptr": "*fp32",
            "values_ptr": "*fp16", "sorted_history_ptr": "*fp32", "valid_count_ptr": "*i64",
            "n": "i32", "stride": "i32", "history_len": "i32", "n_search_steps": "i32",
            "COMPARE_DTYPE": "constexpr", "BLOCK": "constexpr"},
            {"COMPARE_DTYPE": tl.float32, "BLOCK": 1024}),
    }
    print(json.dumps({name: {
        "fma": len(re.findall(r"\\bfma\\.", code)),
        "div": sorted(set(re.findall(r"\\bdiv\\.[a-z0-9.]*f32", code))),
        "ftz": len(re.findall(r"\\.ftz\\b", code)),
    } for name, code in kernels.items()}))
""")


def test_gpu_code_has_no_fma_and_rounds_divisions_correctly(tmp_path):
    """Compiles the kernels for sm_80 with the launch options the launchers use (no GPU
    needed): float math must stay separate IEEE operations (no fma), divisions must be
    div.rn (Triton's ``/`` is div.full, approximate) and nothing may flush subnormals."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", _PTX_CHECK], capture_output=True, text=True,
                          env=env, timeout=300)
    if proc.returncode != 0:
        if "ptxas" in proc.stderr or "nvidia" in proc.stderr.lower():
            pytest.skip(f"cannot compile for the NVIDIA backend here: {proc.stderr[-300:]}")
        raise AssertionError(proc.stderr)
    import json

    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, stats in report.items():
        assert stats["fma"] == 0, f"{name}: {stats}"
        assert stats["ftz"] == 0, f"{name}: {stats}"
        assert all(d == "div.rn.f32" for d in stats["div"]), f"{name}: {stats}"
    assert report["race_keys"]["div"] == ["div.rn.f32"]
    assert report["percentile_count"]["div"] == ["div.rn.f32"]


# ---- the public API with backend="triton" -------------------------------------------------

@pytest.mark.parametrize("replacement", [False, True])
def test_public_api_triton_equals_cpu_backends(replacement):
    """fastsel.sample / select_topk / percentile / select route to the Triton ops and give
    the indices of the other backends for the same seed."""
    import fastsel

    g = torch.Generator().manual_seed(5)
    w = torch.rand(257, generator=g)
    w[::6] = 0.0
    s = torch.randn(257, generator=g)
    others = [b for b in ("cpu", "torch") if b in fastsel.available_backends()]
    got = fastsel.sample(w, 40, replacement=replacement, seed=17, counter=4, backend="triton")
    for b in others:
        want = fastsel.sample(w, 40, replacement=replacement, seed=17, counter=4, backend=b)
        assert torch.equal(got.indices, want.indices)
        torch.testing.assert_close(got.weights, want.weights, rtol=1e-6, atol=0)
        assert torch.equal(fastsel.select_topk(s, 30, False, backend="triton").indices,
                           fastsel.select_topk(s, 30, False, backend=b).indices)
        assert torch.equal(fastsel.percentile(s, w, backend="triton"), fastsel.percentile(s, w, backend=b))
    x = torch.randn(64, 10, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    assert torch.equal(fastsel.select(x, y, 8, by="margin", backend="triton").indices,
                       fastsel.select(x, y, 8, by="margin", backend="torch").indices)


def test_public_api_triton_rejects_bad_importance():
    import fastsel

    with pytest.raises(ValueError, match=r"importance must be non-negative; importance\[1\] = -2"):
        fastsel.sample(torch.tensor([1.0, -2.0]), 1, seed=0, backend="triton")
    with pytest.raises(ValueError, match=r"k = 2 exceeds the number of nonzero importances \(1\)"):
        fastsel.sample(torch.tensor([1.0, 0.0]), 2, seed=0, backend="triton")


@pytest.mark.parametrize("magnitude", [1e-45, 1e-39, 1e-30, 3e38])
def test_race_keys_of_tiny_and_huge_importances_match_reference(magnitude):
    """All importances tiny (E / w would overflow float32 without race_scale) or huge:
    the keys stay finite, distinct and bit-equal to the reference."""
    g = torch.Generator().manual_seed(1)
    w = (torch.rand(200, generator=g) + 0.5).mul(magnitude).to(torch.float32)
    w[::7] = 0.0
    key, _ = unpack(race_keys_triton(w, 5, 9))
    assert torch.equal(key, ref.race_key_bits(w, 5, 9))
    finite = key[w > 0]
    assert bool((finite < 0x7F800000).all()), "positive importances must get finite keys"


@triton.jit
def _race_scale_kernel(top_ptr, out_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    a, b = race_scale(tl.load(top_ptr + i))
    tl.store(out_ptr + 2 * i, a)
    tl.store(out_ptr + 2 * i + 1, b)


def test_in_kernel_race_scale_matches_reference_on_every_kind_of_maximum():
    """The kernel's scale, from the maximum's bits, equals the reference's torch ops for
    zero, negative, NaN and infinite maxima (unit scale), every subnormal exponent, the
    normal range's edges and odd/even exponents (floor(s / 2) for s of either sign)."""
    tops = [0.0, -0.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e-30, 0.3, 0.5, 1.0, 1.5, 2.0,
            3.0, 1e10, 3.4028234663852886e38, 2.0 ** -126, 1.5 * 2.0 ** -126]
    tops += [2.0 ** -p for p in range(127, 150)] + [3 * 2.0 ** -p for p in range(128, 149)]
    tops += [2.0 ** p for p in range(-125, 128, 7)]
    block = triton.next_power_of_2(len(tops))
    top = torch.zeros(block, dtype=torch.float32)
    top[: len(tops)] = torch.tensor(tops, dtype=torch.float64).to(torch.float32)
    assert int((top[: len(tops)] > 0).sum()) > 80  # positive maxima, subnormal ones among them:
    assert bool(((top[: len(tops)] > 0) & (top[: len(tops)] < 2.0 ** -126)).any())  # not flushed to 0
    out = torch.empty(2 * block, dtype=torch.float32)
    _race_scale_kernel[(1,)](top, out, BLOCK=block)
    for k, t in enumerate(top[: len(tops)]):
        want = ref.race_scale(t.reshape(1))
        got = out[2 * k: 2 * k + 2]
        assert torch.equal(got, want), (float(t), got.tolist(), want.tolist())
