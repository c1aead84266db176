"""Bad inputs raise clear exceptions (type as in ``fastsel/ops.py``) naming the argument."""

from __future__ import annotations

import pytest
import torch

import fastsel

N, C, D = 4, 5, 3


def _x():
    return torch.randn(N, C)


def _t():
    return torch.tensor([0, 1, 4, 2])


def _w():
    return torch.randn(C, D)


# (id, kwargs builder, exception type, regex the message must match)
CASES = [
    ("logits_1d", lambda: dict(logits=torch.randn(C), target=_t()), ValueError, r"logits"),
    ("logits_3d", lambda: dict(logits=torch.randn(N, C, 2), target=_t()), ValueError, r"logits"),
    ("logits_0d", lambda: dict(logits=torch.tensor(1.0), target=_t()), ValueError, r"logits"),
    ("logits_int64", lambda: dict(logits=torch.randint(0, 3, (N, C)), target=_t()), TypeError, r"logits"),
    ("logits_int32", lambda: dict(logits=torch.randint(0, 3, (N, C), dtype=torch.int32), target=_t()),
     TypeError, r"logits"),
    ("logits_bool", lambda: dict(logits=torch.zeros(N, C, dtype=torch.bool), target=_t()), TypeError, r"logits"),
    ("logits_complex", lambda: dict(logits=torch.randn(N, C, dtype=torch.complex64), target=_t()),
     TypeError, r"logits"),
    ("logits_list", lambda: dict(logits=[[0.0] * C] * N, target=_t()), TypeError, r"logits"),
    ("logits_C0", lambda: dict(logits=torch.randn(N, 0), target=_t()), ValueError, r"logits.*C"),
    ("logits_N0_C0", lambda: dict(logits=torch.randn(0, 0), target=torch.zeros(0, dtype=torch.long)),
     ValueError, r"logits.*C"),
    ("target_too_long", lambda: dict(logits=_x(), target=torch.zeros(N + 1, dtype=torch.long)),
     ValueError, r"target"),
    ("target_too_short", lambda: dict(logits=_x(), target=torch.zeros(N - 1, dtype=torch.long)),
     ValueError, r"target"),
    ("target_2d", lambda: dict(logits=_x(), target=torch.zeros(N, 1, dtype=torch.long)), ValueError, r"target"),
    ("target_0d", lambda: dict(logits=_x(), target=torch.tensor(0)), ValueError, r"target"),
    ("target_float", lambda: dict(logits=_x(), target=torch.zeros(N)), TypeError, r"target"),
    ("target_float64", lambda: dict(logits=_x(), target=torch.zeros(N, dtype=torch.float64)),
     TypeError, r"target"),
    ("target_int16", lambda: dict(logits=_x(), target=torch.zeros(N, dtype=torch.int16)), TypeError, r"target"),
    ("target_uint8", lambda: dict(logits=_x(), target=torch.zeros(N, dtype=torch.uint8)), TypeError, r"target"),
    ("target_bool", lambda: dict(logits=_x(), target=torch.zeros(N, dtype=torch.bool)), TypeError, r"target"),
    ("target_list", lambda: dict(logits=_x(), target=[0, 1, 2, 3]), TypeError, r"target"),
    ("target_meta_device", lambda: dict(logits=_x(), target=torch.zeros(N, dtype=torch.long, device="meta")),
     ValueError, r"target"),
    ("target_negative", lambda: dict(logits=_x(), target=torch.tensor([0, -1, 1, 2])), IndexError, r"target"),
    ("target_negative_int32", lambda: dict(logits=_x(), target=torch.tensor([0, 1, 2, -5], dtype=torch.int32)),
     IndexError, r"target"),
    ("target_eq_C", lambda: dict(logits=_x(), target=torch.tensor([0, 1, C, 2])), IndexError, r"target"),
    ("target_gt_C_int32", lambda: dict(logits=_x(), target=torch.tensor([0, 1, 2, C + 7], dtype=torch.int32)),
     IndexError, r"target"),
    ("target_huge", lambda: dict(logits=_x(), target=torch.tensor([0, 1, 2, 2**40])), IndexError, r"target"),
    ("target_int64_min", lambda: dict(logits=_x(), target=torch.tensor([0, -2**63, 2, 1])), IndexError, r"target"),
    ("target_default_ignore_with_custom", lambda: dict(logits=_x(), target=torch.tensor([0, -100, 1, 2]),
                                                       ignore_index=-1), IndexError, r"target"),
    ("target_C_with_ignore_C_plus_1", lambda: dict(logits=_x(), target=torch.tensor([0, C, 1, 2]),
                                                   ignore_index=C + 1), IndexError, r"target"),
    ("target_bad_last_of_many", lambda: dict(logits=torch.randn(3000, C),
                                             target=torch.cat([torch.zeros(2999, dtype=torch.long),
                                                               torch.tensor([C])])), IndexError, r"target"),
    ("head_rows_C_plus_1", lambda: dict(logits=_x(), target=_t(), head=torch.randn(C + 1, D)),
     ValueError, r"head"),
    ("head_rows_C_minus_1", lambda: dict(logits=_x(), target=_t(), head=torch.randn(C - 1, D)),
     ValueError, r"head"),
    ("head_1d", lambda: dict(logits=_x(), target=_t(), head=torch.randn(C)), ValueError, r"head"),
    ("head_3d", lambda: dict(logits=_x(), target=_t(), head=torch.randn(C, D, 1)), ValueError, r"head"),
    ("head_D0", lambda: dict(logits=_x(), target=_t(), head=torch.randn(C, 0)), ValueError, r"head"),
    ("head_transposed_shape", lambda: dict(logits=_x(), target=_t(), head=torch.randn(D, C)),
     ValueError, r"head"),
    ("head_int", lambda: dict(logits=_x(), target=_t(), head=torch.ones(C, D, dtype=torch.long)),
     TypeError, r"head"),
    ("head_list", lambda: dict(logits=_x(), target=_t(), head=[[0.0] * D] * C), TypeError, r"head"),
    ("head_meta_device", lambda: dict(logits=_x(), target=_t(), head=torch.randn(C, D, device="meta")),
     ValueError, r"head"),
    ("head_top2_wrong_shape", lambda: dict(logits=_x(), target=_t(), head=torch.randn(C + 1, D), mms="top2"),
     ValueError, r"head"),
    ("head_module_without_weight", lambda: dict(logits=_x(), target=_t(), head=torch.nn.ReLU()), TypeError,
     r"head.*weight"),
    ("head_string", lambda: dict(logits=_x(), target=_t(), head="fc"), TypeError, r"head"),
    ("class_weight_2d_is_the_old_head", lambda: dict(logits=_x(), target=_t(), weight=_w()), ValueError,
     r"weight.*\[C\].*head="),
    ("class_weight_C_plus_1", lambda: dict(logits=_x(), target=_t(), weight=torch.ones(C + 1)), ValueError,
     r"weight.*\[5\]"),
    ("class_weight_int", lambda: dict(logits=_x(), target=_t(), weight=torch.ones(C, dtype=torch.long)),
     TypeError, r"weight"),
    ("class_weight_list", lambda: dict(logits=_x(), target=_t(), weight=[1.0] * C), TypeError, r"weight"),
    ("class_weight_meta_device", lambda: dict(logits=_x(), target=_t(), weight=torch.ones(C, device="meta")),
     ValueError, r"weight"),
    ("label_smoothing_negative", lambda: dict(logits=_x(), target=_t(), label_smoothing=-0.1), ValueError,
     r"label_smoothing"),
    ("label_smoothing_above_1", lambda: dict(logits=_x(), target=_t(), label_smoothing=1.5), ValueError,
     r"label_smoothing"),
    ("label_smoothing_nan", lambda: dict(logits=_x(), target=_t(), label_smoothing=float("nan")), ValueError,
     r"label_smoothing"),
    ("label_smoothing_bool", lambda: dict(logits=_x(), target=_t(), label_smoothing=True), ValueError,
     r"label_smoothing"),
    ("label_smoothing_tensor", lambda: dict(logits=_x(), target=_t(), label_smoothing=torch.tensor(0.1)),
     ValueError, r"label_smoothing"),
    ("backend_unknown", lambda: dict(logits=_x(), target=_t(), backend="gpu"), ValueError, r"backend"),
    ("backend_case", lambda: dict(logits=_x(), target=_t(), backend="CPU"), ValueError, r"backend"),
    ("backend_none", lambda: dict(logits=_x(), target=_t(), backend=None), ValueError, r"backend"),
    ("mms_unknown", lambda: dict(logits=_x(), target=_t(), head=_w(), mms="top3"), ValueError, r"mms"),
    ("mms_case", lambda: dict(logits=_x(), target=_t(), head=_w(), mms="Exact"), ValueError, r"mms"),
    ("mms_int", lambda: dict(logits=_x(), target=_t(), head=_w(), mms=1), ValueError, r"mms"),
    ("mms_unknown_without_head", lambda: dict(logits=_x(), target=_t(), mms="fast"), ValueError, r"mms"),
    ("ignore_index_float", lambda: dict(logits=_x(), target=_t(), ignore_index=-100.0), TypeError, r"ignore_index"),
    ("ignore_index_bool", lambda: dict(logits=_x(), target=_t(), ignore_index=True), TypeError, r"ignore_index"),
    ("ignore_index_tensor", lambda: dict(logits=_x(), target=_t(), ignore_index=torch.tensor(-100)),
     TypeError, r"ignore_index"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises(backend, case):
    _, build, exc, pattern = case
    kwargs = build()
    logits = kwargs.pop("logits")
    target = kwargs.pop("target")
    kwargs.setdefault("backend", backend)
    with pytest.raises(exc, match=pattern):
        fastsel.score(logits, target, **kwargs)


@pytest.mark.parametrize("gpu_backend", ["cuda", "triton"])
def test_gpu_backend_on_cpu_tensors_raises(gpu_backend, monkeypatch):
    """Known GPU backends refuse CPU tensors (or say what is missing), naming the backend."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises((ValueError, RuntimeError), match=rf"backend='{gpu_backend}'"):
        fastsel.score(_x(), _t(), backend=gpu_backend)


def test_out_of_range_message_names_row_and_value(backend):
    target = torch.tensor([0, 1, 2, 17])
    with pytest.raises(IndexError, match=r"target\[3\].*17"):
        fastsel.score(_x(), target, backend=backend)
    target = torch.tensor([0, -3, 2, 1])
    with pytest.raises(IndexError, match=r"target\[1\].*-3"):
        fastsel.score(_x(), target, backend=backend)


def test_out_of_range_error_with_grad_and_weight(backend):
    """The range check also runs on the autograd path and with mms."""
    x = _x().requires_grad_(True)
    for mms in ("exact", "top2"):
        with pytest.raises(IndexError, match="target"):
            fastsel.score(x, torch.tensor([0, 1, 2, C]), head=_w(), mms=mms, backend=backend)


def test_ignore_index_in_range_is_valid_but_others_checked(backend):
    """With ignore_index=-1, -1 is fine but -100 is not; a valid call returns real values."""
    s = fastsel.score(_x(), torch.tensor([0, -1, 1, 2]), ignore_index=-1, backend=backend)
    assert s.loss[1].item() == 0.0 and s.loss[0].item() > 0
    with pytest.raises(IndexError, match="target"):
        fastsel.score(_x(), torch.tensor([0, -100, 1, 2]), ignore_index=-1, backend=backend)


def test_error_leaves_no_state(backend):
    """A failing call does not break the next valid one."""
    with pytest.raises(IndexError):
        fastsel.score(_x(), torch.tensor([0, 1, 2, 99]), backend=backend)
    x = torch.zeros(N, C)
    s = fastsel.score(x, _t(), backend=backend)
    torch.testing.assert_close(s.loss, torch.full((N,), float(torch.log(torch.tensor(float(C))))))


def test_target_on_other_device_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: cross-device target covered with the meta device above")
    with pytest.raises(ValueError, match="target"):
        fastsel.score(_x(), _t().cuda())


@pytest.mark.skipif(not fastsel.CPU_EXTENSION_AVAILABLE, reason="needs the compiled extension fastsel._C")
def test_backward_op_rejects_out_of_range_target():
    """The raw backward op checks targets in its row loop and names the first bad row."""
    logits = torch.randn(3, 4)
    lse = torch.logsumexp(logits, dim=1)
    target = torch.tensor([0, -100, 9])
    with pytest.raises(IndexError, match=r"score_backward: target\[2\] = 9"):
        torch.ops.fastsel.score_backward(torch.ones(3), logits, target, lse, -100)
    grad = torch.ops.fastsel.score_backward(torch.ones(2), logits[:2], target[:2], lse[:2], -100)
    want = torch.softmax(logits[:1], dim=1) - torch.nn.functional.one_hot(target[:1], 4)
    torch.testing.assert_close(grad[:1], want)
    assert torch.equal(grad[1], torch.zeros(4))  # ignored row
