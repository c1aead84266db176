"""The microbenchmarks that ``make bench`` runs: the default is the headline shape in
about a minute (``--representative``), the full grids need ``FULL=1``; a smoke run of
each script writes its table, CSV and plot."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_score  # noqa: E402
import bench_select  # noqa: E402


def test_make_bench_defaults_to_the_representative_run():
    def dry(*args):
        out = subprocess.run(["make", "-n", "-o", ".venv/.ext-built", "bench", *args], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        return [line for line in out.splitlines() if "bench/bench_" in line]

    default = dry()
    assert len(default) == 2 and all("--representative --out bench/results/local" in line for line in default)
    full = dry("FULL=1")
    assert len(full) == 2 and not any("--representative" in line for line in full)
    assert "bench/results/local/" in (ROOT / ".gitignore").read_text()


def test_representative_options():
    args = bench_score.parse_args(["--representative"])
    assert args.shapes == [(65536, 1000)] and args.dtypes == ["float32"]
    assert bench_score.parse_args([]).shapes == bench_score.DEFAULT_SHAPES
    assert bench_score.parse_args(["--representative", "--shapes", "1024x10"]).shapes == [(1024, 10)]
    for module in (bench_score, bench_select):
        with pytest.raises(SystemExit):
            module.parse_args(["--quick", "--representative"])
        assert module.parse_args(["--representative"]).representative


@pytest.mark.parametrize("script, outputs", [("bench_score.py", ("score_bench.csv", "score_bench.png")),
                                             ("bench_select.py", ("select_bench.csv", "select_bench.png"))])
def test_quick_run_writes_its_results(tmp_path, script, outputs):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick", "--repeats", "1",
                          "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in outputs:
        assert (tmp_path / name).stat().st_size > 0
    rows = list(csv.DictReader(open(tmp_path / outputs[0])))
    assert rows and any("fastsel" in " ".join(r.values()) for r in rows)


def test_gpu_check_without_a_device_says_so_and_passes():
    """make gpu-check on this CPU machine: the message and exit status 0 (with a device it
    builds and runs the GPU checks: bench/gpu_check.py)."""
    import re
    import shutil

    if shutil.which("nvidia-smi"):
        pytest.skip("a CUDA driver is present: make gpu-check does the real run")
    out = subprocess.run(["make", "-s", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "no CUDA device on this machine" in out.stdout
    named = re.findall(r'"(tests/[\w/]+\.py)(?:::(\w+))?"', (ROOT / "bench" / "gpu_check.py").read_text())
    assert ("tests/test_gpu_backends.py", "") in named and len(named) == 3
    for path, test in named:  # every file and test the check runs exists
        assert (ROOT / path).exists() and (not test or f"def {test}(" in (ROOT / path).read_text()), (path, test)
