"""The MMDiT transformer used for both FlowMo's encoder and decoder (upstream `Flux`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from flowmo_fast.flowmo.attention import sdpa
from flowmo_fast.flowmo.layers import DoubleStreamBlock, LastLayer, MLPEmbedder, check_choice, timestep_embedding
from flowmo_fast.recompute import run_block
from flowmo_kernels import KernelOps
from flowmo_kernels.rope import rope_tables

TIME_EMBED_DIM = 256
OUTPUTS = ("img", "txt")  # which stream an MMDiT call reads out


@dataclass(frozen=True)
class MMDiTParams:
    patch_size: int
    context_dim: int  # features per code token at the input (and at the code readout)
    hidden_size: int
    num_heads: int
    depth: int
    axes_dim: tuple[int, int, int]  # RoPE dims per position axis; sums to hidden_size / num_heads
    mlp_ratio: float = 4.0
    theta: float = 10_000.0
    mup: bool = True  # attention scale 8 / head_dim (muP), else 1 / sqrt(head_dim): model.enable_mup

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size**2


def position_ids(code_length: int, grid_h: int, grid_w: int, device) -> Tensor:
    """[code_length + grid_h * grid_w, 3]: code token i -> (i, i, i); image patch (r, c) -> (0, r, c)."""
    code = torch.arange(code_length, device=device, dtype=torch.float32)[:, None].expand(-1, 3)
    rows = torch.arange(grid_h, device=device, dtype=torch.float32)[:, None].expand(grid_h, grid_w)
    cols = torch.arange(grid_w, device=device, dtype=torch.float32)[None, :].expand(grid_h, grid_w)
    img = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return torch.cat([code, img], dim=0)


def patchify(images: Tensor, p: int) -> Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), p*p*C], patch features ordered (ph, pw, c) as upstream."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: Tensor, p: int, h: int, w: int) -> Tensor:
    """Inverse of `patchify`: [B, (H/p)(W/p), p*p*C] -> [B, C, H, W]."""
    b = x.shape[0]
    x = x.reshape(b, h // p, w // p, p, p, -1).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, -1, h, w)


class MMDiT(nn.Module):
    """Joint transformer over code tokens and image patches.

    `output="img"` returns the image readout [B, C, H, W] (the decoder's velocity); `output="txt"` the
    code readout [B, L_code, context_dim] (the encoder's code). The stream not returned is not computed
    after the last attention. `activation_checkpointing` (the trainer's `trainer.activation_checkpointing`): each
    block's activations are recomputed in backward (flowmo_fast.recompute).
    """

    def __init__(self, params: MMDiTParams):
        super().__init__()
        if params.hidden_size % params.num_heads:
            raise ValueError(f"hidden_size {params.hidden_size} not divisible by num_heads {params.num_heads}")
        if sum(params.axes_dim) != params.hidden_size // params.num_heads:
            raise ValueError(f"RoPE axes {params.axes_dim} must sum to head dim {params.hidden_size // params.num_heads}")
        self.params = params
        hidden = params.hidden_size
        self.time_in = MLPEmbedder(TIME_EMBED_DIM, hidden)
        self.img_in = nn.Linear(params.patch_dim, hidden)
        self.txt_in = nn.Linear(params.context_dim, hidden)
        self.double_blocks = nn.ModuleList(
            [DoubleStreamBlock(hidden, params.num_heads, params.mlp_ratio, params.mup) for _ in range(params.depth)]
        )
        self.final_layer_img = LastLayer(hidden, params.patch_dim)
        self.final_layer_txt = LastLayer(hidden, params.context_dim)
        self.activation_checkpointing = False

    def forward(
        self,
        images: Tensor,  # [B, 3, H, W]
        code: Tensor,  # [B, L_code, context_dim]
        timesteps: Optional[Tensor],  # [B] or None (no modulation)
        ops: KernelOps,
        attention: Callable = sdpa,
        output: str = "img",
    ) -> Tensor:
        check_choice("output", output, OUTPUTS)
        p = self.params.patch_size
        _, _, h, w = images.shape
        ids = position_ids(code.shape[1], h // p, w // p, images.device)
        rope = rope_tables(ids, self.params.axes_dim, self.params.theta)
        img = self.img_in(patchify(images, p))
        txt = self.txt_in(code)
        vec = None if timesteps is None else self.time_in(timestep_embedding(timesteps, TIME_EMBED_DIM))

        last = len(self.double_blocks) - 1
        for i, block in enumerate(self.double_blocks):
            keep = output if i == last else "both"
            img, txt = run_block(block, self.activation_checkpointing, img, txt, vec, rope, ops, attention, keep=keep)

        if output == "txt":
            return self.final_layer_txt(txt, vec, ops)
        return unpatchify(self.final_layer_img(img, vec, ops), p, h, w)
