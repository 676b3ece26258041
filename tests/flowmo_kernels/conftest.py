"""Kernel tests run the Triton kernels in Triton's CPU interpreter (TRITON_INTERPRET=1).

Triton reads the variable when it is imported (its own library functions are decorated then), so it must
be set before anything imports triton. Run on their own (`pytest tests/kernels`), these tests set it here.
In a larger run something may have imported triton already (torchvision does, through torch._dynamo):
then the kernel tests are skipped in this process and `test_kernels_subprocess.py` runs them all in a
fresh interpreter-mode process instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

KERNEL_TESTS = Path(__file__).parent


def _enable_interpreter() -> bool:
    """True when Triton kernels can run interpreted in this process."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    if "triton" in sys.modules:
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    return True


IN_PROCESS = _enable_interpreter()


def pytest_collection_modifyitems(config, items):
    if IN_PROCESS:
        return
    skip = pytest.mark.skip(reason="triton was imported before TRITON_INTERPRET=1; run by test_kernels_subprocess.py")
    for item in items:
        if KERNEL_TESTS in item.path.parents and item.path.name != "test_kernels_subprocess.py":
            item.add_marker(skip)
