"""Model benchmarks on the CPU: one group per workload, with rows plain / fast / upstream_eager /
upstream_compiled (bench/impls.py), so the ratios read off the table.

- block: one decoder DoubleStreamBlock forward (sampling setting; upstream has no compiled block);
- encode: the encoder, images -> code before quantization (sampling setting);
- reconstruct: encode, quantize, then the guided sampler, for the tiny preset (32px) and the sampling
  setting (issue 7's CPU target), RECONSTRUCT_STEPS steps instead of evaluation's 25 to fit the time
  budget: the time per decoder pass, and so the ratios, do not depend on the step count;
- train step: forward + backward + Adam step, each implementation's own (training setting; one micro-batch,
  no norm logging on every side).
The upstream_compiled rows of the train step (compiling upstream's whole training graph takes ~5 minutes
on a 2-core CPU) and of the tiny reconstruct (another minute) run only with FLOWMO_BENCH_FULL=1: they would
take the suite past its 10 minutes.

Before a row is timed, its first call (which also compiles) is checked against our plain model's values;
the largest difference is recorded in the row's extra_info.
"""

from __future__ import annotations

import os
from typing import Callable

import pytest
import torch

from bench import upstream
from bench.impls import IMPLS, NOISE_SEED, TRAIN_STEP_WORK, Implementations
from flowmo_fast.config import load_config
from flowmo_fast.flowmo import flops
from flowmo_fast.flowmo.layers import timestep_embedding
from flowmo_fast.flowmo.mmdit import TIME_EMBED_DIM, position_ids
from flowmo_fast.flowmo.model import FlowMo
from flowmo_fast.sampler_settings import UPSTREAM
from train.step import build_optimizer

RECONSTRUCT_STEPS = 4  # pow_0.25: one of the 4 steps is guided, 5 decoder passes (evaluation: 25 and 6)
CFG = 1.5
# The minimum over rounds is the statistic to read: on a shared 2-core machine a round can take 4x longer
# when another process runs.
ROUNDS = {"block": 5, "encode": 5, "reconstruct": 4, "train step": 5}  # by the group name before " ("
TOLERANCE = 1e-4  # float32: compiled kernels and upstream's op order round differently


def skip_unless_full(impl: str, why: str) -> None:
    """Skip an upstream_compiled row whose compile would take the suite past 10 minutes, unless asked for."""
    if impl == "upstream_compiled" and upstream.skip_reason() is None and os.environ.get("FLOWMO_BENCH_FULL") != "1":
        pytest.skip(f"{why}; set FLOWMO_BENCH_FULL=1")


def time_row(benchmark, impls: Implementations, workload: str, impl: str, fn: Callable, flops_per_image: int,
              warmup_rounds: int = 0) -> None:
    """Time `fn` (already warm) as row `impl` of the workload's group; record throughput at the fastest round."""
    benchmark.group = f"{workload} ({impls.setting.describe()}, cpu {torch.get_num_threads()} threads)"
    benchmark.pedantic(fn, rounds=ROUNDS[workload.split(" (")[0]], iterations=1, warmup_rounds=warmup_rounds)
    if benchmark.stats is None:  # --benchmark-disable: fn ran once, untimed
        return
    seconds = benchmark.stats.stats.min
    benchmark.extra_info["images_per_s"] = round(impls.setting.batch / seconds, 3)
    benchmark.extra_info["gflop_per_s"] = round(flops_per_image * impls.setting.batch / seconds / 1e9, 2)


def check(benchmark, impls: Implementations, key: str, impl: str, values: tuple, plain_values: Callable) -> None:
    """Compare `values` (tensors) with the plain model's; record and assert the largest difference."""
    reference = impls.reference(key, (lambda: values) if impl == "plain" else plain_values)
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(values, reference, strict=True))
    benchmark.extra_info["max_abs_diff_vs_plain"] = diff
    assert diff <= TOLERANCE, f"{impl} {key} differs from the plain model by {diff:.2e}"


# --- block ---------------------------------------------------------------------------------------------


def block_inputs(impls: Implementations):
    """Random hidden states of the decoder's shapes, the time vector and the RoPE ids of the setting."""
    model, s = impls.get("plain").model, impls.setting
    p, d = model.patch_size, model.decoder.params.hidden_size
    g = torch.Generator().manual_seed(2)
    img = torch.randn(s.batch, (s.size // p) ** 2, d, generator=g)
    txt = torch.randn(s.batch, model.code_length, d, generator=g)
    with torch.no_grad():
        vec = model.decoder.time_in(timestep_embedding(torch.rand(s.batch, generator=g), TIME_EMBED_DIM))
    ids = position_ids(model.code_length, s.size // p, s.size // p, img.device)
    return img, txt, vec, ids


def block_fn(impls: Implementations, impl: str) -> Callable[[], tuple]:
    return impls.get(impl).block(*block_inputs(impls))


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "upstream_compiled"])
def test_bench_block(benchmark, sampling, impl):
    fn = block_fn(sampling, impl)
    check(benchmark, sampling, "block", impl, fn(), lambda: block_fn(sampling, "plain")())
    m, s = sampling.get("plain").model, sampling.setting
    length = m.code_length + (s.size // m.patch_size) ** 2
    per_image = flops.block_flops(m.decoder.params.hidden_size, length, length, timestep=True)
    time_row(benchmark, sampling, "block", impl, fn, per_image)


# --- encode --------------------------------------------------------------------------------------------


def encode_fn(impls: Implementations, impl: str) -> Callable[[], tuple]:
    images, implementation = impls.setting.images(), impls.get(impl)
    return lambda: (implementation.encode(images),)


@pytest.mark.parametrize("impl", IMPLS)
def test_bench_encode(benchmark, sampling, impl):
    fn = encode_fn(sampling, impl)
    check(benchmark, sampling, "encode", impl, fn(), lambda: encode_fn(sampling, "plain")())
    s = sampling.setting
    time_row(benchmark, sampling, "encode", impl, fn, flops.encoder_flops(sampling.config, s.size, s.size))


# --- reconstruct ---------------------------------------------------------------------------------------


SAMPLER = UPSTREAM.replace(steps=RECONSTRUCT_STEPS, cfg=CFG)


def reconstruct_fn(impls: Implementations, impl: str) -> Callable[[], tuple]:
    images, implementation = impls.setting.images(), impls.get(impl)
    return lambda: (implementation.reconstruct(images, SAMPLER, seed=NOISE_SEED),)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("setting", ["tiny_sampling", "sampling"])
def test_bench_reconstruct(benchmark, request, setting, impl):
    if setting == "tiny_sampling":
        skip_unless_full(impl, "upstream compiled at the tiny preset's shapes: another minute of compiling")
    impls = request.getfixturevalue(setting)
    fn = reconstruct_fn(impls, impl)
    check(benchmark, impls, "reconstruct", impl, fn(), lambda: reconstruct_fn(impls, "plain")())
    s = impls.setting
    time_row(benchmark, impls, "reconstruct", impl, fn, flops.reconstruct_flops(impls.config, s.size, s.size, SAMPLER))


# --- train step ----------------------------------------------------------------------------------------


def gradient_check(impls: Implementations, impl: str) -> tuple[float, float]:
    """(loss, gradient norm) at fixed times and noise without guidance dropout; leaves no gradients."""
    implementation, s = impls.get(impl), impls.setting
    g = torch.Generator().manual_seed(3)
    t, noise = torch.rand(s.batch, generator=g), torch.randn(s.batch, 3, s.size, s.size, generator=g)
    loss = implementation.loss(s.images(), t, noise, enable_cfg=False)
    loss.backward()
    model = implementation.model
    norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), float(norm)


@pytest.mark.parametrize("impl", IMPLS)
def test_bench_train_step(benchmark, training, impl):
    """Each implementation's own step and optimizer (ours: train/step.py's, fused Adam; upstream: its loss and
    torch.optim.Adam), one micro-batch, no norm logging (bench/impls.py)."""
    skip_unless_full(impl, "compiling upstream's training graph takes ~5 min on a 2-core CPU")
    values = gradient_check(training, impl)  # before any step, so every implementation has the same weights
    plain_values = (lambda: values) if impl == "plain" else (lambda: gradient_check(training, "plain"))
    reference = training.reference("train step", plain_values)
    rel = max(abs(v / r - 1) for v, r in zip(values, reference, strict=True))
    benchmark.extra_info["max_rel_diff_vs_plain"] = rel
    assert rel <= TOLERANCE, f"{impl} training loss or gradient norm differs from the plain model's by {rel:.2e}"
    s = training.setting
    step = training.get(impl).train_step(s.images(), training.config)
    time_row(benchmark, training, f"train step ({TRAIN_STEP_WORK})", impl, step,
             flops.train_step_flops(training.config, s.size, s.size), warmup_rounds=1)


# --- optimizer step ------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["per_tensor", "fused"])
def test_bench_optimizer_step(benchmark, impl):
    """Adam's step over the demo preset's parameters (12.6M): upstream's torch.optim.Adam (on CPU a loop over
    the tensors) against train.step.build_optimizer's fused Adam. One step's update is checked against the
    other implementation's before timing."""
    config = load_config(preset="demo")
    models = []
    for kind in ("per_tensor", impl):
        torch.manual_seed(0)
        model = FlowMo(config)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
        optimizer = build_optimizer(model, config) if kind == "fused" else upstream.upstream_optimizer(model, config)
        optimizer.step()
        models.append((model, optimizer))
    (reference, _), (model, optimizer) = models
    pairs = zip(model.parameters(), reference.parameters(), strict=True)
    diff = max(float((a.detach() - b.detach()).abs().max()) for a, b in pairs)
    benchmark.extra_info["max_abs_diff_vs_per_tensor"] = diff
    assert diff <= 1e-6, f"{impl} Adam's update differs from torch.optim.Adam's by {diff:.2e}"
    n = sum(p.numel() for p in model.parameters())
    benchmark.group = f"optimizer step (Adam, demo preset, {n / 1e6:.1f}M parameters, cpu {torch.get_num_threads()} threads)"
    benchmark.pedantic(optimizer.step, rounds=10, iterations=1, warmup_rounds=2)
