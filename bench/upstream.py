"""The upstream FlowMo implementation, built from its own code for side-by-side benchmarks.

Set FLOWMO_REFERENCE to a checkout of kylesargent/FlowMo (never vendored here). Needs the `reference`
extra (mup, omegaconf). `load_upstream(config, state_dict)` returns (upstream module, upstream FlowMo).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Optional

import torch

from flowmo_fast.config import Config


def reference_path() -> Optional[str]:
    path = os.environ.get("FLOWMO_REFERENCE")
    return path if path and os.path.isdir(os.path.join(path, "flowmo")) else None


def skip_reason() -> Optional[str]:
    """Why the upstream rows cannot run here, or None."""
    if reference_path() is None:
        return "FLOWMO_REFERENCE is unset or not an upstream FlowMo checkout"
    for module in ("mup", "omegaconf"):
        if importlib.util.find_spec(module) is None:
            return f"upstream needs `{module}`: pip install -e '.[reference]'"
    return None


def import_upstream():
    """Upstream's `flowmo.models` module, imported from the checkout (its other modules hang off it, e.g.
    `models.lookup_free_quantize`)."""
    root = reference_path()
    if root is None:
        raise RuntimeError(skip_reason())
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("flowmo.models")


def load_upstream(config: Config, state_dict: dict, compiled: bool = False):
    """Build upstream's FlowMo from its code with our config values and weights (float32; on the default
    device, so `with torch.device("cuda"):` builds it on the GPU)."""
    from omegaconf import OmegaConf

    root = reference_path()
    models = import_upstream()
    models.MUP_ENABLED = config.model.enable_mup
    up_config = OmegaConf.merge(OmegaConf.load(os.path.join(root, "flowmo/configs/base.yaml")), config.to_dict())
    model = models.FlowMo(width=config.model.mup_width, config=up_config)
    # muP with base = own width: every MuReadout multiplier is 1 (see shared/reference/README.md).
    for module in model.modules():
        if type(module).__name__ == "MuReadout":
            module.width_mult = lambda: 1.0
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    if not compiled:
        for name in ("encode", "decode", "_quantize"):
            fn = getattr(type(model), name)
            original = getattr(fn, "_torchdynamo_orig_callable", None) or getattr(fn, "__wrapped__", fn)
            setattr(model, name, original.__get__(model))
    return models, model


def upstream_reconstruct(models, model, images: torch.Tensor, noise: torch.Tensor, steps: int, cfg: float):
    """Upstream's evaluation sampler (its `rf_sample`) from the given noise; CPU-safe (no .cuda())."""
    with torch.no_grad():
        code = model._quantize(model.encode(images)[0])[0]
        code = torch.cat([code, torch.ones_like(code[..., :1])], dim=-1)
        null = code * 0.0 if cfg != 1.0 else None
        model.config.eval.sampling.cfg = cfg
        out = models.rf_sample(model, noise, code, null_code=null, sample_steps=steps, cfg=cfg,
                               schedule=model.config.eval.sampling.schedule)[-1]
    return out.clamp(-1, 1)


def upstream_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """The optimizer upstream's train.py builds: torch.optim.Adam with its defaults (on CPU a loop over the
    tensors), over the trainable parameters. Ours is train.step.build_optimizer."""
    opt = config.opt
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=opt.lr, betas=(opt.beta1, opt.beta2))


def upstream_lfq_losses(bits: int, device: torch.device):
    """Upstream's own LFQ module (lookup_free_quantize.LFQ, training mode) on codes x [N, d] ->
    (entropy loss, commitment loss), the two terms its training adds with their config weights."""
    quantizer = import_upstream().lookup_free_quantize.LFQ(
        codebook_size=2**bits, dim=bits, num_codebooks=1, token_factorization=False
    ).to(device).train()

    def losses(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (_, entropy_aux, _), breakdown = quantizer(x.T[None], return_loss_breakdown=True)  # [1, d, N]
        return entropy_aux, breakdown.commitment

    return losses
