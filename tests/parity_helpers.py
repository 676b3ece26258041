"""The parity fixtures' folder and weights, importable by name from any test (`from parity_helpers import ...`):
a test importing from `conftest` gets whichever conftest.py was imported first."""

from __future__ import annotations

import math
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures"


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
