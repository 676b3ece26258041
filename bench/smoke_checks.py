"""The GPU smoke run's checks, one function per stage (bench/gpu_smoke.py runs them in order, each within its
time limit): the Triton kernels against their twins, the token generator's CUDA graph against eager `generate`,
FlowMo's graphed sampler against eager `flow.sample`, FlowMo-Lo's training memory, and the generator trainer
under torchrun. Every check is added the moment it is computed (a cut-off stage keeps what it checked). On the CPU
(`--dry-run`) each runs the same code with tiny models; what needs CUDA (graphs, Triton, peak memory) says so."""

from __future__ import annotations

import copy
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

import flowmo_fast
from bench.report import FULL, TRAIN_BATCHES, calibrated, train_batch_for
from bench.report_rows import Row
from flowmo_fast.autocast import autocast_for
from flowmo_fast.config import HIDDEN_PER_WIDTH, NUM_HEADS, rope_axes
from flowmo_fast.fastpath import FastPathChecks, difference, tolerance
from flowmo_fast.flowmo import flow
from flowmo_fast.flowmo.graphed_sampler import GraphedSampler, compile_blocks
from flowmo_fast.maskgit.model import GeneratorConfig, TokenGenerator, load_generator
from flowmo_fast.maskgit.sampling import (
    ID_SHARE,
    CompiledStep,
    GenerationOptions,
    GraphedGenerator,
    generate,
    sample_keys,
)
from flowmo_fast.sampler_settings import UPSTREAM
from flowmo_kernels import TORCH_OPS, get_ops, triton_available, triton_interpreting
from flowmo_kernels.rope import rope_tables
from flowmo_kernels.selfcheck import PROBES, SWITCH, forward_backward
from train.memory import memory_model

GIB = 2**30
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sizes:
    """What the stages run at: FlowMo-Lo/Hi's widths on a GPU, tiny ones in a dry run."""

    widths: tuple[int, ...]  # D of modulate and the gated residual
    lengths: tuple[int, ...]  # tokens L
    head_dim: int
    lfq_bits: tuple[int, ...]
    lfq_rows: int
    generator_batches: tuple[int, ...]
    wide_head: tuple[int, int, int, int]  # code length, groups, bits, batch: FlowMo-Hi's 16384-way heads at batch 8
    train_size: int  # FlowMo-Lo's training memory at this many pixels
    generator_steps: tuple[int, int]  # train.generator's first run, and how many more its resume runs


GPU_SIZES = Sizes((768, 1152), (257, 4352), 96, (9, 14, 20), 4096, (3, 5), (256, 4, 14, 8), 256, (20, 10))
DRY_SIZES = Sizes((48,), (17,), 32, (4, 9), 256, (3, 5), (8, 4, 14, 2), 32, (4, 2))


class Stages:
    """The checks of one smoke run: `smoke` is the bench/gpu_smoke.Smoke harness (device, live output, checks)."""

    def __init__(self, smoke, sizes: Sizes, work_dir: Path, compile_backend: str):
        self.smoke, self.sizes, self.work_dir, self.backend = smoke, sizes, work_dir, compile_backend
        self.device = smoke.device
        self.cuda = self.device.type == "cuda"
        self.triton = triton_available() and (self.cuda or triton_interpreting())  # the Triton kernels run here
        self.activation_scale = 1.0  # measured / estimated activations per image (train_memory), for the report

    # --- helpers -------------------------------------------------------------------------------------------------

    def check(self, name: str, value: Callable[[], float], tol: float) -> None:
        """One check, added as soon as it is computed; an error is a failed check naming it (and its traceback in
        the log)."""
        self.smoke.add_check(self.smoke.evaluate(name, value, tol))

    def note(self, text: str) -> None:
        self.smoke.live.note(text)

    def row(self, row: Row) -> None:
        self.smoke.rows.append(row)
        self.smoke.live.row(row, self.smoke.rows)

    def peak(self, fn: Callable[[], object]) -> tuple[object, Optional[float]]:
        """fn's result and the allocator's peak during it above what was allocated before (GiB; None off CUDA)."""
        if not self.cuda:
            return fn(), None
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        out = fn()
        torch.cuda.synchronize(self.device)
        return out, (torch.cuda.max_memory_allocated(self.device) - base) / GIB

    # --- kernels ---------------------------------------------------------------------------------------------------

    def kernel_args(self, op: str, size: int, length: int, dtype: torch.dtype) -> tuple:
        """The op's arguments at width `size` (LFQ: `size` bits) and `length` tokens, in `dtype`."""
        g = torch.Generator(self.device).manual_seed(size * 7919 + length)

        def rand(*shape, dt=dtype):
            return torch.randn(*shape, generator=g, device=self.device).to(dt)

        if op == "modulate":
            return rand(2, length, size), rand(2, 1, size), rand(2, 1, size), dtype
        if op == "gated_residual":
            return rand(2, length, size), rand(2, 1, size), rand(2, length, size)
        if op == "qk_norm_rope":
            d = self.sizes.head_dim
            qkv = rand(1, length, 3 * NUM_HEADS * d)
            q, k, _ = qkv.unflatten(-1, (3, NUM_HEADS, d)).permute(2, 0, 3, 1, 4)  # strided, as the model's
            ids = torch.randint(0, 64, (length, 3), generator=g, device=self.device)
            cos, sin = rope_tables(ids, rope_axes(d // (HIDDEN_PER_WIDTH // NUM_HEADS)))  # the model's axes
            return q, k, 1 + rand(d, dt=torch.float32), 1 + rand(d, dt=torch.float32), cos, sin, dtype
        return (0.1 * rand(self.sizes.lfq_rows, size),)

    def kernels(self) -> None:
        """Every Triton op against its twin, forward and backward, bf16 first (what CUDA runs), then float32 (in a dry
        run with TRITON_INTERPRET=1 in the CPU interpreter)."""
        fast = get_ops("triton", self.device) if self.triton else TORCH_OPS
        if fast is TORCH_OPS:
            self.note("kernels: Triton runs on CUDA (or TRITON_INTERPRET=1); here the twins run against themselves")
        s = self.sizes
        cases = [(op, size, length) for op in ("modulate", "gated_residual")
                 for size in s.widths for length in s.lengths]
        cases += [("qk_norm_rope", s.head_dim, length) for length in s.lengths]
        cases += [("lfq", bits, s.lfq_rows) for bits in s.lfq_bits]
        for dtype in (torch.bfloat16, torch.float32):
            for op, size, length in cases:
                self.kernel_check(fast, op, size, length, dtype)

    def kernel_check(self, fast, op: str, size: int, length: int, dtype: torch.dtype) -> None:
        args = self.kernel_args(op, size, length, dtype)
        constants = PROBES[op](*args).constants
        tol = tolerance(dtype)
        name = f"triton {op} {'d' if op == 'lfq' else 'head dim' if op == 'qk_norm_rope' else 'D'}={size}"
        name += f" {'N' if op == 'lfq' else 'L'}={length} {str(dtype).removeprefix('torch.')}, fwd+bwd vs twin"
        found = []

        def rel_l2() -> float:
            found.append(difference(forward_backward(getattr(fast, op), args, constants),
                                    forward_backward(getattr(TORCH_OPS, op), args, constants)))
            return found[0].rel_l2

        self.check(f"{name} (rel L2)", rel_l2, tol.rel_l2)
        if op == "lfq" and found:
            self.check(f"{name} (indices differing)", lambda: found[0].share, 0.0)

    # --- the token generator ---------------------------------------------------------------------------------------

    def generator(self) -> None:
        """The CUDA-graph path (replays under sync debug mode "error": a host sync raises) against eager `generate`
        at two batches, with and without classes; then FlowMo-Hi-sized heads (16384-way), eager and fast, with
        their peak memory. On the CPU the fast path is the compiled step without a graph."""
        lo = FULL.models["FlowMo-Lo"]
        m = flowmo_fast.load_config(list(lo[1]), preset=lo[0]).model
        torch.manual_seed(0)
        with torch.device(self.device):
            model = TokenGenerator(GeneratorConfig(m.code_length if self.cuda else 16, 2, m.codebook_size_for_entropy,
                                                   num_classes=10, width=64, depth=2, heads=4)).eval()
        options = GenerationOptions(steps=8, cfg=3.0)
        fast = self.fast_generator(model, compile=False)
        for batch in self.sizes.generator_batches:
            for conditional in (True, False):
                self.generator_check(model, fast, batch, conditional, options, share=0.0)
        t, groups, bits, batch = self.sizes.wide_head
        torch.manual_seed(0)
        with torch.device(self.device):
            wide = TokenGenerator(GeneratorConfig(t, groups, bits, num_classes=10, width=64, depth=2, heads=4)).eval()
        self.generator_check(wide, self.fast_generator(wide, compile=True), batch, True, options, share=ID_SHARE,
                             memory=True)

    def without_sync(self, fn: Callable[[], object]) -> object:
        """fn() with every host synchronisation an error on CUDA (`torch.cuda.set_sync_debug_mode("error")`)."""
        if not self.cuda:
            return fn()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)

    def fast_generator(self, model: TokenGenerator, compile: bool) -> Callable:
        """The CUDA-graph path (on the CPU `generate` itself); with `compile`, its sampling step the compiled chain
        (the blocks stay eager: compiling them would take most of the stage's limit and is checked elsewhere)."""
        step = CompiledStep(model.fast_checks, backend=self.backend) if compile else None
        if self.cuda:
            graphed = GraphedGenerator(model, compile=False)
            graphed.step = step or graphed.step
            return graphed
        return lambda labels, keys, options: generate(model, labels, keys, options, *([step] if step else []))

    def generator_check(self, model, fast, batch: int, conditional: bool, options, share: float,
                        memory: bool = False) -> None:
        c = model.config
        labels = (torch.arange(batch) % c.num_classes).to(self.device) if conditional else None
        keys = [sample_keys(seed, labels.tolist() if conditional else [-1] * batch, list(range(batch)), self.device)
                for seed in (0, 1)]
        with autocast_for(self.device):
            _, first_gib = self.peak(lambda: fast(labels, keys[0], options))  # a capture (and its self-check)
            got, fast_gib = self.peak(lambda: self.without_sync(lambda: fast(labels, keys[1], options)))  # a replay
            want, eager_gib = self.peak(lambda: generate(model, labels, keys[1], options))
        what = f"generator {c.groups} x {c.vocab_size}-way heads, batch {batch}, "
        what += "classes" if conditional else "no classes"
        self.check(f"{what}: {'graph' if self.cuda else 'compiled step'} vs eager generate (ids differing)",
                   lambda: float((got != want).float().mean()), share)
        self.check(f"{what}: fast paths passed their self-checks (failed keys)",
                   lambda: float(len(model.fast_checks.failed())), 0.0)
        if memory:
            for impl, gib in (("eager generate", eager_gib), ("fast, first call", first_gib), ("fast", fast_gib)):
                self.row(Row(f"generate {options.steps} steps, {c.vocab_size}-way heads", "tiny generator", impl,
                             batch, None, peak_gib=gib, note="" if gib is not None else "peak memory: CUDA only"))

    # --- FlowMo's sampler ------------------------------------------------------------------------------------------

    def sampler(self) -> None:
        """Tiny FlowMo through `sample_images` (CUDA graphs on CUDA; kernels auto and triton, compile off and on,
        weights cast for inference) against eager `flow.sample` with the plain kernels; then what the self-checks
        cost at a first call."""
        config = flowmo_fast.load_config(["data.image_size=32"], preset="tiny")
        torch.manual_seed(0)
        with torch.device(self.device):
            plain = flowmo_fast.FlowMo(config).eval()
        plain.kernels, plain.cuda_graphs = "torch", False
        plain.cast_for_inference()
        g = torch.Generator().manual_seed(3)
        quantized = torch.randn(3, plain.code_length, config.model.context_dim, generator=g).sign().to(self.device)
        noise = torch.randn(3, 3, 32, 32, generator=g).to(self.device)
        sampling = UPSTREAM.replace(steps=4, cfg_interval=None)  # every step guided: one decoder variant to compile
        with torch.no_grad(), autocast_for(self.device):
            code = plain.with_mask(quantized)
            want = flow.sample(plain, noise, code, code * 0.0, sampling).clamp(-1, 1).float()
        # the uncompiled paths first, then what compiles (the cost rows reuse auto's compiled code): a stage cut at
        # its limit loses its most expensive checks, not the cheap ones
        for kernels, compiled in (("auto", False), ("triton", False), ("auto", True), ("triton", True)):
            if kernels == "triton" and compiled:
                self.check_cost(plain, quantized, noise, sampling)
            if kernels == "triton" and not self.triton:
                self.note(f"sampler kernels=triton compile={compiled}: skipped, Triton runs on CUDA")
                continue
            self.sampler_check(plain, kernels, compiled, quantized, noise, sampling, want)

    def sampler_check(self, plain, kernels: str, compiled: bool, quantized, noise, sampling, want) -> None:
        fast = self.fast_flowmo(plain, kernels, compiled)
        what = f"tiny FlowMo sample_images, kernels={kernels}, compile={'on' if compiled else 'off'}"
        what += ", CUDA graph" if self.cuda else ""
        images = lambda: fast.sample_images(quantized, (32, 32), sampling, noise=noise)  # noqa: E731
        self.check(f"{what} vs eager flow.sample (rel L2)", lambda: difference(images(), want).rel_l2,
                   tolerance(torch.bfloat16 if self.cuda else torch.float32).rel_l2)
        self.check(f"{what}: fast paths passed their self-checks (failed keys)",
                   lambda: float(len(fast.fast_checks.failed())), 0.0)

    def fast_flowmo(self, plain, kernels: str, compiled: bool):
        """A copy of `plain` with `kernels`, CUDA graphs, its own self-checks, the blocks compiled or not (the
        graphed sampler compiles them at its first capture unless told not to)."""
        fast = copy.deepcopy(plain)
        fast.kernels, fast.cuda_graphs = kernels, True
        fast.fast_checks = FastPathChecks()
        fast._graphed_sampler = GraphedSampler(fast, compile=compiled)
        if compiled:
            compile_blocks(fast, dynamic=False, backend=self.backend)
        return fast

    def check_cost(self, plain, quantized, noise, sampling) -> None:
        """First `sample_images` calls of fresh fast models (compiled code already in dynamo's cache: what is left
        is capturing and the checks) without the self-checks and with them, alternating, the fastest of two each:
        the difference is what the checks cost at start-up."""
        seconds = {False: math.inf, True: math.inf}
        for checked in (False, True, False, True):
            fast = self.fast_flowmo(plain, "auto", compiled=True)
            previous = os.environ.get(SWITCH)
            os.environ[SWITCH] = "1" if checked else "0"
            try:
                start = time.perf_counter()
                fast.sample_images(quantized, (32, 32), sampling, noise=noise)
                if self.cuda:
                    torch.cuda.synchronize(self.device)
                seconds[checked] = min(seconds[checked], time.perf_counter() - start)
            finally:
                os.environ.pop(SWITCH) if previous is None else os.environ.__setitem__(SWITCH, previous)
        for checked in (False, True):
            cost = f"the self-checks add {1000 * (seconds[True] - seconds[False]):.0f} ms" if checked else ""
            self.row(Row(f"first sample_images call, self-checks {'on' if checked else 'off'}", "tiny FlowMo", "fast",
                         3, None, ms=1000 * seconds[checked], note=cost))

    # --- FlowMo-Lo's training memory -------------------------------------------------------------------------------

    def train_memory(self) -> None:
        """Plain eager FlowMo-Lo (bf16 autocast on CUDA), loss + backward at batches 1 and 2: the peak memory of
        each, per image and fixed, and from them the report's train batch (the largest of 8, 4, 2, 1 that fits)."""
        preset, overrides = FULL.models["FlowMo-Lo"]
        size = self.sizes.train_size
        config = flowmo_fast.load_config([*overrides, f"data.image_size={size}"],
                                         preset=preset if self.cuda else "tiny")
        parameters, peaks = self.training_peaks(config, size)  # the model is freed on return
        for batch, gib in peaks.items():
            note = f"{parameters / 1e6:.0f}M parameters" if gib is not None else "peak memory: CUDA only"
            self.row(Row(f"train loss + backward, {size}px (plain eager)", "FlowMo-Lo", "plain", batch, None,
                         peak_gib=gib, note=note))
        if self.cuda:
            torch.cuda.empty_cache()
            self.choose_train_batch(config, peaks)

    def training_peaks(self, config, size: int) -> tuple[int, dict[int, Optional[float]]]:
        """(parameters, batch -> peak GiB of one loss + backward) of a fresh plain model in training mode."""
        torch.manual_seed(0)
        with torch.device(self.device):
            model = flowmo_fast.FlowMo(config).train()
        model.kernels = "torch"
        peaks = {}
        for batch in (1, 2):
            images = torch.rand(batch, 3, size, size, device=self.device) * 2 - 1

            def step():
                with autocast_for(self.device):
                    loss = flow.rectified_flow_loss(model, images).loss
                loss.backward()
                model.zero_grad(set_to_none=True)

            peaks[batch] = self.peak(step)[1]
        return sum(p.numel() for p in model.parameters()), peaks

    def choose_train_batch(self, config, peaks: dict) -> None:
        """The activations per image measured (batch 2 - batch 1) against train.memory's estimate: their ratio
        calibrates the estimate the report's train rows are sized by (its fixed parts: weights, gradients, Adam)."""
        estimate = memory_model(config)
        per_image = (peaks[2] - peaks[1]) * GIB
        self.activation_scale = per_image / estimate.per_image
        free = torch.cuda.mem_get_info(self.device)[0]
        batch = train_batch_for(calibrated(estimate, self.activation_scale).largest_fitting(free), max(TRAIN_BATCHES))
        self.note(f"train batch {batch} for the report: {per_image / GIB:.1f} GiB per image measured, "
                  f"{estimate.per_image / GIB:.1f} estimated by train.memory (x{self.activation_scale:.2f}), "
                  f"{free / GIB:.0f} GiB free")

    # --- the generator trainer under torchrun ----------------------------------------------------------------------

    def generator_training(self, left: Callable[[], float]) -> None:
        """Token shards of the bundled photos (a random tiny FlowMo's encoder), then `torchrun -m train.generator
        --preset tiny` with FSDP2 (compiled on CUDA) for a few steps, then its resume for a few more."""
        work = self.work_dir / "generator_training"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        tokens = self.tokens(work)
        steps, more = self.sizes.generator_steps
        common = ["--tokens", str(tokens), "--preset", "tiny", "--results-dir", str(work), "--experiment-name", "run",
                  f"trainer.compile={'true' if self.cuda else 'false'}", "trainer.fsdp=true",
                  f"trainer.checkpoint_every={steps}", "trainer.log_every=2"]
        what = f"train.generator tiny, FSDP2{', compiled' if self.cuda else ''}"
        first = self.torchrun([*common, f"trainer.max_steps={steps}"], work / "first.log", left)
        self.check(f"{what}, {steps} steps under torchrun (exit code)", lambda: float(first), 0.0)
        second = self.torchrun([*common, f"trainer.max_steps={steps + more}"], work / "resume.log", left)
        resumed = f"(step {steps})" in (work / "resume.log").read_text()
        self.check(f"{what}, resumed for {more} more (exit code)", lambda: float(second), 0.0)
        final = work / "run" / "checkpoints" / f"{steps + more:08d}.pth"
        self.check(f"{what}: the resume continued from step {steps} and saved step {steps + more} (0: yes)",
                   lambda: float(not (resumed and load_generator(str(final)).total_steps == steps + more)), 0.0)

    def tokens(self, work: Path) -> Path:
        """The bundled photos and their mirror images through a random tiny FlowMo: 18 token rows."""
        from flowmo_fast import tokenize

        torch.manual_seed(0)
        checkpoint = work / "tiny_flowmo.pth"
        flowmo_fast.save_checkpoint(str(checkpoint), flowmo_fast.FlowMo(flowmo_fast.load_config(preset="tiny")))
        tokenize.main(["--ckpt", str(checkpoint), "--out", str(work / "tokens"), "--flip", "--no-compile",
                       "--num-workers", "0", "--device", self.device.type])
        return work / "tokens"

    def torchrun(self, args: list[str], log: Path, left: Callable[[], float]) -> int:
        """The trainer under torchrun (one process), its output in `log`; its exit code (124: out of time)."""
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                   "-m", "train.generator", *args]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        with open(log, "w") as out:
            try:
                return subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      timeout=max(left() - 1, 1)).returncode
            except subprocess.TimeoutExpired:
                return 124
            finally:
                if log.exists() and log.stat().st_size:
                    print(f"--- {log.name} (tail) ---\n{log.read_text()[-1500:]}", file=sys.stderr, flush=True)
