"""Exponential moving average of the weights, as upstream's SimpleEMA: every `every` steps,
ema = ema * decay^every + weights * (1 - decay^every), over the whole state dict (as one `_foreach_lerp_`)."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from train.parallel import local_shard


class EMA:
    def __init__(self, model: nn.Module, decay: float, every: int = 10):
        self.decay = decay
        self.every = every
        with torch.no_grad():
            self.tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}  # DTensor shards under FSDP

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Called after every optimizer step with the step's index (before it is counted)."""
        if step % self.every:
            return
        keep = self.decay**self.every
        current = model.state_dict()
        floats = [name for name, avg in self.tensors.items() if avg.is_floating_point()]
        # ema + (1 - keep) (w - ema): one fused update over the local shards (no DTensor dispatch per tensor)
        torch._foreach_lerp_(
            [local_shard(self.tensors[n]) for n in floats], [local_shard(current[n]) for n in floats], 1 - keep
        )
        for name, avg in self.tensors.items():
            if not avg.is_floating_point():  # an integer buffer (a counter) follows the model
                avg.copy_(current[name])

    @torch.no_grad()
    def load(self, state_dict: Mapping[str, Tensor]) -> None:
        """Whole tensors (e.g. a checkpoint's model_ema_state_dict); each rank keeps its own shard."""
        missing = set(self.tensors) - set(state_dict)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} keys (first: {sorted(missing)[:3]})")
        for name, avg in self.tensors.items():
            source = state_dict[name]
            if hasattr(avg, "device_mesh"):  # a DTensor shard: distribute the whole tensor like it
                from torch.distributed.tensor import distribute_tensor

                source = distribute_tensor(source.to(avg.device_mesh.device_type), avg.device_mesh, avg.placements)
            avg.copy_(source)
