"""Upstream's weight-norm fixing (`model.fix_initial_norms`): after every optimizer step, each nn.Linear
weight inside `double_blocks` is rescaled to the norm it had when training started."""

from __future__ import annotations

from typing import Iterator, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from train.parallel import full_tensor, local_shard


def weights_to_fix(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    for name, module in model.named_modules():
        if "double_blocks" in name and isinstance(module, nn.Linear):
            yield name, module.weight


class WeightNormFixer:
    """mode "l2": one Frobenius norm per matrix; "channel": one norm per output row.

    Targets are kept whole (plain tensors). Under FSDP2 the rescaling works on the local shards: each
    process's norms of its shards (`torch._foreach_norm` in l2 mode), one all-reduce of the squares for all
    the weights whose norm spans several shards, one `_foreach_mul_`; not a DTensor norm (an all-reduce
    each) and a DTensor multiply per weight."""

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
        """The initial norm(s) of `weight`'s local shard: the scalar (l2), or the shard's rows (channel)."""
        if name not in self._targets:
            norm = self.initial[name].to(local_shard(weight).device)
            if hasattr(weight, "device_mesh") and self.mode == "channel":  # the rows this shard holds
                from torch.distributed.tensor import distribute_tensor

                # every process holds the whole norm: each takes its rows, no communication
                norm = distribute_tensor(norm, weight.device_mesh, weight.placements, src_data_rank=None).to_local()
            self._targets[name] = norm
        return self._targets[name]

    def spans_shards(self, weight: Tensor) -> bool:
        """Whether the norm sums over a sharded dimension (then the local sums are partial)."""
        from torch.distributed.tensor import Shard

        reduced = (0, 1) if self.mode == "l2" else (1,)
        return any(isinstance(p, Shard) and p.dim in reduced for p in getattr(weight, "placements", ()))

    def local_norms(self, shards: list[Tensor]) -> list[Tensor]:
        if self.mode == "l2":
            return list(torch._foreach_norm(shards))
        return [torch.linalg.vector_norm(s, dim=1, keepdim=True) for s in shards]

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Rescale each trained weight; frozen ones (a frozen encoder, the parameters no output depends on) are
        left bit for bit: they do not move, and under FSDP rescaling them would drift them by rounding."""
        trained = [(name, w) for name, w in weights_to_fix(model) if w.requires_grad]
        if not trained:
            return
        shards = [local_shard(w) for _, w in trained]
        norms = self.local_norms(shards)
        partial = [i for i, (_, w) in enumerate(trained) if self.spans_shards(w)]
        # one all-reduce per mesh (FSDP2: one), in the same order on every process
        for mesh in dict.fromkeys(trained[i][1].device_mesh for i in partial):
            on_mesh = [i for i in partial if trained[i][1].device_mesh == mesh]
            squares = torch.cat([norms[i].square().flatten() for i in on_mesh])
            dist.all_reduce(squares, group=mesh.get_group())
            for i, whole in zip(on_mesh, squares.sqrt_().split([norms[i].numel() for i in on_mesh])):
                norms[i] = whole.view_as(norms[i])
        targets = [self.target(name, w) for name, w in trained]
        torch._foreach_mul_(shards, torch._foreach_div(targets, norms))

    def state_dict(self) -> dict[str, Tensor]:
        return {name: n.cpu() for name, n in self.initial.items()}

    def load_state_dict(self, norms: Mapping[str, Tensor]) -> None:
        """The norms a run started with (so a resumed run rescales to the same targets)."""
        if set(norms) != set(self.initial):
            raise KeyError("stored initial norms do not match the model's double_blocks linear layers")
        self.initial = {name: norms[name].clone() for name in self.initial}
        self._targets = {}
