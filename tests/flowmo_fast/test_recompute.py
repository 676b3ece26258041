"""Activation checkpointing per block (`trainer.activation_checkpointing`, flowmo_fast.recompute): the same loss and
gradients as without it, for FlowMo's training forward, post-training's chain (checkpointed decoder passes with
checkpointed blocks inside) and the token generator, and around compiled blocks; off, and under no_grad, nothing
is recomputed.

Tolerance: the recompute runs the same CPU kernels on the same inputs in float32, so the gradients agree to float
rounding of the accumulation order at most: 1e-6 of each tensor's largest entry (float32's epsilon is 1.2e-7;
torch 2.14.1 on the CPU gives them bit for bit). A gradient lost through the checkpoint (an input it detaches) is
off by its whole size."""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint

import flowmo_fast
from flowmo_fast.flowmo import flow
from flowmo_fast.flowmo.graphed_sampler import blocks_compiled, compile_blocks
from flowmo_fast.flowmo.layers import DoubleStreamBlock
from flowmo_fast.maskgit.model import Block, GeneratorConfig, TokenGenerator

TOLERANCE = 1e-6


def tiny(*overrides: str) -> flowmo_fast.FlowMo:
    torch.manual_seed(0)
    return flowmo_fast.FlowMo(flowmo_fast.load_config(preset="tiny", overrides=list(overrides)))


def gradients(model: torch.nn.Module, loss_fn, checkpointed: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, every parameter's gradient) of one forward + backward, with fixed random draws."""
    model.activation_checkpointing = checkpointed
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def worst_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)).item() for k in a)


def assert_same_gradients(model, loss_fn) -> None:
    loss, plain = gradients(model, loss_fn, checkpointed=False)
    loss_ckpt, checkpointed = gradients(model, loss_fn, checkpointed=True)
    assert torch.allclose(loss, loss_ckpt, rtol=TOLERANCE, atol=0)
    assert len(plain) > 10 and worst_gap(plain, checkpointed) <= TOLERANCE


def block_calls(model: torch.nn.Module, block_type: type, loss_fn, checkpointed: bool) -> int:
    """How many times the blocks run in one forward + backward."""
    calls = []  # a pre-hook: the recompute stops early (non-reentrant), so a block's post-hooks do not rerun
    blocks = [m for m in model.modules() if isinstance(m, block_type)]
    hooks = [block.register_forward_pre_hook(lambda *_: calls.append(1)) for block in blocks]
    model.activation_checkpointing = checkpointed
    loss_fn().backward()
    for hook in hooks:
        hook.remove()
    return len(calls)


def test_flowmo_training_gradients_are_the_same_with_checkpointed_blocks(monkeypatch):
    model = tiny()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    loss_fn = lambda: flow.rectified_flow_loss(model, images).loss  # noqa: E731
    assert_same_gradients(model, loss_fn)
    assert block_calls(model, DoubleStreamBlock, loss_fn, checkpointed=False) == 4  # 2 + 2 blocks
    assert block_calls(model, DoubleStreamBlock, loss_fn, checkpointed=True) == 8  # each run again in backward

    def refuse(*args, **kwargs):
        raise AssertionError("checkpointed where autograd records nothing")

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", refuse)
    with torch.no_grad():  # inference with the switch on: the plain path
        model.reconstruct(images[:1], model.sampling().replace(steps=2), torch.Generator().manual_seed(0))


def test_posttrain_chain_checkpoints_blocks_inside_its_checkpointed_passes():
    model = tiny("model.posttrain_sample=true", "model.posttrain_sample_k=2", "model.enc_depth=1")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1

    def loss():
        out = flow.rectified_flow_loss(model, images)
        chain = flow.posttrain_chain(model, out.model.code_with_mask, (32, 32), k=2)
        return out.loss + (chain - images).pow(2).mean()

    assert_same_gradients(model, loss)


def test_token_generator_gradients_are_the_same_with_checkpointed_blocks():
    torch.manual_seed(0)
    model = TokenGenerator(GeneratorConfig(code_length=8, groups=2, bits=3, num_classes=4))
    ids = torch.randint(0, 8, (4, 16), generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 1, 2, 3])
    loss_fn = lambda: model.loss(ids, labels).loss  # noqa: E731
    assert_same_gradients(model, loss_fn)
    assert block_calls(model, Block, loss_fn, checkpointed=True) == 2 * block_calls(model, Block, loss_fn, False) == 4


@pytest.mark.compile
def test_checkpointed_compiled_blocks_give_the_compiled_gradients():
    """compile_blocks first, then checkpointing (as train.tokenizer does): the checkpoint calls the compiled block
    (AOTAutograd's saved tensors go through the checkpoint's hooks) and recomputes it compiled."""
    model = tiny("model.enc_depth=1", "model.dec_depth=1")  # two compiled variants: the encoder's and decoder's
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    compile_blocks(model, backend="aot_eager")
    assert blocks_compiled(model)
    assert_same_gradients(model, lambda: flow.rectified_flow_loss(model, images).loss)
