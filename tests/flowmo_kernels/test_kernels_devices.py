"""Every Triton launch runs on its tensors' device. Triton launches on the *current* CUDA device (and its
current stream), not the tensors': with tensors on cuda:1 and device 0 current a kernel fails ("Pointer
argument cannot be accessed from Triton"). On the CPU: each op's body runs on fake cuda:1 tensors with
device 0 current, every launch recorded with the device current at that moment. On two GPUs: the ops on
cuda:1, device 0 current, equal the PyTorch twins (in a process without the interpreter).

Run as a script (`python tests/flowmo_kernels/test_kernels_devices.py [DEVICE]`), it runs that comparison.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from flowmo_kernels import adaln_triton, lfq_triton, rope_triton  # noqa: E402
from flowmo_kernels.rope import rope_tables  # noqa: E402

KERNELS = {
    name: getattr(module, name)
    for module in (adaln_triton, lfq_triton, rope_triton)
    for name in dir(module)
    if name.endswith("_kernel")
}


@dataclass(frozen=True)
class Launch:
    kernel: str
    current: int  # the CUDA device current at the launch
    tensors: frozenset  # the devices of its tensor arguments


class LaunchRecorder:
    """A current CUDA device (what `torch.cuda.device` switches, faked) and every kernel launch, recorded
    instead of run."""

    def __init__(self, monkeypatch, current: int = 0):
        self.current = current
        self.launches: list[Launch] = []
        monkeypatch.setattr(torch.cuda, "_exchange_device", self.exchange)
        monkeypatch.setattr(torch.cuda, "_maybe_exchange_device", self.exchange)
        for kernel_class in {type(k) for k in KERNELS.values()}:
            monkeypatch.setattr(kernel_class, "run", self.recorder())

    def exchange(self, index: int) -> int:
        previous = self.current
        if index >= 0:
            self.current = index
        return previous

    def recorder(self):
        def run(kernel, *args, grid, warmup, **kwargs):
            devices = frozenset(a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
            self.launches.append(Launch(kernel.__name__, self.current, devices))

        return run


def op_body(op):
    """The Python function a `torch.library.custom_op` wraps (called directly: under fake tensors the op
    itself would run its fake implementation, which launches nothing)."""
    body = getattr(op, "_init_fn", None)
    if body is None:
        raise RuntimeError(f"{op} has no `_init_fn` in torch {torch.__version__}: update op_body for this version")
    return body


def run_every_op_body(device: str) -> None:
    """Forward and backward of every custom op, on small tensors on `device` (fake ones, see the test)."""
    def rand(*shape):
        return torch.randn(*shape, device=device)

    x = rand(40, 9)
    h, shift, scale, y = rand(2, 7, 24), rand(2, 24), rand(2, 24), rand(2, 7, 24)
    q, weight = rand(2, 2, 5, 16), rand(16)
    cos, sin = (t.to(device) for t in rope_tables(torch.zeros(5, 3, dtype=torch.int64), (4, 6, 6)))
    _, _, _, _, _, bit_probs, mean_probs = op_body(lfq_triton.lfq_op)(x, True)
    op_body(lfq_triton.lfq_backward_op)(x, bit_probs, mean_probs, rand(40, 9), rand(3))
    _, mean, rstd = op_body(adaln_triton.modulate_op)(h, shift, scale, torch.float32)
    op_body(adaln_triton.modulate_backward_op)(h, scale, mean, rstd, y)
    op_body(adaln_triton.gated_residual_op)(h, shift, y)
    op_body(adaln_triton.gated_residual_backward_op)(shift, y, h)
    _, q_rstd = op_body(rope_triton.norm_rope_op)(q, weight, cos, sin, torch.float32)
    op_body(rope_triton.norm_rope_backward_op)(q, weight, cos, sin, q_rstd, rand(2, 2, 5, 16))


def test_every_launch_runs_with_its_tensors_device_current(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    launches = LaunchRecorder(monkeypatch, current=0)
    with FakeTensorMode():  # tensors that say cuda:1, on a machine without one
        run_every_op_body("cuda:1")
    assert {launch.kernel for launch in launches.launches} == set(KERNELS)
    gpu1 = frozenset({torch.device("cuda:1")})
    wrong = [launch for launch in launches.launches if launch.current != 1 or launch.tensors != gpu1]
    assert not wrong, f"launched with another device current: {wrong}"
    assert launches.current == 0  # device 0 current again after each op


# ------------------------------------------------------------------------------------------- two GPUs


def outputs_and_grads(fn, inputs: list, seed: int) -> list:
    """fn(*inputs) as one flat float tensor, and the gradients of a random projection of it."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves).float().flatten()
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out.shape, generator=g).to(out.device)
    return [out.detach(), *torch.autograd.grad((out * weight).sum(), leaves)]


def compare_with_twins(device: torch.device) -> None:
    """The Triton ops on `device` against the PyTorch twins there, values and gradients (float32)."""
    from flowmo_kernels import TORCH_OPS, get_ops

    triton_ops = get_ops("triton", device)
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    cos, sin = (t.to(device) for t in rope_tables(torch.randint(0, 8, (37, 3), generator=g), (8, 12, 12)))
    cases = {  # name -> (function of ops and inputs, inputs)
        "modulate": (lambda ops, x, sh, sc: ops.modulate(x, sh, sc), [rand(2, 37, 96), rand(2, 1, 96), rand(2, 1, 96)]),
        "gated_residual": (lambda ops, x, gt, y: ops.gated_residual(x, gt, y), [rand(2, 37, 96), rand(2, 1, 96),
                                                                                rand(2, 37, 96)]),
        "qk_norm_rope": (
            lambda ops, q, k, w: torch.stack(ops.qk_norm_rope(q, k, w, w, cos, sin, torch.float32)),
            [rand(2, 3, 37, 32), rand(2, 3, 37, 32), 1 + 0.1 * rand(32)],
        ),
        "lfq": (lambda ops, x: lfq_values(ops.lfq(x)), [0.1 * rand(300, 9)]),
    }
    for name, (fn, inputs) in cases.items():
        ours = outputs_and_grads(lambda *t: fn(triton_ops, *t), inputs, seed=1)
        want = outputs_and_grads(lambda *t: fn(TORCH_OPS, *t), inputs, seed=1)
        for i, (a, b) in enumerate(zip(ours, want)):
            err, scale = (a - b).abs().max().item(), b.abs().max().item()
            if a.device != device or err > 1e-4 * scale:
                raise AssertionError(f"{name} output {i} on {a.device}: max error {err:.3g} (scale {scale:.3g})")


def lfq_values(out) -> torch.Tensor:
    return torch.cat([out.quantized.flatten(), torch.stack([out.commitment, out.per_sample_entropy,
                                                            out.codebook_entropy])])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernels_on_the_second_gpu_equal_the_twins():
    """Compiled kernels (the interpreter copies every tensor to the host, so it cannot see this): a fresh
    process without TRITON_INTERPRET runs this file as a script."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__, "cuda:1"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"kernels on cuda:1 with device 0 current:\n{result.stdout}{result.stderr}"


def main(device: str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    compare_with_twins(device)
    if device.type == "cuda" and torch.cuda.current_device() != 0:
        raise AssertionError(f"device {torch.cuda.current_device()} current after the ops, not 0")
    print(f"kernels on {device} equal the twins")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cuda:1")
