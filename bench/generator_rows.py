"""The GPU report's token-generator workloads (bench/gpu_report.py runs them through its harness, after the
tokenizer's rows): the generator's training step (its MFU) and images/s of generating token rows and decoding
them into pictures, for FlowMo-Lo's tokens.

plain = the generator eager and FlowMo's plain sampler; fast = the generator's blocks compiled, its sampling loop
one CUDA graph (flowmo_fast.maskgit.sampling.GraphedGenerator), and FlowMo's fast path (compiled blocks, Triton kernels,
CUDA-graph sampler). bf16 autocast on CUDA. The generator is the B preset (the tiny one in --dry-run), 1000
classes, random weights.
"""

from __future__ import annotations

import torch

from bench.report import Report
from bench.report_rows import Check, Row
from flowmo_fast.codec import Tokenizer
from flowmo_fast.flowmo import flops
from flowmo_fast.flowmo.model import autocast_for
from flowmo_fast.maskgit.model import TokenGenerator
from flowmo_fast.maskgit.sampling import GenerationOptions, GraphedGenerator, generate, sample_keys
from train.generator_config import preset_model
from train.generator_data import TokenLayout

CLASSES = 1000
FULL_BATCH = 64  # rows of a training step, and images of generate + decode
FULL_OPTIONS = GenerationOptions().fitted(512)  # eval.generate's defaults: 64 steps (512 and 1024 groups)
DRY_OPTIONS = GenerationOptions(steps=4)


def setting(report: Report) -> tuple[str, int, GenerationOptions]:
    """(generator preset, batch, sampler options) of this report's scale."""
    if report.settings.dry_run:
        return "tiny", report.scale.batch, DRY_OPTIONS
    return "B", FULL_BATCH, FULL_OPTIONS


def build_generator(report: Report, name: str, impl: str) -> TokenGenerator:
    """The generator for `name`'s tokens, the same random weights for every impl; fast: blocks compiled."""
    m = report.models.config(name).model
    torch.manual_seed(0)
    layout = TokenLayout(m.code_length, m.context_dim, m.codebook_size_for_entropy, CLASSES)
    config = preset_model(setting(report)[0], layout)
    with torch.device(report.device):
        model = TokenGenerator(config)
    if impl == "fast":
        model.compile_blocks(dynamic=False, backend=report.models.compile_backend)
    return model


def train_step(report: Report, name: str, impl: str) -> None:
    """Loss (masking and label dropout drawn), backward, fused AdamW step; fast vs plain: the first loss."""
    _, batch, _ = setting(report)
    row = Row(f"generator train step ({setting(report)[0]} preset)", name, impl, batch, None)

    def run():
        model = build_generator(report, name, impl)
        row.flops_per_image = 3 * model.matmul_flops(1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=report.device.type == "cuda" or None)
        g = torch.Generator().manual_seed(5)
        ids = torch.randint(0, model.config.vocab_size, (batch, model.config.tokens_per_image), generator=g)
        labels = torch.randint(0, CLASSES, (batch,), generator=g)
        ids, labels = ids.to(report.device), labels.to(report.device)

        def step():
            with autocast_for(report.device):
                loss = model.loss(ids, labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss.detach().float()

        torch.manual_seed(6)
        first = report.measure(row, step)
        key = (row.workload, row.model)
        if impl == "plain":
            report.outputs[key] = first
        elif key in report.outputs:
            diff = float((first / report.outputs[key] - 1).abs())
            row.check = f"first loss rel {diff:.1e}"
            label = f"{name} generator training loss, fast vs plain (rel)"
            report.add_check(Check(label, diff, report.scale.tolerance))

    report.attempt(f"generator train step {name} {impl}", report.reserve(impl), run, row)


def generate_and_decode(report: Report, name: str, impl: str) -> None:
    """Class-conditional token rows (guided), then FlowMo's sampler (the report's reconstruct settings) on them:
    images/s of the whole pipeline; fast vs plain: the share of token ids that differ."""
    _, batch, options = setting(report)
    size = report.scale.size
    sampling = report.sampling()
    workload = f"generate ({options.steps} steps, cfg {options.cfg}) + decode ({sampling.steps} steps)"
    row = Row(workload, name, impl, batch, None)

    def run():
        model = build_generator(report, name, impl).eval()
        tokenizer = report.models.get(name, impl).model  # FlowMo of this impl: its sampler path
        decode_flops = flops.decoder_passes(sampling) * flops.decoder_flops(report.models.config(name), size, size)
        row.flops_per_image = options.steps * model.matmul_flops(2) + decode_flops  # guided: 2 rows per image
        labels = (torch.arange(batch) * 7 % CLASSES).to(report.device)
        keys = sample_keys(0, labels.tolist(), list(range(batch)), report.device)
        noise = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(9)).to(report.device)
        graphed = GraphedGenerator(model, compile=False) if impl == "fast" and report.device.type == "cuda" else None

        def fn():
            with autocast_for(report.device):
                ids = graphed(labels, keys, options) if graphed else generate(model, labels, keys, options)
            code = Tokenizer(tokenizer).ids_to_code(ids)
            tokenizer.sample_images(code, (size, size), sampling, noise=noise)
            return ids

        report.compare(row, report.measure(row, fn), kind="ids")

    report.attempt(f"generate + decode {name} {impl}", report.reserve(impl), run, row)
