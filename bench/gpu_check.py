#!/usr/bin/env python
"""``make gpu-check``: on a machine with a CUDA device, build fastsel's CUDA extension,
run the GPU-only tests and a short GPU benchmark of every op, and print a summary; on a
machine without one, say so and exit 0.

The project's venv pins a CPU build of torch, so the check makes a venv of its own,
``.venv-gpu``, with the CUDA build of the same torch version (``TORCH_CUDA_INDEX``,
default the PyTorch index for CUDA 12.8), builds fastsel into it with
``FASTSEL_BUILD_CUDA=1`` for the device's architecture, then runs tests/test_gpu_backends.py,
the GPU-only tests of tests/triton/ and ``bench_score.py`` / ``bench_select.py
--representative``. Written without a GPU to try it on: its first run is its test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-gpu"
TORCH = "torch==2.13.0"
INDEX = os.environ.get("TORCH_CUDA_INDEX", "https://download.pytorch.org/whl/cu128")


def devices() -> list[str]:
    """The CUDA devices nvidia-smi lists (none without a driver)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    out = subprocess.run([smi, "-L"], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if line.startswith("GPU ")] if out.returncode == 0 else []


def step(name: str, cmd: list[str], env=None) -> tuple[str, bool, float]:
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    ok = subprocess.run(cmd, cwd=ROOT, env=env).returncode == 0
    return name, ok, time.monotonic() - start


def main() -> int:
    found = devices()
    if not found:
        print("gpu-check: no CUDA device on this machine (nvidia-smi lists none): nothing to check.")
        return 0
    print("gpu-check: " + "; ".join(found))
    py = VENV / "bin" / "python"
    results = []
    if not py.exists():
        results.append(step("venv", [sys.executable, "-m", "venv", str(VENV)]))
    results.append(step("torch (CUDA build)", [str(py), "-m", "pip", "install", "--quiet", TORCH, "--index-url", INDEX]))
    results.append(step("dependencies", [str(py), "-m", "pip", "install", "--quiet", "-r", "requirements.txt"]))
    env = dict(os.environ, FASTSEL_BUILD_CUDA="1", MAX_JOBS=str(os.cpu_count() or 2))
    env.pop("TORCH_CUDA_ARCH_LIST", None)  # the device's own architecture
    results.append(step("build with CUDA", [str(py), "-m", "pip", "install", "--quiet", "--no-build-isolation",
                                            "--no-deps", "-e", "."], env))
    results.append(step("GPU tests", [str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                      "tests/test_gpu_backends.py",
                                      "tests/triton/test_triton_score.py::test_gpu_vocabulary_sizes",
                                      "tests/triton/test_triton_score.py::test_gpu_launchers_do_not_sync"]))
    results.append(step("score benchmark", [str(py), "bench/bench_score.py", "--representative", "--out",
                                            "bench/results/gpu-check"]))
    results.append(step("selection benchmark", [str(py), "bench/bench_select.py", "--representative", "--out",
                                                "bench/results/gpu-check"]))
    print("\n=== gpu-check summary")
    for name, ok, seconds in results:
        print(f"  {'PASS' if ok else 'FAIL'}  {name:22s} {seconds:7.1f} s")
    print(f"  total {sum(s for _, _, s in results):.0f} s; benchmark tables in bench/results/gpu-check/")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
