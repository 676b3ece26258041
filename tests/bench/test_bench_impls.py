"""bench/impls.py: one adapter and one factory for ours and upstream; a train step does the same work on
both sides (the GPU report's train rows and the CPU benchmark's)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import flowmo_fast
from bench import upstream
from bench.impls import TRAIN_STEP_OVERRIDES, build, check_train_step_work

needs_upstream = pytest.mark.skipif(upstream.skip_reason() is not None, reason=str(upstream.skip_reason()))


class NormCount(TorchDispatchMode):
    """Counts the vector-norm reductions dispatched (log_norms runs two over all the parameters)."""

    def __init__(self):
        super().__init__()
        self.norms = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.norms += func.overloadpacket == torch.ops.aten.linalg_vector_norm
        return func(*args, **(kwargs or {}))


def work_of_one_step(impl: str, config) -> tuple[list[int], int]:
    """(batch of each encoder call, vector norms) in one train step of `impl` on 4 images."""
    torch.manual_seed(0)
    weights = flowmo_fast.FlowMo(config).state_dict()
    implementation = build(impl, config, weights, torch.device("cpu"))
    implementation.model.train()
    batches = []
    implementation.model.encoder.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append([*args, *kwargs.values()][0].shape[0]), with_kwargs=True
    )
    step = implementation.train_step(torch.rand(4, 3, 32, 32) * 2 - 1, config)
    with NormCount() as count:
        step()
    return batches, count.norms


@needs_upstream
def test_a_train_step_does_the_same_work_on_both_sides():
    """Ours with upstream's defaults ran opt.n_grad_acc=2 micro-batches and two norm reductions over all the
    parameters; upstream's row one loss on the whole batch. With TRAIN_STEP_OVERRIDES both run one pass over
    all 4 images and no norm logging."""
    config = flowmo_fast.load_config(list(TRAIN_STEP_OVERRIDES), preset="tiny")
    ours, theirs = work_of_one_step("plain", config), work_of_one_step("upstream_eager", config)
    assert ours == theirs and ours[0] == [4]


def test_a_train_step_refuses_a_config_that_would_time_other_work():
    config = flowmo_fast.load_config(["opt.n_grad_acc=2"], preset="tiny")
    with pytest.raises(ValueError, match="opt.n_grad_acc=1 opt.log_norms=False"):
        check_train_step_work(config)
    check_train_step_work(flowmo_fast.load_config(list(TRAIN_STEP_OVERRIDES), preset="tiny"))
