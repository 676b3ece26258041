"""The settings and implementations the model benchmarks compare (the rows of each group).

- plain: our model eager with the plain PyTorch kernels (`kernels="torch"`, no compile, no CUDA graphs);
- fast: our fast path: `compile_blocks` (regional torch.compile of each DoubleStreamBlock); on CUDA also
  the Triton kernels (`kernels="auto"`) and the CUDA-graph sampler;
- upstream_eager / upstream_compiled: upstream's FlowMo from the checkout at $FLOWMO_REFERENCE with the
  same config and weights, without and with its own @torch.compile decorators (rows skip when unset).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import flowmo_fast
from bench import upstream
from flowmo_fast.config import Config
from flowmo_fast.fast import compile_blocks

IMPLS = ("plain", "fast", "upstream_eager", "upstream_compiled")


@dataclass(frozen=True)
class Setting:
    """A tiny-preset model with `overrides`, fed `batch` random images of `size` x `size` pixels."""

    name: str
    overrides: tuple[str, ...]
    size: int
    batch: int

    def config(self) -> Config:
        return flowmo_fast.load_config([*self.overrides, f"data.image_size={self.size}"], preset="tiny")

    def images(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.rand(self.batch, 3, self.size, self.size, generator=g) * 2 - 1

    def noise(self) -> torch.Tensor:
        """The sampler's starting noise: what `reconstruct(generator=noise_generator())` draws."""
        return torch.randn(self.batch, 3, self.size, self.size, generator=self.noise_generator())

    @staticmethod
    def noise_generator() -> torch.Generator:
        return torch.Generator().manual_seed(1)

    def describe(self) -> str:
        m = self.config().model
        return f"{self.name}: width {m.mup_width}, {m.enc_depth}+{m.dec_depth} blocks, {self.size}px, batch {self.batch}"


# Issue 7's CPU setting for the sampler: width 2, 4 decoder blocks, 64px, batch 4; and the tiny preset as is.
SAMPLING = Setting("sampling", ("model.dec_depth=4",), size=64, batch=4)
TINY_SAMPLING = Setting("tiny sampling", (), size=32, batch=4)
TRAINING = Setting("training", (), size=32, batch=4)


class Implementations:
    """The four implementations of one setting, each built on first use and kept for the session."""

    def __init__(self, setting: Setting, train: bool):
        self.setting = setting
        self.train = train
        self.config = setting.config()
        torch.manual_seed(0)
        self.template = flowmo_fast.FlowMo(self.config)  # the initial weights; never run
        self.built: dict[str, torch.nn.Module] = {}
        self.references: dict[str, tuple] = {}
        self.upstream_module = None

    def reference(self, key: str, compute: Callable[[], tuple]) -> tuple:
        """The plain model's values for `key`, computed once."""
        if key not in self.references:
            self.references[key] = compute()
        return self.references[key]

    def plain(self) -> flowmo_fast.FlowMo:
        return self.get("plain")

    def get(self, impl: str) -> torch.nn.Module:
        """The model of `impl`, with the setting's initial weights; skips the calling row when upstream is
        unavailable. Every model starts from `self.template`, so rows that train do not affect the others."""
        if impl not in self.built:
            if impl in ("plain", "fast"):
                model = copy.deepcopy(self.template).train(self.train)
                model.kernels = "torch" if impl == "plain" else "auto"
                model.cuda_graphs = impl == "fast"
                if impl == "fast":
                    compile_blocks(model, dynamic=False)
            else:
                reason = upstream.skip_reason()
                if reason is not None:
                    pytest.skip(reason)
                self.upstream_module, model = upstream.load_upstream(
                    self.config, self.template.state_dict(), compiled=impl == "upstream_compiled"
                )
                model.train(self.train)
            self.built[impl] = model
        return self.built[impl]
