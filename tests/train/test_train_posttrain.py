"""Post-training's loss against a plain computation: the objective's loss and decoder gradients equal those of the
same k-step Euler sample written out without checkpointing, on the same draws (noise, times, code), with the
ResNet-50 logit MSE taken as upstream does (gradient through the sample)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flowmo_fast import FlowMo, load_config
from train import posttrain
from train.objective import FlowMoObjective
from train.perceptual import build_perceptual_loss

SEED = 3


@pytest.fixture()
def posttrain_setup(resnet50_weights):
    """(model in train mode, encoder frozen as in upstream's post-training; its objective; images [2, 3, 16, 16])."""
    config = load_config([*posttrain.POSTTRAIN, "data.image_size=16"], preset="tiny")
    torch.manual_seed(0)
    model = FlowMo(config).train()
    model.encoder.requires_grad_(False)
    objective = FlowMoObjective(model, build_perceptual_loss(config.opt, torch.device("cpu"))).train()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return model, objective, images


def recording_decode(model, monkeypatch) -> list:
    """model.decode still runs, and each call's inputs (noised images, code, times; detached) are kept."""
    calls = []
    decode = model.decode

    def record(z, code, t):
        calls.append((z.detach().clone(), code.detach().clone(), t.detach().clone()))
        return decode(z, code, t)

    monkeypatch.setattr(model, "decode", record)
    return calls


def plain_chain(model, calls: list) -> tuple[torch.Tensor, list]:
    """Euler steps from the first call's noise through the calls' times down to 0, each decoder pass kept in the
    graph (no checkpointing) -> (final sample, the noised images each step starts from)."""
    z, starts = calls[0][0], []
    times = [t for _, _, t in calls] + [torch.zeros_like(calls[0][2])]
    for i, (_, code, _) in enumerate(calls):
        starts.append(z.detach())
        z = z - (times[i] - times[i + 1])[:, None, None, None] * model.decode(z, code, times[i])
    return z, starts


def test_posttrain_loss_and_gradients_equal_a_plain_chain(posttrain_setup, monkeypatch):
    model, objective, images = posttrain_setup
    k, weight = model.config.model.posttrain_sample_k, model.config.opt.lpips_weight
    names, decoder = zip(*[(n, p) for n, p in model.named_parameters() if n.startswith("decoder.") and p.requires_grad])

    calls = recording_decode(model, monkeypatch)
    torch.manual_seed(SEED)
    loss, terms = objective(images)
    chain = calls[-k:]  # the training decode comes first; backward's recomputation is not recorded yet
    assert len(calls) >= k and torch.equal(chain[0][2], torch.ones(len(images))), "no k-step chain from t = 1"
    grads = torch.autograd.grad(loss, decoder)
    monkeypatch.undo()

    torch.manual_seed(SEED)  # the same draws without the perceptual term: the rectified-flow part alone
    flow_loss, _ = FlowMoObjective(model, None)(images)
    flow_grads = torch.autograd.grad(flow_loss, decoder)

    sample, starts = plain_chain(model, chain)
    for i, (z, _, _) in enumerate(chain):
        torch.testing.assert_close(z, starts[i], rtol=0, atol=1e-6, msg=lambda m: f"step {i} is not Euler's: {m}")
    with torch.no_grad():
        target_logits = objective.perceptual.logits(images)
    perceptual = weight * F.mse_loss(objective.perceptual.logits(sample), target_logits)
    perceptual_grads = torch.autograd.grad(perceptual, decoder)

    assert terms["lpips_loss"].item() == pytest.approx(perceptual.item(), rel=1e-5)
    assert loss.item() == pytest.approx(flow_loss.item() + perceptual.item(), rel=1e-6)
    scale = max(g.abs().max().item() for g in perceptual_grads)
    assert scale > 1e-3 * max(g.abs().max().item() for g in flow_grads)  # the perceptual part is visible
    for name, g, g_flow, g_perceptual in zip(names, grads, flow_grads, perceptual_grads):
        torch.testing.assert_close(g - g_flow, g_perceptual, rtol=0, atol=1e-4 * scale, msg=lambda m: f"{name}: {m}")
