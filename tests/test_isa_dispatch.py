"""One build runs on AVX-512, AVX2 and portable CPUs: the CPU kernels are compiled once
per instruction set into the extension (csrc/cpu/isa/) and the running CPU picks one.

* The binary holds no 256- or 512-bit vector instruction outside the functions of the
  ISA that may use it (an inline function of a shared header kept in its AVX-512 copy
  would kill an AVX2 CPU with an illegal instruction): read from ``objdump -d``.
* Every compiled ISA this CPU can run passes the CPU tests of the scoring and selection
  ops, forced with ``FASTSEL_CPU_ISA`` in a fresh interpreter.
* Forcing an unknown, uncompiled or unrunnable ISA is a clear error.
* The build run on CPUs emulated by qemu-user without AVX-512 and without AVX picks the
  kernels they run (from CPUID) and gives the same values and selections.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastsel
from fastsel import _extension
from fastsel_test_helpers import requires_extension

ROOT = Path(__file__).resolve().parent.parent
ISA_TESTS = ["tests/test_score_values.py", "tests/test_score_properties.py", "tests/test_select_ops.py"]
X86 = platform.machine().lower() in ("x86_64", "amd64")


def _run(code: str, isa: str):
    env = dict(os.environ, FASTSEL_CPU_ISA=isa)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@requires_extension
def test_build_info_reports_the_isas():
    info = fastsel.build_info()
    assert info["isas_compiled"] == (["avx512", "avx2", "none"] if X86 else ["none"])
    assert info["isa"] == next(i for i in info["isas_compiled"] if i in info["isas_runnable"])
    assert "none" in info["isas_runnable"]


@requires_extension
@pytest.mark.skipif(not X86 or shutil.which("objdump") is None, reason="needs x86-64 and objdump")
def test_no_vector_code_outside_its_isa():
    so = fastsel._extension._C.__file__
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", so], capture_output=True, text=True,
                             check=True).stdout
    wide = {"avx512": None, "avx2": re.compile(r"%zmm|%k[0-7]\b"), "base": re.compile(r"%[yz]mm|%k[0-7]\b")}
    func, found, checked = None, {}, 0
    for line in listing.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            func = head.group(1)
            # ISA of a (mangled) symbol: its namespace, ATen's vector namespace, or a
            # template argument or OpenMP region of either
            isa = ("avx512" if re.search(r"6avx512|6AVX512", func) else
                   "avx2" if re.search(r"4avx2|4AVX2", func) else "base")
            checked += 1
            continue
        if func is None or wide[isa] is None or not line.startswith(" "):
            continue
        if wide[isa].search(line):
            found.setdefault(func, (isa, line.strip()))
    assert checked > 100
    assert not found, "vector instructions outside their ISA's code:\n" + "\n".join(
        f"{isa}: {f[:120]}: {ins}" for f, (isa, ins) in list(found.items())[:20])


@requires_extension
@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx2", "none"])
def test_the_other_isas_pass_the_cpu_tests(isa):
    if isa not in fastsel.build_info()["isas_compiled"] or isa not in fastsel.build_info()["isas_runnable"]:
        pytest.skip(f"{isa} is not compiled or not runnable here")
    probe = _run("import fastsel; print(fastsel.build_info()['isa'])", isa)
    assert probe.returncode == 0 and probe.stdout.split()[-1] == isa, probe.stderr[-2000:]
    env = dict(os.environ, FASTSEL_CPU_ISA=isa)
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "cpu",
                          *ISA_TESTS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
    assert " passed" in run.stdout


@requires_extension
def test_forcing_an_isa():
    for bad, message in (("avx1024", "must be auto, avx512, avx2 or none"),):
        out = _run("import fastsel", bad)
        assert out.returncode != 0 and message in out.stderr
    out = _run("import fastsel; print(fastsel.build_info()['isa'])", "none")
    assert out.returncode == 0 and out.stdout.split()[-1] == "none"


def test_choose_isa():
    choose = _extension.choose_isa
    compiled = ["avx512", "avx2", "none"]
    assert choose("auto", compiled, ["avx512", "avx2", "none"]) == "avx512"
    assert choose("auto", compiled, ["avx2", "none"]) == "avx2"          # an AVX2-only CPU
    assert choose("", compiled, ["none"]) == "none"
    assert choose("avx2", compiled, ["avx512", "avx2", "none"]) == "avx2"
    with pytest.raises(RuntimeError, match="this CPU cannot run avx512 code"):
        choose("avx512", compiled, ["avx2", "none"])
    with pytest.raises(RuntimeError, match="compiled for none only"):
        choose("avx2", ["none"], ["avx2", "none"])


QEMU = shutil.which("qemu-x86_64")
# CPU models qemu-user emulates, and the kernels the build must pick on them: Haswell has
# AVX2, FMA and F16C but no AVX-512; Nehalem has no AVX at all.
EMULATED_CPUS = {"Haswell": "avx2", "Nehalem": "none"}
_PROBE = r'''
import json, torch, fastsel
from fastsel import reference
g = torch.Generator().manual_seed(0)
x = torch.randn(300, 257, generator=g) * 3
t = torch.randint(0, 257, (300,), generator=g)
w = torch.randn(257, 16, generator=g)
s = fastsel.score(x, t, head=w)
r = reference.score_reference(x.double(), t, -100, w.double())
# no NaN hidden: the reference has none for these rows, so a NaN makes err NaN and fails
err = max(float((getattr(s, n).double() - getattr(r, n)).abs().max())
          for n in ("loss", "entropy", "margin", "true_margin", "grad_norm", "confidence", "lse", "mms"))
xs, ts = x[:, :10].contiguous(), t % 10  # C = 10: the rows in lanes (the row-wise path above)
small, small_r = fastsel.score(xs, ts), reference.score_reference(xs.double(), ts)
err = max(err, max(float((getattr(small, n).double() - getattr(small_r, n)).abs().max())
                   for n in ("loss", "entropy", "margin", "grad_norm", "lse")))
z = x.clone().requires_grad_(True)
grad, = torch.autograd.grad(fastsel.score(z, t).loss.sum(), z)
ref_grad = torch.softmax(x.double(), 1) - torch.nn.functional.one_hot(t, 257).double()
imp = torch.rand(5000, generator=g)
print(json.dumps({
    "isa": fastsel.build_info()["isa"], "torch_isa": torch.backends.cpu.get_cpu_capability(), "err": err, "grad_err": float((grad.double() - ref_grad).abs().max()),
    "pred": torch.equal(s.pred, r.pred), "topk": fastsel.select_topk(imp, 50).indices.tolist(),
    "sample": fastsel.sample(imp, 50, seed=3).indices.tolist(),
    "sample_replacement": fastsel.sample(imp, 50, replacement=True, seed=3).indices.tolist(),
    "percentile": fastsel.percentile(imp[:100], imp[100:]).tolist()}))
'''


def _probe(prefix: list, env: dict) -> dict:
    import json

    env = {k: v for k, v in env.items() if k not in ("TRITON_INTERPRET", "FASTSEL_CPU_ISA")} | {"OMP_NUM_THREADS": "2"}
    proc = subprocess.run(prefix + [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@requires_extension
@pytest.mark.skipif(not X86 or QEMU is None, reason="needs x86-64 and qemu-user (qemu-x86_64)")
@pytest.mark.parametrize("model,isa", EMULATED_CPUS.items())
def test_the_build_runs_on_an_emulated_older_cpu(model, isa):
    """The one build on a CPU without AVX-512 (or without AVX), emulated by qemu-user,
    whose CPUID says so while /proc/cpuinfo still shows this machine's flags: the
    extension picks the kernels that CPU runs by itself, gives the float64 reference's
    values and the same selections as this CPU for one seed."""
    got = _probe([QEMU, "-cpu", model], dict(os.environ))
    if isa == "avx2" and got["torch_isa"] != "AVX2":  # qemu before 7.2 emulates no AVX2
        pytest.skip(f"this qemu-user does not emulate AVX2 on {model} (torch sees {got['torch_isa']})")
    assert got["isa"] == isa
    assert got["err"] < 1e-4 and got["grad_err"] < 1e-5 and got["pred"]
    host = _probe([], dict(os.environ))
    for key in ("topk", "sample", "sample_replacement", "percentile"):
        assert got[key] == host[key], key
