"""Running the training commands as subprocesses, as a user would."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import torch

from flowmo_fast.formats.checkpoint import read_checkpoint

REPO = Path(__file__).resolve().parents[2]


def command_env() -> dict:
    """Environment for a training subprocess: one thread per process (the CPUs are shared)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def command_line(args: list, nproc: int = 0) -> list[str]:
    """`python -m ARGS` (nproc=0) or `torchrun --standalone --nproc-per-node=nproc -m ARGS`."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc else [sys.executable]
    return launcher + ["-m", *map(str, args)]


def run_command(args: list, timeout: float = 600, nproc: int = 0) -> subprocess.CompletedProcess:
    """`command_line(args, nproc)` run to its end; stdout+stderr kept."""
    return subprocess.run(command_line(args, nproc), cwd=REPO, env=command_env(), capture_output=True, text=True,
                          timeout=timeout)


def stop_with_sigterm(args: list, nproc: int = 0) -> int:
    """Start `command_line(args, nproc)` (a training command with trainer.log_every=1), send SIGTERM once it logs a
    step in 3..9, and return the step it says it stopped after."""
    proc = subprocess.Popen(command_line(args, nproc), cwd=REPO, env=command_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if re.match(r"step [3-9] \|", line):
            proc.send_signal(signal.SIGTERM)
            break
    seen.append(proc.stdout.read())
    proc.wait(timeout=120)
    stopped = re.search(r"stopped by SIGTERM after step (\d+)", "".join(seen))
    assert stopped, "".join(seen)[-3000:]
    return int(stopped.group(1))


def assert_same_training_state(resumed_path, reference_path) -> None:
    """Two checkpoints hold the same weights, EMA weights and optimizer moments bit for bit, and the same data
    position (a resumed run against a straight one)."""
    resumed, reference = read_checkpoint(resumed_path), read_checkpoint(reference_path)
    for key in ("model_state_dict", "model_ema_state_dict"):
        for name, value in reference[key].items():
            assert torch.equal(resumed[key][name], value), (key, name)
    for pid, state in reference["optimizer_state_dict"]["state"].items():
        for k, v in state.items():
            assert torch.equal(resumed["optimizer_state_dict"]["state"][pid][k], v), (pid, k)
    assert resumed["data_position"] == reference["data_position"]


def check(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit code {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def log_lines(stdout: str) -> dict[int, dict[str, float]]:
    """{step: {name: value}} from the lines `step N | name value | ...`."""
    out = {}
    for m in re.finditer(r"^step (\d+) \| (.*)$", stdout, re.M):
        out[int(m.group(1))] = {k: float(v) for k, v in (part.rsplit(" ", 1) for part in m.group(2).split(" | "))}
    return out


def pretrain_tiny_in_process(results, name: str, steps: int, data, batch: int, capsys, says: tuple[str, ...]) -> dict:
    """train.pretrain in this process on a tiny one-block model of 16-px crops of `data` (data.data_dir: a folder
    or shards), `batch` images a step, to `steps`; asserts it ran and printed each line of `says`; returns the
    step's checkpoint."""
    from flowmo_fast.formats.checkpoint import read_checkpoint
    from train import pretrain

    code = pretrain.main([str(a) for a in [
        "--preset", "tiny", "data.image_size=16", f"data.batch_size={batch}", f"data.data_dir={data}",
        "model.enc_depth=1", "model.dec_depth=1", "--results-dir", results, "--experiment-name", name,
        f"trainer.max_steps={steps}", "trainer.log_every=1", "trainer.sample_every=1000",
        "trainer.checkpoint_every=1000", "eval.sampling.sample_steps=1",
    ]])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    for line in says:
        assert line in out
    return read_checkpoint(Path(results) / name / "checkpoints" / f"{steps:08d}.pth")
