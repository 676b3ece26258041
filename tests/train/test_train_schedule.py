"""The learning-rate schedule (opt.warmup_steps, opt.lr_decay; ours): its values, the loop applying it at every
step (read back from the checkpoint's optimizer state), and the settings it refuses."""

import math

import pytest

import flowmo_fast
from flowmo_fast.formats.checkpoint import read_checkpoint
from train import pretrain
from train.step import learning_rate


def config(*overrides):
    return flowmo_fast.load_config(["opt.lr=1e-3", "trainer.max_steps=110", *overrides], preset="tiny")


def test_constant_without_warmup_or_decay_as_upstream():
    c = config()
    assert {learning_rate(c, s) for s in (0, 1, 55, 109, 500)} == {1e-3}


def test_warmup_rises_linearly_to_the_learning_rate():
    c = config("opt.warmup_steps=10")
    assert [learning_rate(c, s) for s in (0, 4, 9, 10, 109)] == pytest.approx([1e-4, 5e-4, 1e-3, 1e-3, 1e-3])


def test_cosine_and_linear_decay_end_at_max_steps():
    cosine = config("opt.warmup_steps=10", "opt.lr_decay=cosine")
    # full at the first step after warm-up, half way through the decay half of it, nearly 0 at the last step
    assert learning_rate(cosine, 10) == pytest.approx(1e-3)
    assert learning_rate(cosine, 60) == pytest.approx(5e-4)
    assert learning_rate(cosine, 109) == pytest.approx(1e-3 * 0.5 * (1 - math.cos(math.pi / 100)))
    assert 0 < learning_rate(cosine, 109) < 1e-6
    linear = config("opt.lr_decay=linear")
    assert [learning_rate(linear, s) for s in (0, 55, 109)] == pytest.approx([1e-3, 5e-4, 1e-3 / 110])
    assert learning_rate(linear, 110) == 0  # past max_steps (a run resumed with a lower max_steps stops at once)


def test_the_training_loop_sets_the_rate_of_each_step(lone_process, tmp_path):
    """The optimizer state saved after the last step carries that step's rate, not opt.lr."""
    overrides = ["opt.lr=1e-3", "opt.lr_decay=linear", "trainer.max_steps=3", "data.image_size=16",
                 "trainer.checkpoint_every=3", "trainer.sample_every=1000", "trainer.log_every=3"]
    assert pretrain.main(["--preset", "tiny", "--experiment-name", "lr", "--results-dir", str(tmp_path), *overrides]) == 0
    ckpt = read_checkpoint(str(tmp_path / "lr" / "checkpoints" / "00000003.pth"))
    rates = [group["lr"] for group in ckpt["optimizer_state_dict"]["param_groups"]]
    assert rates == pytest.approx([1e-3 / 3] * 2)  # encoder and decoder groups: learning_rate at step index 2 of 3


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["opt.lr_decay=cosine"], "trainer.max_steps, which is unset"),
        (["opt.lr_decay=step"], "opt.lr_decay='step'; allowed: none, cosine, linear"),
        (["opt.warmup_steps=-1"], "opt.warmup_steps=-1"),
    ],
)
def test_impossible_schedules_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        flowmo_fast.load_config(overrides, preset="tiny")
