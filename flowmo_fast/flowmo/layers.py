"""Building blocks of the FlowMo MMDiT (FLUX-style double-stream blocks).

Module and parameter names equal upstream's, so the published state dicts load unchanged. Elementwise
chains (modulation, gated residual, QK-norm + RoPE) go through a `flowmo_kernels.KernelOps`, which picks the
fused Triton or the plain PyTorch version.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowmo_kernels import KernelOps


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of times t [B] in [0, 1] -> [B, dim] (cos half, then sin half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (time_factor * t)[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """Holds the RMSNorm weight (named `scale` as upstream); applied inside `ops.qk_norm_rope`."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


class SelfAttention(nn.Module):
    """Parameters of one stream's attention: qkv projection, QK norm, output projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor, cos: Tensor, sin: Tensor, ops: KernelOps) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, L, D] -> q, k, v [B, H, L, D/H]; q, k normalised and rotated."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        q, k = ops.qk_norm_rope(q, k, self.norm.query_norm.scale, self.norm.key_norm.scale, cos, sin, v.dtype)
        return q, k, v


@dataclass
class ModulationOut:
    shift: Optional[Tensor]  # [B, 1, D]; None: identity modulation (the encoder has no timestep)
    scale: Optional[Tensor]
    gate: Optional[Tensor]


IDENTITY = ModulationOut(None, None, None)


class Modulation(nn.Module):
    """vec [B, D] -> two (shift, scale, gate) triples, each [B, 1, D]."""

    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, 6 * dim)

    def forward(self, vec: Optional[Tensor]) -> tuple[ModulationOut, ModulationOut]:
        if vec is None:
            return IDENTITY, IDENTITY
        out = self.lin(F.silu(vec))[:, None, :].chunk(6, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:])


def _mlp(hidden: int, mlp_ratio: float) -> nn.Sequential:
    inner = int(hidden * mlp_ratio)
    return nn.Sequential(nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden))


STREAMS = ("both", "img", "txt")  # which streams a block's caller needs after its attention


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """A mode string that must be one of `allowed`: a ValueError naming them otherwise."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r}; allowed: {', '.join(allowed)}")


def attention_scale(head_dim: int, mup: bool) -> float:
    """Softmax scale of q.k: muP's 8 / head_dim (upstream's default), or 1 / sqrt(head_dim) with model.enable_mup
    False (upstream's MUP_ENABLED = False); equal at head_dim 64."""
    return 8.0 / head_dim if mup else head_dim**-0.5


class DoubleStreamBlock(nn.Module):
    """Joint attention over [code tokens; image patches], separate weights per stream.

    `keep` says which streams' outputs are needed after the attention ("both", "img" or "txt"): the last
    block of the encoder needs only the code stream and the last block of the decoder only the image
    stream, so the other stream's projection and MLP are skipped (their parameters stay, unused).
    """

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, mup: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.attention_scale = attention_scale(hidden // num_heads, mup)
        self.img_mod = Modulation(hidden)
        self.img_attn = SelfAttention(hidden, num_heads)
        self.img_mlp = _mlp(hidden, mlp_ratio)
        self.txt_mod = Modulation(hidden)
        self.txt_attn = SelfAttention(hidden, num_heads)
        self.txt_mlp = _mlp(hidden, mlp_ratio)

    def forward(
        self,
        img: Tensor,  # [B, L_img, D]
        txt: Tensor,  # [B, L_txt, D]
        vec: Optional[Tensor],  # [B, D] or None
        rope: tuple[Tensor, Tensor],  # cos, sin [L_txt + L_img, head_dim / 2]
        ops: KernelOps,
        attention: Callable[[Tensor, Tensor, Tensor, float], Tensor],  # q, k, v [B, H, L, Dh], scale
        keep: str = "both",
    ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        check_choice("keep", keep, STREAMS)
        cos, sin = rope
        n_txt = txt.shape[1]
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)

        img_in = ops.modulate(img, img_mod1.shift, img_mod1.scale, out_dtype=img.dtype)
        txt_in = ops.modulate(txt, txt_mod1.shift, txt_mod1.scale, out_dtype=txt.dtype)
        img_q, img_k, img_v = self.img_attn.qkv_heads(img_in, cos[n_txt:], sin[n_txt:], ops)
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(txt_in, cos[:n_txt], sin[:n_txt], ops)

        q = torch.cat((txt_q, img_q), dim=2)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn = attention(q, k, v, self.attention_scale)
        attn = attn.transpose(1, 2).flatten(2)  # [B, L, D]
        txt_attn, img_attn = attn[:, :n_txt], attn[:, n_txt:]

        if keep in ("both", "img"):
            img = self._stream_tail(img, img_attn, self.img_attn, self.img_mlp, img_mod1, img_mod2, ops)
        else:
            img = None
        if keep in ("both", "txt"):
            txt = self._stream_tail(txt, txt_attn, self.txt_attn, self.txt_mlp, txt_mod1, txt_mod2, ops)
        else:
            txt = None
        return img, txt

    @staticmethod
    def _stream_tail(x, attn, attn_mod, mlp, mod1: ModulationOut, mod2: ModulationOut, ops: KernelOps) -> Tensor:
        x = ops.gated_residual(x, mod1.gate, attn_mod.proj(attn))
        h = ops.modulate(x, mod2.shift, mod2.scale, out_dtype=x.dtype)
        return ops.gated_residual(x, mod2.gate, mlp(h))


class LastLayer(nn.Module):
    """adaLN-modulated LayerNorm, then LayerNorm again (as upstream), then a linear readout."""

    def __init__(self, hidden: int, out_dim: int):
        super().__init__()
        # Upstream: mup.MuReadout with muP, nn.Linear without. MuReadout computes Linear(output_mult * x / width_mult)
        # and upstream sets its base shapes to the model's own (output_mult = width_mult = 1): nn.Linear either way.
        self.linear = nn.Linear(hidden, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, vec: Optional[Tensor], ops: KernelOps) -> Tensor:
        dtype = x.dtype
        if vec is not None:
            shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
            x = ops.modulate(x, shift, scale)
        return self.linear(ops.modulate(x, None, None, out_dtype=dtype))
