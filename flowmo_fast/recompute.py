"""Activation checkpointing per transformer block, the one switch both models' block loops read (FlowMo's MMDiT
towers and the token generator): a block whose activations are recomputed in backward keeps only its inputs
from the forward, trading one more forward of the block for its saved tensors (train.memory estimates both).

Non-reentrant `torch.utils.checkpoint`: correct around compiled blocks (`compile_blocks` compiles the module, the
checkpoint calls it, as post-training's checkpointed decoder passes already do), inside another checkpoint, and
around FSDP2 units (their hooks run inside the checkpoint, and again in the recompute). Off, or where autograd
records nothing (inference, `torch.no_grad`), the block is simply called: the default path is unchanged.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
import torch.utils.checkpoint

T = TypeVar("T")


def run_block(block: Callable[..., T], checkpointed: bool, *args, **kwargs) -> T:
    """`block(*args, **kwargs)`; with `checkpointed` and autograd recording, its activations are recomputed in
    backward instead of kept (the same values: the recompute runs the same operations on the same inputs)."""
    if checkpointed and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, **kwargs)
    return block(*args, **kwargs)
