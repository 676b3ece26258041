"""trainer.compile: the flag reaches the transformer blocks through the training command's own set-up, and a
compiled training step (aot_eager: Inductor's graph capture without its C++ build) equals the eager one."""

import copy

import pytest
import torch

import flowmo_fast
from flowmo_fast.distributed import Processes
from flowmo_fast.flowmo.graphed_sampler import blocks_compiled
from train import tokenizer as tokenizer_trainer
from train.objective import FlowMoObjective
from train.start import StartPoint
from train.step import build_optimizer, compile_for_training, compiles, train_step
from train.train_state import Progress

CPU = torch.device("cpu")


def tiny(*overrides):
    return flowmo_fast.load_config(["data.image_size=16", "data.batch_size=4", *overrides], preset="tiny")


def test_compile_is_on_for_cuda_and_off_for_cpu_unless_set():
    assert compiles(tiny(), torch.device("cuda")) and not compiles(tiny(), CPU)
    assert compiles(tiny("trainer.compile=true"), CPU)
    assert not compiles(tiny("trainer.compile=false"), torch.device("cuda"))


@pytest.mark.parametrize("setting, expected", [("null", False), ("true", True)])
def test_the_flag_reaches_the_blocks_of_the_trained_model(setting, expected):
    procs = Processes(0, 1, 0, CPU)
    start = StartPoint("", None, Progress(), resuming=False)
    trainee = tokenizer_trainer.build_trainee(tiny(f"trainer.compile={setting}"), procs, start)
    assert blocks_compiled(trainee.model) == expected


@pytest.mark.compile
def test_compiled_training_step_equals_eager():
    config = tiny("opt.n_grad_acc=2")
    torch.manual_seed(0)
    eager = flowmo_fast.FlowMo(config)
    compiled = copy.deepcopy(eager)
    initial = {n: p.detach().clone() for n, p in eager.named_parameters()}
    assert compile_for_training(compiled, tiny("trainer.compile=true"), CPU, backend="aot_eager")
    assert blocks_compiled(compiled) and not blocks_compiled(eager)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    results = []
    for model in (eager, compiled):
        objective, optimizer = FlowMoObjective(model, None).train(), build_optimizer(model, config)
        torch.manual_seed(5)  # the same times, noise and guidance dropout for both
        terms = train_step(objective, model, images, optimizer, config, CPU)
        moments = {n: optimizer.state[p]["exp_avg"].clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((terms, moments, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (terms_e, moments_e, weights_e), (terms_c, moments_c, weights_c) = results
    assert any(not torch.equal(initial[n], w) for n, w in weights_e.items())  # the step moved the weights
    torch.testing.assert_close(terms_c.total_loss, terms_e.total_loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(terms_e.total_loss, terms_e.logged["total_loss"])  # the objective's own, as logged
    for name in terms_e.logged:
        torch.testing.assert_close(terms_c.logged[name], terms_e.logged[name], rtol=1e-5, atol=1e-6, msg=name)
    # After one step Adam's first moment is (1 - beta1) x the gradient: the gradients agree to float32 rounding
    # relative to each tensor's largest entry (near-zero entries carry the summation-order noise of the compiled sums).
    for name, m in moments_e.items():
        torch.testing.assert_close(moments_c[name], m, rtol=1e-4, atol=1e-5 * float(m.abs().max()), msg=name)
    # Adam's first update is about lr x sign(g): where |g| is near eps (1e-8) it magnifies the compiled kernels'
    # rounding, so the weights are held to a small fraction of one step, not to float32 rounding.
    for name, w in weights_e.items():
        torch.testing.assert_close(weights_c[name], w, rtol=0, atol=0.05 * config.opt.lr, msg=name)
