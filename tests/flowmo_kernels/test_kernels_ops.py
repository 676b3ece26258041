"""Kernel selection, the torch.library registrations (schemas, fake impls, autograd), torch.compile through
the custom ops, and the Triton kernels inside the model against the upstream fixture."""

from __future__ import annotations

import copy

import pytest
import torch

from flowmo_kernels import AUTO_WHEN_COMPILED, TORCH_OPS, get_ops
from flowmo_kernels.adaln_triton import gated_residual_backward_op, gated_residual_op, modulate_backward_op, modulate_op
from flowmo_kernels.lfq_triton import lfq_backward_op, lfq_op
from flowmo_kernels.rope import rope_tables
from flowmo_kernels.rope_triton import norm_rope_backward_op, norm_rope_op


def test_get_ops_picks_by_name_and_device(monkeypatch):
    assert get_ops("auto", torch.device("cpu")) is TORCH_OPS
    assert get_ops("torch", "cuda") is TORCH_OPS
    assert get_ops("auto", "cuda").name == "auto"  # building the set touches no GPU
    assert get_ops("triton", "cpu").name == "triton"  # TRITON_INTERPRET=1 here
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="runs on CUDA devices.*TRITON_INTERPRET=1"):
        get_ops("triton", "cpu")
    with pytest.raises(ValueError, match="allowed: auto, triton, torch"):
        get_ops("fast", "cpu")


def dispatched_ops(fn) -> set[str]:
    """Names of the operators `fn` sends through the dispatcher (custom ops included)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.name())
            return func(*args, **(kwargs or {}))

    with Record() as record:
        fn()
    return record.names


def compiled_graph_targets(fn, *args) -> set[str]:
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}


def test_auto_runs_triton_eagerly_and_compiled_as_its_table_says():
    """`auto` on CUDA (here: the interpreter on CPU tensors): Triton kernels when eager; inside torch.compile
    the plain ops where AUTO_WHEN_COMPILED says "torch" (Inductor fuses them), Triton where it says "triton"."""
    auto = get_ops("auto", "cuda")
    x, shift, scale = torch.randn(2, 5, 16), torch.randn(2, 1, 16), torch.randn(2, 1, 16)
    code = torch.randn(12, 6)
    assert "flowmo::modulate" in dispatched_ops(lambda: auto.modulate(x, shift, scale))
    assert "flowmo::lfq" in dispatched_ops(lambda: auto.lfq(code))
    compiled = {
        "modulate": compiled_graph_targets(lambda x: auto.modulate(x, shift, scale), x),
        "lfq": compiled_graph_targets(lambda c: auto.lfq(c).codebook_entropy, code),
    }
    for name, targets in compiled.items():
        uses_kernel = any(t.startswith("flowmo.") for t in targets)
        assert uses_kernel == (AUTO_WHEN_COMPILED[name] == "triton"), (name, sorted(targets))
    torch.testing.assert_close(auto.modulate(x, shift, scale), TORCH_OPS.modulate(x, shift, scale))


OP_CASES = (
    "lfq", "lfq_no_loss", "lfq_backward", "modulate", "modulate_identity_bf16_out", "modulate_backward",
    "gated_residual", "gated_residual_backward", "norm_rope", "norm_rope_backward",
)


@pytest.fixture(scope="module")
def op_cases():
    """name -> (op, args); built when first used, as building runs the kernels (not at collection)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    x = rand(40, 9, grad=True)
    _, _, _, _, _, bit_probs, mean_probs = lfq_op(x.detach(), True)
    h, shift, scale = rand(2, 7, 24, grad=True), rand(2, 24, grad=True), rand(2, 24, grad=True)
    _, mean, rstd = modulate_op(h.detach(), shift.detach(), scale.detach(), torch.float32)
    q = rand(2, 5, 3 * 2 * 16, grad=True).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)[0]  # strided view
    weight = rand(16, grad=True)
    cos, sin = rope_tables(torch.randint(0, 4, (5, 3), generator=g), (4, 6, 6))
    _, q_rstd = norm_rope_op(q.detach(), weight.detach(), cos, sin, torch.float32)
    cases = {
        "lfq": (lfq_op, (x, True)),
        "lfq_no_loss": (lfq_op, (x, False)),
        "lfq_backward": (lfq_backward_op, (x.detach(), bit_probs, mean_probs, rand(40, 9), rand(3))),
        "modulate": (modulate_op, (h, shift, scale, torch.float32)),
        "modulate_identity_bf16_out": (modulate_op, (h, None, None, torch.bfloat16)),
        "modulate_backward": (modulate_backward_op, (h.detach(), scale.detach(), mean, rstd, rand(2, 7, 24))),
        "gated_residual": (gated_residual_op, (h, shift, rand(2, 7, 24, grad=True))),
        "gated_residual_backward": (gated_residual_backward_op, (shift.detach(), rand(2, 7, 24), rand(2, 7, 24))),
        "norm_rope": (norm_rope_op, (q, weight, cos, sin, torch.float32)),
        "norm_rope_backward": (
            norm_rope_backward_op, (q.detach(), weight.detach(), cos, sin, q_rstd, rand(2, 2, 5, 16))
        ),
    }
    assert tuple(cases) == OP_CASES
    return cases


@pytest.mark.parametrize("name", OP_CASES)
def test_custom_op_registration(op_cases, name):
    """Schema, autograd registration, fake (meta) implementation and AOT dispatch with dynamic shapes."""
    op, args = op_cases[name]
    torch.library.opcheck(op, args)


def modulated_block_and_lfq(ops, x, vec, lin, qw, kw, cos, sin):
    """The elementwise chain of a modulated attention block (adaLN, QK norm + RoPE, gated residuals) and
    the LFQ loss on its output. x [B, L, 32], 2 heads of 16."""
    shift, scale, gate = lin(vec)[:, None].chunk(3, dim=-1)
    h = ops.modulate(x, shift, scale).to(x.dtype)
    heads = h.unflatten(-1, (2, 16)).transpose(1, 2)  # [B, 2, L, 16], strided
    q, k = ops.qk_norm_rope(heads, heads * 0.5, qw, kw, cos, sin, x.dtype)
    y = ops.gated_residual(x, gate, (q + k).transpose(1, 2).flatten(2))
    y = ops.gated_residual(y, None, ops.modulate(y, None, None))
    code = ops.lfq(y.reshape(-1, 8))
    losses = code.commitment + code.per_sample_entropy - code.codebook_entropy
    return (code.quantized * y.reshape(-1, 8)).mean() + losses


@pytest.mark.compile
def test_compile_fullgraph_traces_through_the_custom_ops():
    """torch.compile(fullgraph=True) traces the Triton ops through their fake implementations and
    registered backwards (no graph break); forward and gradients equal eager PyTorch. Backend aot_eager
    (Dynamo + AOT autograd on fake tensors): Inductor's CPU code generation would add a minute here."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 96)
    x, vec = torch.randn(2, 5, 32, requires_grad=True), torch.randn(2, 32)
    qw, kw = (1 + 0.1 * torch.randn(16)).requires_grad_(), (1 + 0.1 * torch.randn(16)).requires_grad_()
    cos, sin = rope_tables(torch.randint(0, 4, (5, 3)), (4, 6, 6))
    leaves = [x, qw, kw, *lin.parameters()]

    def value_and_grads(fn):
        value = fn(x, vec, lin, qw, kw, cos, sin)
        return value.detach(), torch.autograd.grad(value, leaves)

    def with_triton_ops(*args):
        return modulated_block_and_lfq(get_ops("triton", args[0].device), *args)

    compiled = torch.compile(with_triton_ops, fullgraph=True, backend="aot_eager")
    value, grads = value_and_grads(compiled)
    want, want_grads = value_and_grads(lambda *args: modulated_block_and_lfq(TORCH_OPS, *args))
    torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_model_velocity_with_triton_kernels_equals_upstream_fixture(parity, parity_model):
    parity_model.kernels = "triton"
    try:
        velocity = parity_model.decode(parity["zt"], parity["code_with_mask"], parity["t"])
    finally:
        parity_model.kernels = "auto"
    err = (velocity - parity["velocity"]).abs().max().item()
    assert err <= 1e-4 * max(1.0, parity["velocity"].abs().max().item()), f"velocity: max error {err:.3g}"


@torch.no_grad()
def test_model_quantizer_with_triton_kernels_equals_upstream_fixture(parity, parity_model):
    parity_model.kernels = "triton"
    parity_model.train()
    try:
        out = parity_model.quantize(parity["code_prequant"])
    finally:
        parity_model.kernels = "auto"
        parity_model.eval()
    assert torch.equal(out.quantized, parity["train_quantized"])
    assert torch.equal(out.indices.flatten(), parity["train_indices"])
    assert abs(out.loss - parity["train_quantizer_loss"]) <= 1e-7
    for key in ("per_sample_entropy", "codebook_entropy", "entropy_aux_loss", "commitment"):
        assert abs(out.breakdown[key] - parity[f"lfq_{key}"]) <= 1e-6 * max(1.0, abs(parity[f"lfq_{key}"]))


@pytest.mark.compile
def test_compile_fullgraph_traces_the_decoder_with_triton_kernels(parity, parity_model):
    """The whole decoder with every op a Triton custom op (`kernels="triton"`) compiles with fullgraph=True
    (no graph break: fake implementations and registered backwards) and its velocity and gradient equal the
    eager model's. Backend aot_eager: dynamo and AOT autograd on fake tensors, the kernels interpreted."""
    model = copy.deepcopy(parity_model).train()
    model.kernels = "triton"
    zt = parity["zt"].clone().requires_grad_()

    def velocity_and_grad(decode):
        zt.grad = None
        v = decode(zt, parity["code_with_mask"], parity["t"])
        v.square().mean().backward()
        return v.detach(), zt.grad.clone()

    compiled = torch.compile(model.decode, fullgraph=True, backend="aot_eager")
    v, g = velocity_and_grad(compiled)
    want_v, want_g = velocity_and_grad(model.decode)
    torch.testing.assert_close(v, want_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, want_g, rtol=1e-4, atol=1e-6)
    err = (v - parity["velocity"]).abs().max().item()
    assert err <= 1e-4 * max(1.0, parity["velocity"].abs().max().item())
