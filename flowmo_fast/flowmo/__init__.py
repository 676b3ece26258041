"""The FlowMo network and its sampler: the encoder and flow-matching decoder (`model`, `mmdit`, `layers`,
`attention`), the quantizers (`quantizers`, and `llm_infill` for the LLM-infilled code), rectified flow in training
(`flow`), the evaluation sampler (`sampler`) and its CUDA-graph fast path (`graphed_sampler`), and the FLOP count
(`flops`). It may import the settings at the top of the library (`config`, `sampler_settings`, `llm_settings`),
the shared helpers there (`noise`, `autocast`, `fastpath`, `recompute`) and `flowmo_kernels`; never the token generator
(`flowmo_fast.maskgit`), the files on disk (`flowmo_fast.formats`) or a command. What other rooms may use of it
is `__all__` below."""

from flowmo_fast.flowmo.flops import decoder_passes
from flowmo_fast.flowmo.model import FlowMo, ModelOutput, RowReconstruction
from flowmo_fast.flowmo.sampler import sample

__all__ = ["FlowMo", "ModelOutput", "RowReconstruction", "decoder_passes", "sample"]
