"""The scoring op's contract (fastsel/contract.py) is the one definition of its outputs:
the generated C++ header is current, every op's schema is the contract's, every backend
returns the contract's outputs (shapes, dtypes, values), and a new output in the
contract reaches the C++ structures without touching them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastsel
from fastsel import contract, reference
from fastsel._extension import CPU_EXTENSION_AVAILABLE

ROOT = Path(__file__).resolve().parents[1]
needs_ext = pytest.mark.skipif(not CPU_EXTENSION_AVAILABLE, reason="needs the compiled extension")


def _schema(qualified_schema: str) -> str:
    return str(torch._C.parse_schema(qualified_schema))


def test_the_generated_header_is_current():
    proc = subprocess.run([sys.executable, str(ROOT / "csrc" / "write_contract_header.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_header_checker_sees_a_stale_header(tmp_path):
    """--check fails on a header that differs (a copy of the repository's two files)."""
    (tmp_path / "fastsel").mkdir()
    (tmp_path / "csrc" / "include" / "fastsel").mkdir(parents=True)
    shutil.copy(ROOT / "fastsel" / "contract.py", tmp_path / "fastsel" / "contract.py")
    shutil.copy(ROOT / "csrc" / "write_contract_header.py", tmp_path / "csrc" / "write_contract_header.py")
    header = tmp_path / contract.HEADER
    header.write_text(contract.cpp_header().replace("X(lse)", "X(lse_renamed)"))
    script = str(tmp_path / "csrc" / "write_contract_header.py")
    assert subprocess.run([sys.executable, script, "--check"], capture_output=True).returncode == 1
    assert subprocess.run([sys.executable, script], capture_output=True).returncode == 0
    assert header.read_text() == contract.cpp_header()
    assert subprocess.run([sys.executable, script, "--check"], capture_output=True).returncode == 0


def _compiled_and_triton_schemas():
    yield "score_forward", contract.score_forward_schema()
    yield "score_backward", contract.score_backward_schema()
    for name, signature in contract.SELECTION_SCHEMAS.items():
        yield name, name + signature


@needs_ext
@pytest.mark.parametrize("name,schema", list(_compiled_and_triton_schemas()))
def test_compiled_ops_have_the_contracts_schemas(name, schema):
    op = getattr(torch.ops.fastsel, name).default
    assert str(op._schema) == _schema("fastsel::" + schema)


@pytest.mark.parametrize("name,schema", list(_compiled_and_triton_schemas()))
def test_triton_ops_have_the_same_schemas(name, schema):
    """Registered at import (no triton import needed): same arguments, defaults and
    returns as the compiled op, under the name triton_<name>."""
    op = getattr(torch.ops.fastsel, f"triton_{name}").default
    assert str(op._schema) == _schema(f"fastsel::triton_{schema}")


def test_scores_fields_are_the_contracts():
    assert fastsel.Scores._fields == contract.OUTPUT_NAMES + ("cross_entropy",)
    assert fastsel.Scores is reference.Scores is contract.Scores
    assert contract.OUTPUT_NAMES[contract.SAVED_OUTPUT] == "lse"
    s = contract.scores_from_outputs([torch.zeros(2)] * len(contract.SCORE_OUTPUTS), with_mms=False)
    assert s.mms is None and s.cross_entropy is None and s.plain_loss() is s.loss
    assert type(s._replace(loss=torch.ones(2))) is contract.Scores
    with pytest.raises(ValueError, match="9 outputs"):
        contract.scores_from_outputs([torch.zeros(2)] * 3, with_mms=False)


def _backends():
    """Those this process runs (Triton: tests/triton, under its interpreter)."""
    return [b for b in fastsel.available_backends() if b != "triton"]


def check_outputs_follow_contract(backend, mms, n, c, dtype):
    """Each output as the fake describes it (shape, dtype) and, field by field, as the
    float64 reference: a new output of the contract is checked without a new test. Rows
    of every kind: an ignored target, a NaN row, a row of -inf but one class."""
    g = torch.Generator().manual_seed(n + c)
    logits = (torch.randn(n, c, generator=g) * 3).to(dtype)
    target = torch.randint(0, c, (n,), generator=g)
    if n:
        target[1] = -100
        logits[2, 0] = float("nan")
        logits[-1] = float("-inf")
        logits[-1, target[-1]] = 1.0
    head = torch.randn(c, 4, generator=g) if mms else None
    mode = contract.MMS_MODES[mms] if mms else contract.MMS_NONE
    device = "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"
    got = fastsel.score(logits.to(device), target.to(device), head=None if head is None else head.to(device),
                        mms=mms or "exact", backend=backend)
    got = got._replace(**{name: None if t is None else t.cpu() for name, t in got._asdict().items()})
    fake = contract.empty_outputs(logits, mode)
    want = reference.score_reference(logits.double(), target, -100, None if head is None else head.double(),
                                     mms or "exact")
    for i, o in enumerate(contract.SCORE_OUTPUTS):
        value = getattr(got, o.name)
        if o.kind == "mms" and mms is None:
            assert value is None and fake[i].shape == (0,)
            continue
        assert value.shape == fake[i].shape and value.dtype == fake[i].dtype, o.name
        expected = getattr(want, o.name)
        if o.kind == "index":
            assert torch.equal(value, expected), o.name
        else:
            tol = 1e-12 if dtype == torch.float64 else 1e-4
            torch.testing.assert_close(value.double(), expected, rtol=tol, atol=tol, equal_nan=True, msg=o.name)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("mms", [None, "exact", "top2"])
@pytest.mark.parametrize("n,c", [(0, 5), (6, 5), (67, 5), (37, 300)])  # rows one by one, in lanes, long rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_every_backend_returns_the_contracts_outputs(backend, mms, n, c, dtype):
    check_outputs_follow_contract(backend, mms, n, c, dtype)


@needs_ext
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_the_op_and_its_fake_agree(mode):
    logits = torch.randn(4, 3)
    target = torch.tensor([0, 1, 2, 0])
    weight = torch.randn(3, 2) if mode else None
    out = torch.ops.fastsel.score_forward(logits, target, -100, weight, mode)
    fake = contract.empty_outputs(logits, mode)
    assert len(out) == len(fake) == len(contract.SCORE_OUTPUTS)
    for o, t, f in zip(contract.SCORE_OUTPUTS, out, fake):
        assert (t.shape, t.dtype) == (f.shape, f.dtype), o.name


def test_no_source_lists_the_outputs_by_hand():
    """The outputs are named in one place: no other source spells out their list."""
    pattern = ", ".join(contract.OUTPUT_NAMES[:3])  # "loss, entropy, margin"
    sources = [p for p in list((ROOT / "fastsel").rglob("*.py")) + list((ROOT / "csrc").rglob("*"))
               if p.is_file() and p.suffix in (".py", ".h", ".cpp", ".cu", ".cuh")]
    offenders = [str(p.relative_to(ROOT)) for p in sources
                 if pattern in p.read_text() and p.name != "contract.py"]
    assert offenders == []


def _compiler():
    return shutil.which("g++") or shutil.which("c++")


@pytest.mark.skipif(_compiler() is None, reason="needs a C++ compiler")
def test_a_new_output_reaches_the_cpp_structures(tmp_path):
    """Adding an output to the contract is enough for the C++ buffers, the per-row
    scores, the op's tuple type and the schema: a translation unit built against the
    header generated from a contract with one more output sees it everywhere."""
    new = contract.Output("extra", "row", "a new per-row score")
    outputs = contract.SCORE_OUTPUTS + (new,)
    include = tmp_path / "include" / "fastsel"
    include.mkdir(parents=True)
    (include / "score_contract.h").write_text(contract.cpp_header(outputs))
    source = tmp_path / "probe.cpp"
    source.write_text(r'''
#include <string_view>
#include <type_traits>
#include "fastsel/op_contract.h"
#include "fastsel/row_scores.h"
static_assert(std::tuple_size<fastsel::ScoreOutputs>::value == 10, "ScoreOutputs follows the contract");
static_assert(std::is_same_v<decltype(fastsel::RowScores<float>{}.extra), float>, "RowScores has the new field");
static_assert(std::string_view(FASTSEL_SCORE_FORWARD_SCHEMA).find("Tensor lse, Tensor extra)") !=
              std::string_view::npos, "the schema returns it");
fastsel::ScoreOutputs outputs(const fastsel::ScoreBuffers& b) { return b.outputs(); }
at::Tensor extra(const fastsel::ScoreBuffers& b) { return b.extra; }
fastsel::RowScores<float> invalid_row() {
  return fastsel::finalize_row(fastsel::SoftmaxState<float>{}, fastsel::Top2<float>{}, 0.f, 0);
}
''')
    torch_include = Path(torch.__file__).parent / "include"
    cmd = [_compiler(), "-std=c++17", "-fsyntax-only", f"-I{tmp_path / 'include'}", f"-I{ROOT / 'csrc' / 'include'}",
           f"-I{torch_include}", f"-I{torch_include / 'torch' / 'csrc' / 'api' / 'include'}", str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    # and the unchanged header does not have it: the probe can fail
    (include / "score_contract.h").write_text(contract.cpp_header())
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode != 0 and "extra" in proc.stderr
