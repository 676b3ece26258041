"""The token generator: a class-conditional bidirectional transformer of the MaskGiT family over FlowMo's LFQ
tokens (`model`: the transformer, its config, the token layout, its checkpoints), its iterative parallel
decoding (`sampling`: the settings, the decoding loop and its CUDA-graph replay) and its sharing (`pretrained`:
model folders and the Hugging Face Hub). It may import the top of the library (`config`, `noise`, `fastpath`, ...),
`flowmo_fast.formats` for its files and `flowmo_kernels`; of the FlowMo network only the names `flowmo_fast.flowmo`
exports (`__all__`), never a module inside it.

    from flowmo_fast.maskgit import from_pretrained, save_pretrained, push_to_hub
"""

from flowmo_fast.maskgit.pretrained import card_facts, from_pretrained, push_to_hub, save_pretrained

__all__ = ["card_facts", "from_pretrained", "push_to_hub", "save_pretrained"]
