"""flowmo-fast: a fast, faithful PyTorch implementation of FlowMo (arXiv 2503.11056).

The rooms: `flowmo_fast.flowmo` (the FlowMo network and its sampler), `flowmo_fast.maskgit` (the token generator),
`flowmo_fast.formats` (what lives on disk); at the top the settings (`config`, `sampler_settings`, `overrides`), the
helpers both models share, `codec` (`Tokenizer`) and the commands `python -m flowmo_fast.tokenize` / `detokenize`.
The public API is below; the token generator's loading and sharing are `flowmo_fast.maskgit`'s."""

from flowmo_fast.codec import Tokenizer
from flowmo_fast.config import Config, load_config
from flowmo_fast.flowmo import flow
from flowmo_fast.flowmo.model import FlowMo
from flowmo_fast.formats.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from flowmo_fast.formats.hub import HubUpload
from flowmo_fast.formats.model_card import CardFacts
from flowmo_fast.formats.pretrained import card_facts, from_pretrained, push_to_hub, save_pretrained
from flowmo_fast.sampler_settings import SamplingOptions

__all__ = [
    "CardFacts",
    "CheckpointError",
    "Config",
    "FlowMo",
    "HubUpload",
    "SamplingOptions",
    "Tokenizer",
    "card_facts",
    "flow",
    "from_pretrained",
    "load_checkpoint",
    "load_config",
    "push_to_hub",
    "save_checkpoint",
    "save_pretrained",
]
