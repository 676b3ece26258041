"""Upstream's weight-norm fixing (`model.fix_initial_norms`): after every optimizer step, each nn.Linear
weight inside `double_blocks` is rescaled to the norm it had when training started."""

from __future__ import annotations

from typing import Iterator, Mapping

import torch
from torch import Tensor, nn

from train.parallel import full_tensor


def weights_to_fix(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    for name, module in model.named_modules():
        if "double_blocks" in name and isinstance(module, nn.Linear):
            yield name, module.weight


class WeightNormFixer:
    """mode "l2": one Frobenius norm per matrix; "channel": one norm per output row.

    Targets are kept whole (plain tensors); under FSDP each is replicated once onto the weight's mesh."""

    def __init__(self, model: nn.Module, mode: str):
        if mode not in ("l2", "channel"):
            raise ValueError(f"model.fix_norm_mode={mode!r}; allowed: l2, channel")
        self.mode = mode
        with torch.no_grad():
            self.initial = {name: full_tensor(self.norm(w)) for name, w in weights_to_fix(model)}
        self._targets: dict[str, Tensor] = {}

    def norm(self, weight: Tensor) -> Tensor:
        if self.mode == "channel":
            return torch.linalg.norm(weight, axis=1, keepdims=True)
        return torch.linalg.norm(weight)

    def target(self, name: str, weight: Tensor) -> Tensor:
        if name not in self._targets:
            norm = self.initial[name].to(weight.device)
            if hasattr(weight, "device_mesh"):  # FSDP2 shard
                from torch.distributed.tensor import Replicate, distribute_tensor

                norm = distribute_tensor(norm, weight.device_mesh, [Replicate()] * weight.device_mesh.ndim)
            self._targets[name] = norm
        return self._targets[name]

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Rescale each trained weight; frozen ones (a frozen encoder, the parameters no output depends on) are
        left bit for bit: they do not move, and under FSDP rescaling them would drift them by rounding."""
        for name, weight in weights_to_fix(model):
            if weight.requires_grad:
                weight.mul_(self.target(name, weight) / self.norm(weight))

    def state_dict(self) -> dict[str, Tensor]:
        return {name: n.cpu() for name, n in self.initial.items()}

    def load_state_dict(self, norms: Mapping[str, Tensor]) -> None:
        """The norms a run started with (so a resumed run rescales to the same targets)."""
        if set(norms) != set(self.initial):
            raise KeyError("stored initial norms do not match the model's double_blocks linear layers")
        self.initial = {name: norms[name].clone() for name in self.initial}
        self._targets = {}
