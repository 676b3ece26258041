"""No state left behind: a command's process group of one puts the environment back; the kernels' choice inside
torch.compile is a constant, not a switch that silently does nothing once the ops are built."""

from __future__ import annotations

import os

import pytest
import torch.distributed as dist

import flowmo_kernels
from flowmo_fast import distributed

GROUP_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in GROUP_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "example.invalid")  # a value of the user's: comes back as it was
    assert not dist.is_initialized()


def test_a_group_of_one_puts_the_environment_back(no_torchrun):
    with distributed.processes("cpu", always_group=True) as procs:
        assert procs.grouped and procs.world_size == 1
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    assert not dist.is_initialized()
    assert [name for name in GROUP_ENV if name in os.environ] == ["MASTER_ADDR"]
    assert os.environ["MASTER_ADDR"] == "example.invalid"
    procs = distributed.start_processes("cpu")  # after it, a plain start is one process again, not "torchrun"
    assert not procs.grouped and not dist.is_initialized()


def test_a_failed_start_puts_the_environment_back(no_torchrun):
    with pytest.raises(ValueError, match="allowed"):
        distributed.start_processes("gpu", always_group=True)
    assert [name for name in GROUP_ENV if name in os.environ] == ["MASTER_ADDR"]


def test_kernel_choice_inside_compile_is_a_constant():
    with pytest.raises(TypeError):
        flowmo_kernels.AUTO_WHEN_COMPILED["lfq"] = "torch"
    assert set(flowmo_kernels.AUTO_WHEN_COMPILED) == set(flowmo_kernels.OP_NAMES)
