"""GPU performance report: our fast path against our plain path and upstream, as one markdown table.

    python bench/gpu_report.py --out DIR          # on a CUDA machine (H100 / H200): ends within 6 minutes
    FLOWMO_REFERENCE=/path/to/FlowMo python bench/gpu_report.py    # adds upstream's rows
    python bench/gpu_report.py --dry-run          # anywhere: tiny models on the CPU, the same code paths
    python bench/gpu_report.py --phases kernels,lfq  # a subset (e.g. what a first run's budget skipped)

fast = regional torch.compile of the blocks + Triton kernels (`kernels="auto"`) + the CUDA-graph sampler;
plain = eager, PyTorch kernels, no CUDA graphs; upstream_eager / upstream_compiled = upstream's FlowMo
(its own @torch.compile decorators) with the same config and weights (bench/impls.py: one adapter for all).
bf16 autocast on CUDA, as in training and evaluation. Random weights, built directly on the device.

Every check and row is printed (a markdown line and a JSON line) and appended to `--out`'s live files the
moment it is done, so a run killed at any point keeps what it measured; the whole table prints at the end.
The time budget (`--budget-s`) counts from the start of the process, imports and CUDA start-up included; a
phase starts only with the time it needs left (`Scale.phase_s`), a row only with its reserve. With `--out`,
Inductor's and Triton's caches live in DIR/compile_cache: a rerun that brings that folder back skips compiling.

Phases, most valuable first (NVTX ranges); one batch size per phase, so every compiled variant is reused:
decoder (forward, FlowMo-Lo, batch 32: the MFU target; fast vs plain is a check), reconstruct (batch 32, 25 steps,
cfg 1.5; the sampler warmed on a 3-step plan, which compiles what the full plan runs, before its first timed call
captures), train (Lo and Hi, batch 8 as one micro-batch without norm logging on every side: forward, backward,
Adam; checked first at that batch), latency (reconstruct at batch 1), encode (token ids, batch 32, Lo and Hi),
lfq (the LFQ loss: torch vs Triton vs upstream), kernels (each fused op eager / compiled / Triton, which sets
flowmo_kernels.AUTO_WHEN_COMPILED; decoder and train step with Triton forced: `fast_triton`), generator (the
token generator's train step and generate + decode at batch 64: bench/generator_rows.py), upstream_compiled
(its whole-model compiles take minutes: last). The model phases run plain, fast and upstream eager.

Times are the median of the timed calls after a warm-up call (compilation, CUDA-graph capture). Peak
memory is the allocator's peak during the row minus what was allocated before it. FLOPs are counted
analytically (flowmo_fast/flops.py, printed), the count training logs use for MFU.
"""

from __future__ import annotations

import time

START = time.perf_counter()  # the budget counts from here, before the imports (torch's take seconds)

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository root holds `bench` and the packages
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import flowmo_fast  # noqa: E402
from bench import generator_rows, kernel_rows, upstream  # noqa: E402
from bench.harness import (  # noqa: E402
    Budget, BudgetExceeded, Harness, Timing, device_name, log, unique_graphs, use_compile_cache,
)
from bench.impls import TRAIN_STEP_OVERRIDES, TRAIN_STEP_WORK, OURS, Implementation, build  # noqa: E402
from bench.report_rows import CHECKS_HEAD, Check, LiveOutput, Row, markdown_check, markdown_table  # noqa: E402
from flowmo_fast import flops  # noqa: E402
from flowmo_fast.attention import installed_backends  # noqa: E402
from flowmo_fast.fast import raise_recompile_limit  # noqa: E402
from flowmo_fast.hardware import peak_bf16_tflops  # noqa: E402
from flowmo_fast.sampling import UPSTREAM, SamplingOptions  # noqa: E402
from flowmo_kernels import triton_available  # noqa: E402

PHASES = ("decoder", "reconstruct", "train", "latency", "encode", "lfq", "kernels", "generator", "upstream_compiled")
CHECKED = ("decoder", "train")  # the phases that add checks
MODEL_ROWS = ("plain", "fast", "upstream_eager")
# The whole run, start-up and printing included, ends within 6 minutes (the GPU machine's run is cut at 7).
DEFAULT_BUDGET_S = 330.0


@dataclass(frozen=True)
class Scale:
    """What the report runs: the models (name -> preset, overrides) and the workload sizes."""

    models: dict
    size: int
    batch: int  # decoder forward, reconstruct and encode (one compiled variant of each tower)
    recon_steps: int
    train_batch: int  # one micro-batch
    tolerance: float  # relative L2 difference allowed between fast and plain (and upstream and plain)
    reserve_s: float  # budget a row needs left to start; compiling rows need `compile_reserve_s`
    compile_reserve_s: float
    upstream_compile_reserve_s: float
    phase_s: dict  # phase -> the budget it needs left to start (its compiles and rows)


OVERRIDES = ("opt.lpips_weight=0.0", *TRAIN_STEP_OVERRIDES)
FULL = Scale(
    models={"FlowMo-Lo": ("flowmo_lo", OVERRIDES), "FlowMo-Hi": ("flowmo_hi", OVERRIDES)},
    size=256, batch=32, recon_steps=25, train_batch=8,
    tolerance=5e-2, reserve_s=20, compile_reserve_s=60, upstream_compile_reserve_s=150,
    phase_s={"decoder": 80, "reconstruct": 80, "train": 120, "latency": 60, "encode": 40, "lfq": 20, "kernels": 80,
             "generator": 150, "upstream_compiled": 200},
)
DRY = Scale(  # batch sizes that differ from each other and from the latency rows' 1 and 2
    models={"FlowMo-Lo (tiny)": ("tiny", OVERRIDES),
            "FlowMo-Hi (tiny)": ("tiny", (*OVERRIDES, "model.context_dim=56", "model.codebook_size_for_entropy=14"))},
    size=32, batch=3, recon_steps=4, train_batch=4,
    tolerance=1e-4, reserve_s=5, compile_reserve_s=10, upstream_compile_reserve_s=10,
    phase_s={phase: 1 for phase in PHASES},
)


def short_plan(sampling: SamplingOptions) -> SamplingOptions:
    """The fewest steps whose plan has every kind of step of `sampling`'s (guided and not): warming the
    sampler on it compiles every decoder variant the full plan runs."""
    kinds = set(sampling.plan().guided)
    for steps in range(1, sampling.steps):
        if set(sampling.replace(steps=steps).plan().guided) == kinds:
            return sampling.replace(steps=steps)
    return sampling


class Models:
    """Per model name and implementation one `Implementation` on the device (bench.impls.build), built on first
    use; all start from the same random initial weights (kept, so training one row does not change the others)."""

    def __init__(self, scale: Scale, device: torch.device, compile_backend: str):
        self.scale, self.device, self.compile_backend = scale, device, compile_backend
        self.initial: dict[str, dict] = {}
        self.built: dict[tuple[str, str], Implementation] = {}

    def config(self, name: str):
        preset, overrides = self.scale.models[name]
        return flowmo_fast.load_config([*overrides, f"data.image_size={self.scale.size}"], preset=preset)

    def initial_weights(self, name: str) -> dict:
        if name not in self.initial:
            torch.manual_seed(0)
            with torch.device(self.device):
                self.initial[name] = flowmo_fast.FlowMo(self.config(name)).state_dict()
        return self.initial[name]

    def get(self, name: str, impl: str, training: bool = False) -> Implementation:
        """Inference rows get our models as every command loads them (`cast_for_inference`: matrix weights in the
        autocast dtype once); training rows get float32 weights (a model of their own)."""
        key = (name, impl, training)
        if key not in self.built:
            weights = self.initial_weights(name)
            self.built[key] = build(impl, self.config(name), weights, self.device, self.compile_backend)
            if impl in OURS and not training:
                self.built[key].model.cast_for_inference()
        return self.built[key]

    def release(self, name: str) -> None:
        """Free every model of `name` (and its initial weights)."""
        for key in [k for k in self.built if k[0] == name]:
            del self.built[key]
        self.initial.pop(name, None)
        gc.collect()  # models sit in reference cycles (the CUDA-graph sampler, compiled modules)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class Report(Harness):
    def __init__(self, args: argparse.Namespace, scale: Scale, device: torch.device, start: Optional[float] = None):
        """`start`: the time.perf_counter() the budget counts from (the process's start when run as a script;
        default now)."""
        live = LiveOutput(Path(args.out) if args.out else None, peak_bf16_tflops(device_name(device)))
        budget = Budget(args.budget_s, time.perf_counter() if start is None else start)
        super().__init__(budget, device, Timing(args.target_s, args.max_iters, scale.tolerance), live)
        self.args, self.scale = args, scale
        self.models = Models(scale, device, args.compile_backend)
        self.graphs_at_start = unique_graphs()

    def reserve(self, impl: str) -> float:
        """Budget a model row needs left to start: compiling rows need more."""
        if impl == "upstream_compiled":
            return self.scale.upstream_compile_reserve_s
        return self.scale.compile_reserve_s if impl.startswith("fast") else self.scale.reserve_s

    def images(self, batch: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator(self.device).manual_seed(seed)
        s = self.scale.size
        return torch.rand(batch, 3, s, s, generator=g, device=self.device) * 2 - 1

    def sampling(self) -> SamplingOptions:
        """The reconstruct rows' sampler: upstream's evaluation setting (cfg 1.5, pow_0.25, guidance interval),
        the scale's steps, for every implementation."""
        return UPSTREAM.replace(steps=self.scale.recon_steps)

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
        implementation, b, s = self.models.get(name, impl, training=True), self.scale.train_batch, self.scale.size
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
        row = Row(f"train step ({TRAIN_STEP_WORK})", name, impl, sc.train_batch, per_image)

        def run():
            implementation = self.models.get(name, impl, training=True)
            implementation.model.train()
            step = implementation.train_step(self.images(sc.train_batch), self.models.config(name))
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
                                  generator_rows.generate_and_decode) for impl in ("plain", "fast")],
            "upstream_compiled": self.upstream_compiled,
        }

    def upstream_compiled(self) -> None:
        lo, *others = self.scale.models
        if self.args.dry_run:
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
            if phase in self.args.phases and self.phase(phase, self.scale.phase_s[phase]):
                steps[phase]()

    # --- output ---------------------------------------------------------------------------------------

    def header(self) -> str:
        name, sampling, sc = device_name(self.device), self.sampling(), self.scale
        triton = "n/a"
        if triton_available():
            import triton

            triton = triton.__version__
        peak = peak_bf16_tflops(name)
        return "\n".join([
            f"# FlowMo GPU report{' (dry run: tiny models on the CPU)' if self.args.dry_run else ''}",
            "",
            f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- device: {name}; bf16 dense peak: {f'{peak:.0f} TFLOP/s' if peak else 'unknown (MFU not shown)'}",
            f"- torch {torch.__version__}, CUDA {torch.version.cuda}, Triton {triton}",
            f"- upstream: {upstream.reference_path() or 'not set (' + str(upstream.skip_reason()) + ')'}",
            (f"- attention backends installed: {', '.join(b.name for b in installed_backends())} (plain: timed per "
             "shape, fastest used; fast: SDPA inside the compiled blocks)"),
            (f"- sizes: {sc.size}px; decoder, reconstruct and encode batch {sc.batch}, latency batch 1 "
             f"({sampling.steps} steps, cfg {sampling.cfg}, {sampling.schedule}; warmed on {short_plan(sampling).steps}"
             f" steps); train batch {sc.train_batch} ({TRAIN_STEP_WORK}, every side)"),
            f"- phases: {', '.join(self.args.phases)}; compiled graphs (dynamo unique_graphs): {self.graphs()}",
            f"- compile caches: {os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'default')} (Inductor), "
            f"{os.environ.get('TRITON_CACHE_DIR', 'default')} (Triton)",
            (f"- wall time: {self.budget.elapsed():.0f} s of a {self.budget.seconds:.0f} s budget (from the "
             "process's start)"),
        ])

    def graphs(self) -> int:
        return unique_graphs() - self.graphs_at_start

    def markdown(self) -> str:
        """The whole report: header, checks, FLOP formula, the timings table."""
        lines = [self.header(), "", "## Checks: fast path against plain path", "", *CHECKS_HEAD]
        lines += [markdown_check(c) for c in self.checks]
        if not self.checks:
            asked = [p for p in CHECKED if p in self.args.phases]
            lines.append("| (no check ran) | | | FAIL |" if asked else "| (not asked for: --phases) | | | |")
        lines += ["", "## FLOP counts", "", "```", flops.FORMULA, "```", ""]
        lines += ["vs plain: plain ms / ms; vs best upstream: faster upstream row's ms / ms (above 1: we are faster).",
                  "", "## Timings", ""]
        return "\n".join(lines) + "\n" + markdown_table(self.rows, peak_bf16_tflops(device_name(self.device)))

    def save(self, path: Path) -> None:
        checks, rows = [asdict(c) for c in self.checks], [asdict(r) for r in self.rows]
        data = {"header": self.header(), "unique_graphs": self.graphs(), "checks": checks, "rows": rows}
        Path(path).write_text(json.dumps(data, indent=1))

    def finish(self) -> None:
        """Print the whole report; write it to `--json` and to `--out`/report.md and report.json."""
        text = self.markdown()
        print(text, flush=True)
        if self.args.json:
            self.save(self.args.json)
        if self.args.out:
            Path(self.args.out, "report.md").write_text(text + "\n")
            self.save(Path(self.args.out, "report.json"))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
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
    p.add_argument("--phases", default=",".join(PHASES),
                   help=f"comma-separated subset of {','.join(PHASES)} (default: all; e.g. to rerun what a first "
                        "run's budget skipped)")
    args = p.parse_args(argv)
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = sorted(set(args.phases) - set(PHASES))
    if unknown or not args.phases:
        p.error(f"--phases: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(PHASES)}")
    if args.compile_backend is None:
        args.compile_backend = "eager" if args.dry_run else "inductor"
    return args


def main(argv: Optional[list[str]] = None, start: Optional[float] = None) -> int:
    """`start`: the time.perf_counter() the budget counts from (default now)."""
    args = parse_args(argv)
    if args.dry_run:
        device, scale = torch.device("cpu"), DRY
    elif torch.cuda.is_available():
        device, scale = torch.device("cuda", torch.cuda.current_device()), FULL
    else:
        print("gpu_report: no CUDA device here; run with --dry-run to exercise the report on the CPU", file=sys.stderr)
        return 2
    if args.out:
        use_compile_cache(Path(args.out) / "compile_cache")
    raise_recompile_limit()  # the upstream compiled rows need it too
    report = Report(args, scale, device, start)
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
    return 1 if failed or (not report.checks and set(CHECKED) & set(args.phases)) else 0


if __name__ == "__main__":
    sys.exit(main(start=START))
