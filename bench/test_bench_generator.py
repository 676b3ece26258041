"""Token generator benchmarks: one group per workload, rows plain (eager) and fast (regional torch.compile of the
transformer blocks; sampling on CUDA also replays the loop from a CUDA graph, flowmo_fast.maskgit.sampling).

Setting: FlowMo-Lo's token layout (256 positions x 2 groups of 9 bits, 1000 classes) with a small transformer
(width 128, 2 blocks) so the CPU groups take about a minute with compiling; where a GPU is present, the B
preset on it.
- train step: `TokenGenerator.loss` forward + backward + AdamW step, batch TRAIN_BATCH;
- sample: `generate` of SAMPLE_BATCH class-conditional rows, SAMPLE_STEPS MaskGiT steps with guidance (every
  step runs the conditional and null-class rows as one batch: 2 x SAMPLE_BATCH rows per forward).
Before timing, the fast row's first result is checked against the plain row's (the loss, or the sampled rows'
agreement). GFLOP/s counts matmul FLOPs (`TokenGenerator.matmul_flops`; a training step as 3 forwards).
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from flowmo_fast.maskgit.model import TokenGenerator
from flowmo_fast.maskgit.sampling import GenerationOptions, GraphedGenerator, generate, sample_keys
from train.generator_config import preset_model
from train.generator_data import TokenLayout

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
TRAIN_BATCH = 64 if CUDA else 4
SAMPLE_BATCH = 64 if CUDA else 4
SAMPLE_STEPS = 64 if CUDA else 8
ROUNDS = 20 if CUDA else 3
TOLERANCE = 1e-4


def make_model(seed: int = 0) -> TokenGenerator:
    torch.manual_seed(seed)
    size = [] if CUDA else ["model.width=128", "model.depth=2", "model.heads=2"]
    config = preset_model("B" if CUDA else "tiny", TokenLayout(256, 18, 9, 1000), size)
    return TokenGenerator(config).to(DEVICE)


def describe(model: TokenGenerator, batch: int) -> str:
    c = model.config
    where = torch.cuda.get_device_name() if CUDA else f"cpu {torch.get_num_threads()} threads"
    layout = f"{c.code_length}x{c.groups} groups of {c.bits} bits"
    return f"width {c.width}, {c.depth} blocks, {layout}, batch {batch}, {where}"


def time_row(benchmark, group: str, fn: Callable, flops: int, rows: int) -> None:
    benchmark.group = group
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable
        return
    seconds = benchmark.stats.stats.min
    benchmark.extra_info["rows_per_s"] = round(rows / seconds, 3)
    benchmark.extra_info["gflop_per_s"] = round(flops / seconds / 1e9, 2)


def synchronized(fn: Callable) -> Callable:
    def run():
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        return out

    return run


@pytest.mark.parametrize("impl", ["plain", "fast"])
def test_bench_generator_train_step(benchmark, impl):
    model = make_model()
    if impl == "fast":
        model.compile_blocks(dynamic=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=CUDA or None)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (TRAIN_BATCH, 512), generator=g).to(DEVICE)
    labels = torch.randint(0, 1000, (TRAIN_BATCH,), generator=g).to(DEVICE)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=CUDA)

    def step():
        with amp:
            out = model.loss(ids, labels)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        return out.loss.detach()

    torch.manual_seed(2)
    first = float(synchronized(step)())
    torch.manual_seed(2)
    reference = first if impl == "plain" else float(_plain_loss(ids, labels))
    benchmark.extra_info["loss_rel_diff_vs_plain"] = abs(first / reference - 1)
    assert abs(first / reference - 1) <= (1e-2 if CUDA else TOLERANCE)
    group = f"generator train step ({describe(model, TRAIN_BATCH)})"
    time_row(benchmark, group, synchronized(step), 3 * model.matmul_flops(TRAIN_BATCH), TRAIN_BATCH)


def _plain_loss(ids, labels):
    model = make_model()
    torch.manual_seed(2)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=CUDA):
        return model.loss(ids, labels).loss.detach()


@pytest.mark.parametrize("impl", ["plain", "fast"])
def test_bench_generator_sample(benchmark, impl):
    model = make_model().eval()
    options = GenerationOptions(steps=SAMPLE_STEPS, cfg=4.0)
    labels = torch.arange(SAMPLE_BATCH, device=DEVICE) * 7 % 1000
    keys = sample_keys(0, labels.tolist(), list(range(SAMPLE_BATCH)), DEVICE)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=CUDA)
    if impl == "fast" and CUDA:
        graphed = GraphedGenerator(model)
        fn = lambda: graphed(labels, keys, options)  # noqa: E731
    else:
        if impl == "fast":
            model.compile_blocks(dynamic=False)
        fn = lambda: generate(model, labels, keys, options)  # noqa: E731

    def sample():
        with amp:
            return fn()

    rows = synchronized(sample)()
    reference = rows if impl == "plain" else _plain_rows(labels, keys, options)
    agreement = float((rows == reference).float().mean())
    benchmark.extra_info["ids_equal_to_plain"] = round(agreement, 4)
    assert agreement >= (0.5 if CUDA else 0.99)  # rounding may flip a near-tie choice, and the rest follows it
    # guidance doubles each forward's rows
    flops = options.steps * model.matmul_flops(2 * SAMPLE_BATCH)
    time_row(benchmark, f"generator sample ({options.steps} steps, {describe(model, SAMPLE_BATCH)})",
             synchronized(sample), flops, SAMPLE_BATCH)


def _plain_rows(labels, keys, options):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=CUDA):
        return generate(make_model().eval(), labels, keys, options)
