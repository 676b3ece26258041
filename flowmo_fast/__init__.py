"""flowmo-fast: a fast, faithful PyTorch implementation of FlowMo (arXiv 2503.11056)."""

from flowmo_fast import flow
from flowmo_fast.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from flowmo_fast.config import Config, load_config
from flowmo_fast.model import FlowMo
from flowmo_fast.pretrained import from_pretrained
from flowmo_fast.sampling import SamplingOptions
from flowmo_fast.tokenizer import Tokenizer

__all__ = [
    "CheckpointError",
    "Config",
    "FlowMo",
    "SamplingOptions",
    "Tokenizer",
    "flow",
    "from_pretrained",
    "load_checkpoint",
    "load_config",
    "save_checkpoint",
]
