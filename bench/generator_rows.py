"""The GPU report's token-generator workloads (bench/gpu_report.py runs them through its harness, as an invocation
of their own: `--phases generator`): the generator's training step (its MFU) and token rows per second of
`generate` alone, for FlowMo-Lo's tokens. Decoding the rows into pictures is FlowMo's sampler, which the
tokenizer's reconstruct rows time already (it was 93% of a generate + decode row).

plain = the generator eager; fast = its blocks compiled, its sampling step one compiled kernel chain and its
sampling loop one CUDA graph (flowmo_fast.maskgit.sampling.GraphedGenerator; on the CPU the compiled step without
a graph). bf16 autocast on CUDA. The generator is the B preset (the tiny one in --dry-run), 1000 classes, random
weights.
"""

from __future__ import annotations

import torch

from bench.report import Report
from bench.report_rows import Check, Row
from flowmo_fast.autocast import autocast_for
from flowmo_fast.maskgit.model import TokenGenerator
from flowmo_fast.maskgit.sampling import CompiledStep, GenerationOptions, GraphedGenerator, generate, sample_keys
from train.generator_config import preset_model
from train.generator_data import TokenLayout

CLASSES = 1000
FULL_BATCH = 64  # rows of a training step and of a generate call
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


def generate_rows(report: Report, name: str, impl: str) -> None:
    """Class-conditional token rows (guided), `generate` alone: rows/s; fast vs plain: the share of ids that
    differ."""
    _, batch, options = setting(report)
    row = Row(f"generate ({options.steps} steps, cfg {options.cfg})", name, impl, batch, None)

    def run():
        model = build_generator(report, name, impl).eval()
        row.flops_per_image = options.steps * model.matmul_flops(2)  # guided: 2 rows per image and step
        labels = (torch.arange(batch) * 7 % CLASSES).to(report.device)
        keys = sample_keys(0, labels.tolist(), list(range(batch)), report.device)
        sample = lambda: generate(model, labels, keys, options)  # noqa: E731
        if impl == "fast" and report.device.type == "cuda":
            graphed = GraphedGenerator(model)
            sample = lambda: graphed(labels, keys, options)  # noqa: E731
        elif impl == "fast":
            step = CompiledStep(model.fast_checks, backend=report.models.compile_backend)
            sample = lambda: generate(model, labels, keys, options, step)  # noqa: E731

        def fn():
            with autocast_for(report.device):
                return sample()

        report.compare(row, report.measure(row, fn), kind="ids")

    report.attempt(f"generate {name} {impl}", report.reserve(impl), run, row)
