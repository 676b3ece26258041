"""Running the training commands as subprocesses, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def command_env() -> dict:
    """Environment for a training subprocess: one thread per process (the CPUs are shared)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_command(args: list, timeout: float = 600, nproc: int = 0) -> subprocess.CompletedProcess:
    """`python -m ...` (nproc=0) or `torchrun --standalone --nproc-per-node=nproc -m ...`; stdout+stderr kept."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc else [sys.executable]
    return subprocess.run(
        launcher + ["-m", *map(str, args)], cwd=REPO, env=command_env(), capture_output=True, text=True, timeout=timeout
    )


def check(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit code {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout
