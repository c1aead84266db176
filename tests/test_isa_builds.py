"""The CPU kernels built for the other vector ISAs pass the CPU tests too.

``setup.py`` builds the kernels for the widest ISA of the building CPU (AVX-512, AVX2 or
the portable fallback), so the main test run covers one of them. Each ISA has its own
hand-written paths (exp, masks, reductions, NaN detection), so here the extension is
rebuilt in a temporary copy of the project for every other ISA this CPU can run, and
the CPU tests of the scoring and selection ops run against that copy in a subprocess.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastsel
from fastsel._isa import ISA_FLAGS, runnable

ROOT = Path(__file__).resolve().parent.parent
# The tests that exercise the ISA-specific code of csrc/cpu.
ISA_TESTS = ["tests/test_score_values.py", "tests/test_score_properties.py", "tests/test_select_ops.py"]


def _other_isas():
    built = fastsel.build_info().get("isa") if fastsel.CPU_EXTENSION_AVAILABLE else None
    for isa in ISA_FLAGS:
        reason = None
        if isa == built:
            reason = "the main build: covered by the main test run"
        elif not runnable(isa):
            reason = f"this CPU cannot run {isa} code"
        yield pytest.param(isa, marks=pytest.mark.skip(reason=reason) if reason else (), id=isa)


@pytest.mark.slow
@pytest.mark.parametrize("isa", list(_other_isas()))
def test_cpu_tests_pass_when_built_for(isa, tmp_path):
    copy = tmp_path / "fastsel-src"
    copy.mkdir()
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, copy / name)
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "build", "*.egg-info")
    for name in ("csrc", "fastsel", "tests"):
        shutil.copytree(ROOT / name, copy / name, ignore=ignore)

    env = dict(os.environ, FASTSEL_CPU_ISA=isa, FASTSEL_BUILD_CUDA="0", PYTHONPATH=str(copy))
    env.pop("TRITON_INTERPRET", None)
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=copy,
                           env=env, capture_output=True, text=True, timeout=1200)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]

    probe = subprocess.run(
        [sys.executable, "-c", "import fastsel; print(fastsel.__file__); print(fastsel.build_info()['isa'])"],
        cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    where, built = probe.stdout.split()
    assert Path(where).resolve().is_relative_to(copy.resolve()), where  # the copy, not the main build
    assert built == isa

    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "cpu", *ISA_TESTS],
        cwd=copy, env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
    assert " passed" in run.stdout
