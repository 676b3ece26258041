"""flowmo-fast: a fast, faithful PyTorch implementation of FlowMo (arXiv 2503.11056).

The rooms: `flowmo_fast.flowmo` (the FlowMo network and its sampler), `flowmo_fast.maskgit` (the token generator),
`flowmo_fast.formats` (what lives on disk); at the top the settings (`config`, `sampler_settings`, `overrides`), the
helpers both models share, `codec` (`Tokenizer`) and the commands `python -m flowmo_fast.tokenize` / `detokenize`.
The public API is below."""

from flowmo_fast.codec import Tokenizer
from flowmo_fast.config import Config, load_config
from flowmo_fast.flowmo import flow
from flowmo_fast.flowmo.model import FlowMo
from flowmo_fast.formats.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from flowmo_fast.formats.pretrained import from_pretrained
from flowmo_fast.sampler_settings import SamplingOptions

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
