"""The Triton implementation set and `auto`'s mixes; `flowmo_kernels.get_ops` imports them on first use (see there
why)."""

from __future__ import annotations

from dataclasses import replace

from flowmo_kernels import KernelOps, auto_ops
from flowmo_kernels.adaln_triton import gated_residual_triton, modulate_triton
from flowmo_kernels.lfq import lfq_torch
from flowmo_kernels.lfq_triton import lfq_triton
from flowmo_kernels.rope_triton import qk_norm_rope_triton

TRITON_OPS = KernelOps("triton", modulate_triton, gated_residual_triton, qk_norm_rope_triton, lfq_triton)
AUTO_OPS = auto_ops(TRITON_OPS)
AUTO_OPS_WIDE_LFQ = replace(AUTO_OPS, lfq=lfq_torch)  # codes wider than TRITON_LFQ_MAX_BITS per group
