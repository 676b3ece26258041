"""Fixtures of the model benchmarks: the implementations of each setting (bench/impls.py), built once per
session, and a dynamo recompile limit large enough for the regionally compiled blocks."""

import pytest
import torch

from bench.impls import SAMPLING, TRAINING, Implementations

# Every compiled block variant (encoder/decoder, last block or not, each batch size, grad or not) is one
# dynamo cache entry of the same code; the suite needs more than dynamo's default limit of 8.
RECOMPILE_LIMIT = 64


@pytest.fixture(scope="session", autouse=True)
def recompile_limit():
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    old = getattr(config, name)
    setattr(config, name, max(old, RECOMPILE_LIMIT))
    yield
    setattr(config, name, old)


@pytest.fixture(scope="session")
def sampling() -> Implementations:
    return Implementations(SAMPLING, train=False)


@pytest.fixture(scope="session")
def training() -> Implementations:
    return Implementations(TRAINING, train=True)
