"""Fixtures of the model benchmarks: the implementations of each setting (bench/impls.py), built once per
session. (`flowmo_fast.flowmo.graphed_sampler.compile_blocks` raises dynamo's recompile limit for the compiled blocks.)"""

import pytest

from bench.impls import SAMPLING, TINY_SAMPLING, TRAINING, Implementations


@pytest.fixture(scope="session")
def sampling() -> Implementations:
    return Implementations(SAMPLING, train=False)


@pytest.fixture(scope="session")
def tiny_sampling() -> Implementations:
    return Implementations(TINY_SAMPLING, train=False)


@pytest.fixture(scope="session")
def training() -> Implementations:
    return Implementations(TRAINING, train=True)
