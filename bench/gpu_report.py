"""GPU performance report: our fast path against our plain path and upstream, as one markdown table.

    python bench/gpu_report.py --out DIR          # on a CUDA machine (H100 / H200): ends within 6 minutes
    FLOWMO_REFERENCE=/path/to/FlowMo python bench/gpu_report.py    # adds upstream's rows
    python bench/gpu_report.py --dry-run          # anywhere: tiny models on the CPU, the same code paths
    python bench/gpu_report.py --phases kernels,lfq  # a subset (e.g. what a first run's budget skipped)
    python bench/gpu_report.py --phases generator    # the token generator's rows: their own invocation

fast = regional torch.compile of the blocks + Triton kernels (`kernels="auto"`) + the CUDA-graph sampler;
plain = eager, PyTorch kernels, no CUDA graphs; upstream_eager / upstream_compiled = upstream's FlowMo
(its own @torch.compile decorators) with the same config and weights (bench/impls.py: one adapter for all).
bf16 autocast on CUDA, as in training and evaluation. Random weights, built directly on the device.

Every check and row is printed (a markdown line and a JSON line) and appended to `--out`'s live files the
moment it is done, so a run killed at any point keeps what it measured; the whole table prints at the end.
The time budget (`--budget-s`) counts from the start of the process, imports and CUDA start-up included; a
phase starts only with the time it needs left (`Scale.phase_s`), a row only with its reserve. Inductor's and
Triton's caches live in `--cache-dir` (default under /tmp): a rerun on the same machine skips compiling.

Phases, most valuable first (NVTX ranges); one batch size per phase, so every compiled variant is reused:
decoder (forward, FlowMo-Lo, batch 32: the MFU target; fast vs plain is a check), reconstruct (batch 32, 25 steps,
cfg 1.5; the sampler warmed on a 3-step plan, which compiles what the full plan runs, before its first timed call
captures), train (Lo and Hi, batch 8 as one micro-batch without norm logging on every side: forward, backward,
Adam; checked first at that batch), latency (reconstruct at batch 1), encode (token ids, batch 32, Lo and Hi),
lfq (the LFQ loss: torch vs Triton vs upstream), kernels (each fused op eager / compiled / Triton, which sets
flowmo_kernels.AUTO_WHEN_COMPILED; decoder and train step with Triton forced: `fast_triton`), upstream_compiled
(its whole-model compiles take minutes: last). The model phases run plain, fast and upstream eager. The token
generator's phase (its train step and `generate` alone at batch 64: bench/generator_rows.py) is its own
invocation: `--phases generator`. The train rows' batch is the largest of 8, 4, 2, 1 that train.memory's estimate
(scaled by the smoke's measurement where it ran first) fits in the memory free once the phase has released the
inference models (8 on an 80 GB H100 for FlowMo-Lo at 256 px by the estimate).

Times are the median of the timed calls after a warm-up call (compilation, CUDA-graph capture). Peak
memory is the allocator's peak during the row minus what was allocated before it. FLOPs are counted
analytically (flowmo_fast/flowmo/flops.py, printed), the count training logs use for MFU.
"""

from __future__ import annotations

import time

START = time.perf_counter()  # the budget counts from here, before the imports (torch's take seconds)

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository root holds `bench` and the packages
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import generator_rows, kernel_rows  # noqa: E402
from bench.harness import BudgetExceeded, log, use_compile_cache  # noqa: E402
from bench.impls import TRAIN_STEP_WORK  # noqa: E402
from bench.report import (  # noqa: E402
    ALONE,
    CHECKED,
    DEFAULT_BUDGET_S,
    DEFAULT_CACHE_DIR,
    DEFAULT_PHASES,
    DRY,
    FULL,
    MODEL_ROWS,
    PHASES,
    Report,
    ReportSettings,
    short_plan,
)
from bench.report_rows import Check, Row  # noqa: E402
from flowmo_fast.fastpath import raise_recompile_limit  # noqa: E402
from flowmo_fast.flowmo import flops  # noqa: E402


class GpuReport(Report):
    """The report's workloads (model rows here, op and generator rows in bench/kernel_rows.py and
    bench/generator_rows.py) and the order its phases run in."""

    # --- workloads ------------------------------------------------------------------------------------

    def decoder_forward(self, name: str, impl: str) -> None:
        sc = self.scale
        row = Row("decoder forward", name, impl, sc.batch, flops.decoder_flops(self.models.config(name), sc.size, sc.size))

        def run():
            implementation, m = self.models.get(name, impl), self.models.config(name).model
            g = torch.Generator(self.device).manual_seed(7)
            zt = torch.randn(sc.batch, 3, sc.size, sc.size, generator=g, device=self.device)
            code = torch.randn(sc.batch, m.code_length, m.context_dim + 1, generator=g, device=self.device).sign()
            t = torch.rand(sc.batch, generator=g, device=self.device)
            diff = self.compare(row, self.measure(row, lambda: implementation.decode(zt, code, t)))
            if impl == "fast" and diff is not None:
                self.add_check(Check(f"{name} decoder forward, fast vs plain (rel L2)", diff, sc.tolerance))

        self.attempt(f"decoder forward {name} {impl}", self.reserve(impl), run, row)

    def reconstruct(self, name: str, impl: str, batch: int, workload: str) -> None:
        """Images -> reconstructions; the sampler warmed on a short plan first (its compiles, not its steps)."""
        sampling = self.sampling()
        per_image = flops.reconstruct_flops(self.models.config(name), self.scale.size, self.scale.size, sampling)
        row = Row(workload, name, impl, batch, per_image)

        def run():
            implementation, images = self.models.get(name, impl), self.images(batch)
            warm = lambda: implementation.reconstruct(images, short_plan(sampling), seed=1)  # noqa: E731
            out = self.measure(row, lambda: implementation.reconstruct(images, sampling, seed=1), warm=warm)
            self.compare(row, out)

        self.attempt(f"{workload} {name} {impl}", self.reserve(impl), run, row)

    def train_checks(self, name: str) -> None:
        """Fast against plain: training loss and gradient norm at the train rows' batch (their compiled variant)."""
        values = {impl: self.loss_and_grad_norm(name, impl) for impl in ("plain", "fast")}
        (loss_p, norm_p), (loss_f, norm_f) = values["plain"], values["fast"]
        tol = self.scale.tolerance
        self.add_check(Check(f"{name} training loss, fast vs plain (rel)", abs(loss_f / loss_p - 1), tol))
        self.add_check(Check(f"{name} gradient norm, fast vs plain (rel)", abs(norm_f / norm_p - 1), tol))

    def loss_and_grad_norm(self, name: str, impl: str) -> tuple[float, float]:
        """Training loss and gradient norm at fixed times and noise, no guidance dropout; no step taken."""
        b, s = self.train_batch(name), self.scale.size  # chosen before this model takes its memory
        implementation = self.models.get(name, impl, training=True)
        model = implementation.model.train()
        g = torch.Generator(self.device).manual_seed(6)
        t = torch.rand(b, generator=g, device=self.device)
        noise = torch.randn(b, 3, s, s, generator=g, device=self.device)
        try:
            loss = implementation.loss(self.images(b), t, noise, enable_cfg=False)
            loss.backward()
            grads = [p.grad.float().flatten() for p in model.parameters() if p.grad is not None]
            return float(loss.detach()), float(torch.linalg.vector_norm(torch.cat(grads)))
        finally:  # later rows get the model in eval mode, without gradients, even after a failure
            model.zero_grad(set_to_none=True)
            model.eval()

    def train_step(self, name: str, impl: str) -> None:
        sc = self.scale
        per_image = flops.train_step_flops(self.models.config(name), sc.size, sc.size)
        batch = self.train_batch(name)
        row = Row(f"train step ({TRAIN_STEP_WORK})", name, impl, batch, per_image)

        def run():
            implementation = self.models.get(name, impl, training=True)
            implementation.model.train()
            step = implementation.train_step(self.images(batch), self.models.config(name))
            try:
                self.measure(row, step)
            finally:  # the optimizer's state goes with `step`
                implementation.model.zero_grad(set_to_none=True)
                with torch.no_grad():  # back to the initial weights, which the later rows compare against
                    implementation.model.load_state_dict(self.models.initial_weights(name))
                implementation.model.eval()

        self.attempt(f"train step {name} {impl}", self.reserve(impl), run, row)

    def encode(self, name: str, impl: str) -> None:
        sc = self.scale
        per_image = flops.encoder_flops(self.models.config(name), sc.size, sc.size)
        row = Row("encode (token ids)", name, impl, sc.batch, per_image)

        def run():
            implementation, images = self.models.get(name, impl), self.images(sc.batch, seed=2)
            self.compare(row, self.measure(row, lambda: implementation.token_ids(images)), kind="ids")

        self.attempt(f"encode {name} {impl}", self.reserve(impl), run, row)

    # --- the whole report -----------------------------------------------------------------------------

    def phase_steps(self) -> dict:
        """Phase -> what it runs, one model at a time where it can (a model's weights are freed before the next)."""
        lo, *others = self.scale.models
        batch = self.scale.batch

        def each(workload, names=(lo,)):
            def steps():
                for name in names:
                    for impl in MODEL_ROWS:
                        workload(name, impl)
                    if name != lo:
                        self.models.release(name)
            return steps

        def train():
            self.models.release(lo, inference_only=True)  # their weights and captured graphs: memory training needs
            for name in (lo, *others):  # each chosen from the memory free before any training model takes some
                self.train_batch(name)
            self.attempt(f"train checks {lo}", 0, lambda: self.train_checks(lo))
            each(self.train_step, (lo, *others))()

        def kernels():
            for op in ("modulate", "gated_residual", "qk_norm_rope"):
                for impl in ("torch", "torch compiled", "triton"):
                    kernel_rows.kernel_op(self, lo, op, impl)
            self.decoder_forward(lo, "fast_triton")
            self.train_step(lo, "fast_triton")

        return {
            "decoder": each(self.decoder_forward),
            "reconstruct": each(lambda n, i: self.reconstruct(n, i, batch, "reconstruct")),
            "train": train,
            "latency": each(lambda n, i: self.reconstruct(n, i, 1, "reconstruct latency (batch 1)")),
            "encode": each(self.encode, (lo, *others)),
            "lfq": lambda: [kernel_rows.lfq_loss(self, name, impl) for name in (lo, *others) for impl in ("torch", "triton", "upstream")],
            "kernels": kernels,
            "generator": lambda: [workload(self, lo, impl) for workload in (generator_rows.train_step,
                                  generator_rows.generate_rows) for impl in ("plain", "fast")],
            "upstream_compiled": self.upstream_compiled,
        }

    def upstream_compiled(self) -> None:
        lo, *others = self.scale.models
        if self.settings.dry_run:
            self.rows.append(Row("reconstruct, decoder forward, train step, encode", "all", "upstream_compiled", 0,
                                 None, note="not run in --dry-run (inductor compiles for minutes on a CPU)"))
            self.live.row(self.rows[-1], self.rows)
            return
        self.models.release(lo)  # its compiled rows only from here on
        self.reconstruct(lo, "upstream_compiled", self.scale.batch, "reconstruct")
        for workload in (self.decoder_forward, self.train_step, self.encode):
            workload(lo, "upstream_compiled")
        self.models.release(lo)
        for name in others:
            self.train_step(name, "upstream_compiled")
            self.models.release(name)

    def run(self) -> None:
        """The phases of `--phases`, in order of value, each only with the time it needs left."""
        steps = self.phase_steps()
        for phase in PHASES:
            if phase in self.settings.phases and self.phase(phase, self.scale.phase_s[phase]):
                steps[phase]()


def parse_args(argv: Optional[list[str]] = None) -> ReportSettings:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny models on the CPU: exercise every code path")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds from the process's start after which no row starts and a running one stops "
                        f"(default {DEFAULT_BUDGET_S:.0f}: the whole run ends within 6 minutes)")
    p.add_argument("--target-s", type=float, default=3.0, help="time each row for about this long (default 3)")
    p.add_argument("--max-iters", type=int, default=20, help="at most this many timed calls per row (default 20)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend of the fast path (default: inductor; eager in --dry-run)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON (at the end)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write DIR/live.md and live.jsonl as rows finish (a killed run keeps them), and "
                        "DIR/report.md and report.json at the end")
    p.add_argument("--phases", default=",".join(DEFAULT_PHASES),
                   help=f"comma-separated subset of {','.join(PHASES)} (default: all but {ALONE}, which runs as its "
                        f"own invocation, --phases {ALONE}; e.g. to rerun what a first run's budget skipped)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR,
                   help=f"Inductor's and Triton's compile caches (default {DEFAULT_CACHE_DIR}: kept on the machine)")
    args = p.parse_args(argv)
    phases = tuple(x.strip() for x in args.phases.split(",") if x.strip())
    unknown = sorted(set(phases) - set(PHASES))
    if unknown or not phases:
        p.error(f"--phases: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(PHASES)}")
    if ALONE in phases and len(phases) > 1:
        p.error(f"--phases: {ALONE} runs as its own invocation (--phases {ALONE}), not with {', '.join(phases)}")
    backend = args.compile_backend or ("eager" if args.dry_run else "inductor")
    return ReportSettings(args.dry_run, args.budget_s, args.target_s, args.max_iters, backend, args.json, args.out,
                          phases, args.cache_dir)


def main(argv: Optional[list[str]] = None, start: Optional[float] = None) -> int:
    """`start`: the time.perf_counter() the budget counts from (default now)."""
    settings = parse_args(argv)
    if settings.dry_run:
        device, scale = torch.device("cpu"), DRY
    elif torch.cuda.is_available():
        device, scale = torch.device("cuda", torch.cuda.current_device()), FULL
    else:
        print("gpu_report: no CUDA device here; run with --dry-run to exercise the report on the CPU", file=sys.stderr)
        return 2
    use_compile_cache(Path(settings.cache_dir))
    raise_recompile_limit()  # the upstream compiled rows need it too
    report = GpuReport(settings, scale, device, start)
    report.live.start(report.header())
    report.budget.arm()
    try:
        report.run()
    except BudgetExceeded:
        log(report.budget, "time budget spent; printing what ran")
    finally:
        report.budget.disarm()
        report.finish()
    failed = [c for c in report.checks if not c.passed]
    return 1 if failed or (not report.checks and set(CHECKED) & set(settings.phases)) else 0


if __name__ == "__main__":
    sys.exit(main(start=START))

