"""The token generator: a class-conditional bidirectional transformer of the MaskGiT family over FlowMo's LFQ
tokens (`model`: the transformer, its config, the token layout, its checkpoints) and its iterative parallel
decoding (`sampling`: the settings, the decoding loop and its CUDA-graph replay). It may import the top of the
library (`config`, `noise`, `fastpath`, ...), `flowmo_fast.formats` for its checkpoint files and `flowmo_kernels`;
of the FlowMo network only the names `flowmo_fast.flowmo` exports (`__all__`), never a module inside it."""
