"""Random draws that do not depend on where the model runs or how images are batched.

- `normal` / `uniform`: a draw from a generator on the generator's own device, moved to where it is used: a CPU
  generator works with a CUDA model, and one seed gives the same numbers on any device.
- Per-image streams: image `row` of a data set (or of a grid) draws from its own generator, seeded from
  (seed, row, stream) through numpy's SeedSequence into 32 bits (what a CPU generator keeps). Evaluation,
  detokenization and the training grid use this one scheme, so `--seed S` means the same noise everywhere.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

IMAGE_NOISE, POSTERIOR_NOISE, SPAN_START = 0, 1, 2  # independent streams of one (seed, row)
MAX_SEED = 2**31


def _draw(fn, shape, generator: Optional[torch.Generator], device, dtype) -> Tensor:
    where = generator.device if generator is not None else device
    return fn(tuple(shape), generator=generator, device=where, dtype=dtype).to(device)


def normal(shape: Sequence[int], generator: Optional[torch.Generator] = None, device=None,
           dtype: Optional[torch.dtype] = None) -> Tensor:
    """N(0, 1) of `shape` on `device`, drawn on the generator's device (the global RNG of `device` if None)."""
    return _draw(torch.randn, shape, generator, device, dtype)


def uniform(shape: Sequence[int], generator: Optional[torch.Generator] = None, device=None,
            dtype: Optional[torch.dtype] = None) -> Tensor:
    """U[0, 1) of `shape` on `device`, drawn on the generator's device (the global RNG of `device` if None)."""
    return _draw(torch.rand, shape, generator, device, dtype)


def row_seed(seed: int, row: int, stream: int = IMAGE_NOISE) -> int:
    """A well-mixed 32-bit generator seed for (seed, row, stream)."""
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed {seed}: must be in [0, {MAX_SEED})")
    return int(np.random.SeedSequence([seed, row, stream]).generate_state(1)[0])


def row_generator(seed: int, row: int, stream: int = IMAGE_NOISE) -> torch.Generator:
    """A CPU generator of its own for image `row`."""
    return torch.Generator().manual_seed(row_seed(seed, row, stream))


def image_noise(rows: Sequence[int], seed: int, shape: Sequence[int]) -> Tensor:
    """Sampler noise: one N(0, 1) image `shape` [C, H, W] per row from its own generator -> [B, C, H, W], CPU."""
    return torch.stack([torch.randn(tuple(shape), generator=row_generator(seed, r)) for r in rows])
