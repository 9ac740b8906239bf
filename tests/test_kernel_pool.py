"""The kernels' thread pool under stress: a ThreadSanitizer run of the pool alone, and kernel
calls from several Python threads while busy processes take the cores (short runs here; the
long ones are `make tsan` and benchmarks/stress_kernels.py --seconds 600)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cake.text import kernels

ROOT = Path(__file__).resolve().parent.parent
CI = os.environ.get("CI") == "true"


def need(ok: bool, why: str) -> None:
    if not ok:
        if CI:
            pytest.fail(f"{why} (CI=true: an install step is missing)")
        pytest.skip(why)


def test_pool_is_race_free_under_thread_sanitizer(tmp_path):
    cxx = os.environ.get("CXX", "c++")
    need(shutil.which(cxx) is not None, f"no C++ compiler ({cxx})")
    exe = tmp_path / "pool_stress"
    build = subprocess.run([cxx, "-std=c++17", "-O1", "-g", "-fsanitize=thread",
                            str(ROOT / "tests/native/pool_stress.cpp"), "-o", str(exe),
                            "-lpthread"], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe), "4", "3", "4"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TSAN_OPTIONS": "halt_on_error=1 exitcode=66"})
    assert "ThreadSanitizer" not in run.stderr, run.stderr[-4000:]
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    assert " 0 failures" in run.stdout


def test_kernel_calls_from_many_threads_under_contention():
    need(kernels.ops() is not None, f"no kernels: {kernels.error()}")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/stress_kernels.py"),
                          "--seconds", "8", "--threads", "4", "--pool", "4", "--busy", "2"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout}\n{run.stderr[-3000:]}"
    assert '"mismatches": 0, "errors": 0' in run.stdout
