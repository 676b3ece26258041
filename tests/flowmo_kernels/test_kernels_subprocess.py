"""Runs the kernel tests in a fresh process with TRITON_INTERPRET=1 when this process cannot (see conftest)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNEL_TESTS = Path(__file__).parent


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the kernel tests run in this process")
def test_kernel_tests_in_interpreter_process(request):
    command = [sys.executable, "-m", "pytest", str(KERNEL_TESTS), "-q", "-p", "no:cacheprovider"]
    if request.config.option.markexpr:
        command += ["-m", request.config.option.markexpr]
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(command, env=env, cwd=request.config.rootpath, capture_output=True, text=True)
    output = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, f"kernel tests failed in the interpreter process:\n{output}"
