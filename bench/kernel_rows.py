"""The GPU report's op-level workloads (bench/gpu_report.py runs them through its harness): the LFQ loss
(torch, Triton, upstream's module) and each fused op of `kernels="auto"` (eager, compiled, Triton)."""

from __future__ import annotations

import torch

from bench import upstream
from bench.impls import Unavailable
from bench.report import Report
from bench.report_rows import Check, Row
from flowmo_fast.config import HIDDEN_PER_WIDTH, NUM_HEADS, ModelConfig
from flowmo_kernels import get_ops, triton_available

ENTROPY_WEIGHT, COMMIT_WEIGHT = ModelConfig().entropy_loss_weight, ModelConfig().commit_loss_weight  # the config's


def require_triton(device: torch.device) -> None:
    if not (device.type == "cuda" and triton_available()):
        raise Unavailable("Triton kernels run on CUDA")


def lfq_loss(report: Report, name: str, impl: str) -> None:
    """The quantizer loss, forward + backward, at the codes of one training batch."""
    config = report.models.config(name).model
    bits = config.codebook_size_for_entropy
    n = report.scale.train_batch * config.code_length * config.context_dim // bits
    row = Row(f"LFQ loss (N={n}, d={bits})", name, impl, report.scale.train_batch, None)

    def run():
        g = torch.Generator(report.device).manual_seed(8)
        x = (0.1 * torch.randn(n, bits, generator=g, device=report.device)).requires_grad_()
        if impl == "upstream":
            if upstream.skip_reason() is not None:
                raise Unavailable(upstream.skip_reason())
            losses = upstream.upstream_lfq_losses(bits, report.device)
        else:
            if impl == "triton":
                require_triton(report.device)
            lfq = get_ops(impl, report.device).lfq

            def losses(x):
                out = lfq(x)
                return out.per_sample_entropy - out.codebook_entropy, out.commitment

        def fn():
            x.grad = None
            entropy, commitment = losses(x)
            loss = ENTROPY_WEIGHT * entropy + COMMIT_WEIGHT * commitment
            loss.backward()
            return torch.stack([loss.detach().float(), torch.linalg.vector_norm(x.grad.float())])

        out = report.measure(row, fn)
        key = (row.workload, row.model)
        if impl == "torch":
            report.outputs[key] = out
        elif key in report.outputs:
            diff = float(((out - report.outputs[key]).abs() / report.outputs[key].abs()).max())
            row.check = f"loss, grad norm rel {diff:.1e}"
            if impl == "triton":
                report.add_check(Check(f"{name} LFQ loss and gradient, Triton vs torch (rel)", diff, 1e-4))

    report.attempt(f"LFQ loss {name} {impl}", report.scale.reserve_s, run, row)

def kernel_op(report: Report, name: str, op: str, impl: str) -> None:
    """One fused op, forward + backward, at the model's training shapes (bf16 on CUDA): `torch` eager,
    `torch compiled` (what Inductor makes of the plain op alone) or `triton`."""
    m = report.models.config(name).model
    b, length = report.scale.train_batch, (report.scale.size // m.patch_size) ** 2 + m.code_length
    hidden, head_dim = HIDDEN_PER_WIDTH * m.mup_width, HIDDEN_PER_WIDTH * m.mup_width // NUM_HEADS
    heads = (b, NUM_HEADS, length, head_dim)
    shape = f"2 x {list(heads)}" if op == "qk_norm_rope" else f"{[b, length, hidden]}"
    row = Row(f"kernel fwd+bwd: {op} {shape}", name, impl, b, None)

    def run():
        if impl == "triton":
            require_triton(report.device)
        dtype = torch.bfloat16 if report.device.type == "cuda" else torch.float32
        g = torch.Generator(report.device).manual_seed(9)

        def rand(*shape):
            return torch.randn(*shape, generator=g, device=report.device).to(dtype).requires_grad_()

        x, y = rand(b, length, hidden), rand(b, length, hidden)
        shift, scale, gate = rand(b, 1, hidden), rand(b, 1, hidden), rand(b, 1, hidden)
        q, k, weight = rand(*heads), rand(*heads), rand(head_dim)
        cos, sin = (torch.rand(length, head_dim // 2, generator=g, device=report.device) for _ in range(2))
        ops = get_ops("triton" if impl == "triton" else "torch", report.device)
        calls = {
            "modulate": (lambda: ops.modulate(x, shift, scale, dtype), (x, shift, scale)),
            "gated_residual": (lambda: ops.gated_residual(x, gate, y), (x, gate, y)),
            "qk_norm_rope": (
                lambda: torch.stack(ops.qk_norm_rope(q, k, weight, weight, cos, sin, dtype)), (q, k, weight)
            ),
        }
        forward, leaves = calls[op]
        if impl == "torch compiled":
            forward = torch.compile(forward, backend=report.settings.compile_backend)

        def fn():
            out = forward()
            grads = torch.autograd.grad(out.float().square().mean(), leaves)
            return torch.cat([out.detach().float().flatten(), *(gr.float().flatten() for gr in grads)])

        report.compare(row, report.measure(row, fn))

    report.attempt(f"kernel {op} {impl}", report.reserve("fast" if impl == "torch compiled" else "plain"), run, row)
