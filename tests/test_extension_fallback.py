"""Without its compiled extension fastsel still works on pure PyTorch and says so once,
loudly, with the reason and the fix: the source tree shadowing an installed build, a
corrupt extension file, none built at all. Each case runs a fresh interpreter on a copy
of the package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import fastsel
from fastsel_test_helpers import requires_extension

PACKAGE = os.path.dirname(os.path.abspath(fastsel.__file__))
# An editable install's finder would still resolve fastsel._C to the build (a submodule is
# looked up on every finder): the probe drops it, as in an environment with fastsel
# installed into site-packages.
PROBE = ("import sys\n"
         "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]\n"
         "import json, torch, fastsel\n"
         "s = fastsel.score(torch.tensor([[0.0, 1.0]]), torch.tensor([1]))\n"
         "print(json.dumps(dict(fastsel.build_info(), loss=float(s.loss[0]), backends=fastsel.available_backends())))\n")


def _copy_sources(dest) -> str:
    """The package's Python sources alone, as in a source tree that was never built."""
    target = os.path.join(dest, "fastsel")
    shutil.copytree(PACKAGE, target, ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__"))
    return target


def _run(cwd, extra_path=()):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(extra_path))
    env.pop("PYTHONWARNINGS", None)
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


@requires_extension
def test_source_tree_shadowing_the_build_warns_naming_both(tmp_path):
    shadow = _copy_sources(tmp_path)
    info, err = _run(tmp_path, extra_path=[os.path.dirname(PACKAGE)])  # the build is on sys.path, after cwd
    assert err.count("WITHOUT its compiled extension") == 1 and "ExtensionWarning" in err
    assert "shadows the build in " + PACKAGE in err and "run from another directory" in err
    assert info["available"] is False and info["package_dir"] == shadow
    assert "shadows" in info["reason"] and "another directory" in info["fix"]
    assert abs(info["loss"] - 0.31326168751822286) < 1e-6 and info["backends"] == ["torch"]


def test_a_corrupt_extension_file_warns_and_falls_back(tmp_path):
    pkg = _copy_sources(tmp_path)
    with open(os.path.join(pkg, "_C.cpython-311-x86_64-linux-gnu.so"), "wb") as f:
        f.write(b"not an ELF file" * 100)
    info, err = _run(tmp_path)
    assert "could not be loaded" in err and "rebuild it" in err
    assert info["available"] is False and "could not be loaded" in info["reason"]
    assert abs(info["loss"] - 0.31326168751822286) < 1e-6


def test_never_built_says_how_to_install(tmp_path, monkeypatch):
    """No build anywhere (an editable install here always has one, so the diagnosis is
    asked directly): the reason names the directory, the fix the install command."""
    from fastsel import _extension

    monkeypatch.setattr(_extension, "_PACKAGE_DIR", str(tmp_path))
    monkeypatch.setattr(_extension, "_compiled_builds_elsewhere", lambda: [])
    reason, fix = _extension._diagnose("No module named 'fastsel._C'")
    assert reason == f"fastsel._C is not built in {tmp_path} (No module named 'fastsel._C')"
    assert "pip install --no-build-isolation" in fix and "g++" in fix
    reason, fix = _extension._diagnose("/x/_C.so: undefined symbol: _ZN3c10")
    assert "another torch" in reason and "rebuild" in fix
    reason, fix = _extension._diagnose("module 'fastsel._C' has no attribute 'runnable_isas'")
    assert "older fastsel source" in reason and "runnable_isas" in reason and "rebuild" in fix


def test_the_fallback_can_be_accepted_silently(tmp_path):
    _copy_sources(tmp_path)
    env = dict(os.environ, FASTSEL_ALLOW_FALLBACK="1", PYTHONPATH="")
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "WITHOUT" not in out.stderr, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["available"] is False


@requires_extension
def test_the_build_loads_silently():
    out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", PROBE],
                         cwd=os.path.dirname(PACKAGE), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["available"] is True and "cpu" in info["backends"]
