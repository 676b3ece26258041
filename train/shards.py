"""A weight's part on this process: FSDP2 keeps parameters as DTensor shards; per-tensor work on them (norms,
EMA) runs on the local shards, without a DTensor dispatch (and, for a norm, a collective) per tensor."""

from __future__ import annotations

from torch import Tensor


def local_shard(t: Tensor) -> Tensor:
    """The part of `t` this process holds: a DTensor's local shard (in-place ops on it write through), else `t`."""
    return t.to_local() if hasattr(t, "device_mesh") else t
