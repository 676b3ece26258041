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


def grad_norm(model) -> float:
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]).item()


def generator_step(clip: str, *overrides):
    """One tiny generator step on a fixed batch with trainer.max_grad_norm=`clip`: (logged terms, the gradients'
    norm after the step)."""
    from flowmo_fast.maskgit.model import TokenGenerator
    from train.generator import GeneratorObjective, weight_decay_groups
    from train.generator_config import make_config
    from train.generator_data import TokenBatch, TokenLayout

    config = make_config("tiny", TokenLayout(16, 18, 9, 2), [f"trainer.max_grad_norm={clip}", *overrides])
    torch.manual_seed(0)
    model = TokenGenerator(config.model)
    optimizer = build_optimizer(model, config, weight_decay_groups(model, config.opt.weight_decay))
    batch = TokenBatch(torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(1)), torch.arange(8) % 2)
    torch.manual_seed(5)  # the same masks and label dropout for every setting
    terms = train_step(GeneratorObjective(model).train(), model, batch, optimizer, config, CPU)
    return terms.logged, grad_norm(model)


def test_gradients_are_clipped_to_max_grad_norm_and_the_norm_before_clipping_is_logged():
    logged, unclipped = generator_step("null")
    assert unclipped > 0.5 and logged["debug/original_grad_norm"].item() == pytest.approx(unclipped, rel=1e-5)
    logged, clipped = generator_step("0.05")
    assert clipped == pytest.approx(0.05, rel=1e-4)  # what the optimizer stepped with
    assert logged["debug/original_grad_norm"].item() == pytest.approx(unclipped, rel=1e-5)  # the norm before
    logged, _ = generator_step("0.05", "opt.log_norms=false")
    assert set(logged) == {"total_loss", "masked_token_accuracy", "debug/original_grad_norm"}  # logged anyway
    _, large = generator_step(str(2 * unclipped))  # below the limit: untouched
    assert large == pytest.approx(unclipped, rel=1e-6)


def test_clipping_defaults_the_generators_on_the_tokenizers_off_and_a_bad_limit_is_refused():
    from train.generator_config import PRESETS, make_config
    from train.generator_data import TokenLayout

    assert flowmo_fast.load_config().trainer.max_grad_norm is None  # upstream's tokenizer trainer clips nothing
    layout = TokenLayout(256, 18, 9, 1000)
    assert {make_config(p, layout, []).trainer.max_grad_norm for p in PRESETS} == {1.0}  # MaskBit's
    with pytest.raises(ValueError, match="trainer.max_grad_norm=0.0: must be a positive number"):
        tiny("trainer.max_grad_norm=0")
    with pytest.raises(ValueError, match="trainer.max_grad_norm=-1.0: must be a positive number"):
        make_config("tiny", layout, ["trainer.max_grad_norm=-1"])


def test_the_tokenizer_trainer_clips_when_asked():
    config = tiny("trainer.max_grad_norm=1e-3", "opt.n_grad_acc=2")
    torch.manual_seed(0)
    model = flowmo_fast.FlowMo(config)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.manual_seed(5)
    terms = train_step(FlowMoObjective(model, None).train(), model, images, build_optimizer(model, config), config, CPU)
    assert grad_norm(model) == pytest.approx(1e-3, rel=1e-3) and terms.logged["debug/original_grad_norm"] > 1e-2
