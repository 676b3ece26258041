"""Shared fixtures: the upstream parity fixture, tiny models and a tiny checkpoint file."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

import flowmo_fast

FIXTURES = Path(__file__).parent / "fixtures"

# Tests stay offline: anything that would download weights must find a local file instead.
os.environ.setdefault("TORCH_HOME", str(Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / "flowmo-test-torch-home"))


def fixture_state_dict(manifest: dict, seed: int) -> dict:
    """The reference fixture's weights, regenerated from the manifest and seed (see fixtures/README.md)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in sorted(manifest):
        shape = manifest[k]
        w = torch.randn(shape, generator=g, dtype=torch.float32)
        if len(shape) == 2:
            w = w / math.sqrt(shape[1])
        elif k.endswith(".scale"):
            w = 1.0 + 0.1 * w
        else:
            w = 0.1 * w
        out[k] = w
    return out


@pytest.fixture(scope="session")
def parity():
    return torch.load(FIXTURES / "parity_lo_tiny.pt", weights_only=True)


@pytest.fixture(scope="session")
def parity_model(parity):
    """FlowMo with the fixture's config and weights, eval mode."""
    model = flowmo_fast.FlowMo(flowmo_fast.load_config(parity["overrides"]))
    model.load_state_dict(fixture_state_dict(parity["manifest"], parity["seed"]))
    return model.eval()


@pytest.fixture()
def tiny_model():
    torch.manual_seed(0)
    return flowmo_fast.FlowMo(flowmo_fast.load_config(preset="tiny")).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, parity):
    """A flowmo-fast checkpoint file of the `tiny` preset (fixture weights, so not trivially random)."""
    model = flowmo_fast.FlowMo(flowmo_fast.load_config(preset="tiny"))
    model.load_state_dict(fixture_state_dict(parity["manifest"], parity["seed"]))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    flowmo_fast.save_checkpoint(path, model, total_steps=7)
    return path
