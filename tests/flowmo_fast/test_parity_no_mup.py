"""Parity with upstream FlowMo with muP off (`model.enable_mup=False`, upstream's `MUP_ENABLED = False`): the
attention scale becomes 1 / sqrt(head_dim) and the readouts plain nn.Linear. Fixture: parity_lo_tiny_no_mup.pt
(tests/fixtures/make_parity_no_mup.py), on the weights and inputs of parity_lo_tiny.pt."""

import pytest
import torch
from parity_helpers import FIXTURES, fixture_state_dict
from test_parity import assert_close

import flowmo_fast


@pytest.fixture(scope="module")
def no_mup():
    return torch.load(FIXTURES / "parity_lo_tiny_no_mup.pt", weights_only=True)


@pytest.fixture(scope="module")
def no_mup_model(parity, no_mup):
    config = flowmo_fast.load_config(no_mup["overrides"])
    assert config.model.enable_mup is False
    model = flowmo_fast.FlowMo(config)
    model.load_state_dict(fixture_state_dict(parity["manifest"], parity["seed"]))  # strict: the same keys
    return model.eval()


@torch.no_grad()
def test_encode_without_mup(parity, no_mup, no_mup_model):
    assert_close(no_mup_model.encode(parity["images"]), no_mup["code_prequant"], "code (no muP)")


@torch.no_grad()
def test_velocity_without_mup(parity, no_mup, no_mup_model):
    v = no_mup_model.decode(parity["zt"], parity["code_with_mask"], parity["t"])
    assert_close(v, no_mup["velocity"], "velocity (no muP)")


def test_checkpoint_keys_do_not_depend_on_mup(parity_model, no_mup_model):
    """muP changes a scale, not the parameters: a checkpoint loads either way."""
    ours = {k: v.shape for k, v in no_mup_model.state_dict().items()}
    assert ours == {k: v.shape for k, v in parity_model.state_dict().items()}
