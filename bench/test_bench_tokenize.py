"""Tokenize throughput: images/s through the encoder + quantizer path that `flowmo_fast.tokenize` runs
(`make_encoder`: ids for LFQ, float16 posterior means for KL), tiny preset at 32px on the CPU."""

import pytest
import torch

import flowmo_fast
from flowmo_fast.formats.token_shards import TokenSpec
from flowmo_fast.tokenize import make_encoder

BATCH = 16


@pytest.mark.parametrize("quantization", ["lfq", "kl"])
def test_bench_tokenize_encode_tiny_cpu(benchmark, quantization):
    torch.manual_seed(0)
    model = flowmo_fast.FlowMo(flowmo_fast.load_config([f"model.quantization_type={quantization}"], preset="tiny"))
    spec = TokenSpec.for_model(model.eval())
    encode = make_encoder(model, spec, compile=False, batch_size=BATCH)
    images = torch.rand(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    rows = benchmark(encode, images)
    assert rows.shape == (BATCH, *spec.row_shape) and rows.dtype == spec.dtype
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats.stats.mean
    benchmark.extra_info["device"] = f"cpu, {torch.get_num_threads()} threads"
