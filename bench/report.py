"""The GPU report's state and output (bench/gpu_report.py runs it; the row modules add workloads): the scale
of a run, the models it builds, the budget, the header and the whole report as markdown and JSON."""

from __future__ import annotations

import datetime
import gc
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch

import flowmo_fast
from bench import upstream
from bench.harness import Budget, Harness, Timing, device_name, unique_graphs
from bench.impls import OURS, TRAIN_STEP_OVERRIDES, TRAIN_STEP_WORK, Implementation, build
from bench.report_rows import CHECKS_HEAD, LiveOutput, markdown_check, markdown_table
from flowmo_fast.fastpath import raise_recompile_limit  # noqa: F401  (re-exported for the command)
from flowmo_fast.flowmo import flops
from flowmo_fast.flowmo.attention import installed_backends
from flowmo_fast.hardware import peak_bf16_tflops
from flowmo_fast.sampler_settings import UPSTREAM, SamplingOptions
from flowmo_kernels import triton_available
from train.memory import MemoryModel, memory_model

PHASES = ("decoder", "reconstruct", "train", "latency", "encode", "lfq", "kernels", "generator", "upstream_compiled")
# The token generator's phase runs as its own invocation (`--phases generator`): its rows need no FlowMo model and
# the whole budget of a run of their own, not what the tokenizer's phases leave.
ALONE = "generator"
DEFAULT_PHASES = tuple(p for p in PHASES if p != ALONE)
CHECKED = ("decoder", "train")  # the phases that add checks
MODEL_ROWS = ("plain", "fast", "upstream_eager")
# The whole run, start-up and printing included, ends within 6 minutes (the GPU machine's run is cut at 7).
DEFAULT_BUDGET_S = 330.0
# Compile caches stay on the machine that compiled (a GPU machine gives back at most 8 files): under /tmp, where a
# rerun on the same machine finds them.
DEFAULT_CACHE_DIR = "/tmp/flowmo_compile_cache"
TRAIN_BATCHES = (8, 4, 2, 1)  # the largest that fits is taken; 4 is upstream's real micro-batch (8 as 2 x 4)


def train_batch_for(largest_fitting: int, largest: int) -> int:
    """The largest of TRAIN_BATCHES at most `largest` (the scale's) and at most `largest_fitting` (the micro-batch
    the memory allows: `train.memory`'s estimate, or the smoke's measurement); 1 when none does (its row then
    reports the out-of-memory error)."""
    return next((b for b in TRAIN_BATCHES if b <= min(largest, largest_fitting)), 1)


def calibrated(model: MemoryModel, activation_scale: float) -> MemoryModel:
    """train.memory's estimate with its activations per image scaled by a measurement's ratio to it."""
    return replace(model, per_image=model.per_image * activation_scale)


@dataclass(frozen=True)
class Scale:
    """What the report runs: the models (name -> preset, overrides) and the workload sizes."""

    models: dict
    size: int
    batch: int  # decoder forward, reconstruct and encode (one compiled variant of each tower)
    recon_steps: int
    train_batch: int  # one micro-batch, at most (on CUDA the largest that fits: `Report.train_batch`)
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

    def release(self, name: str, inference_only: bool = False) -> None:
        """Free every model of `name` (and its initial weights), or only its inference models (their weights,
        compiled variants and captured CUDA graphs) before its training rows."""
        for key in [k for k in self.built if k[0] == name and not (inference_only and k[2])]:
            del self.built[key]
        if not inference_only:
            self.initial.pop(name, None)
        gc.collect()  # models sit in reference cycles (the CUDA-graph sampler, compiled modules)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


@dataclass(frozen=True)
class ReportSettings:
    """One report run (the command's flags)."""

    dry_run: bool = False  # tiny models on the CPU
    budget_s: float = DEFAULT_BUDGET_S  # seconds from the process's start after which no row starts
    target_s: float = 3.0  # time each row for about this long
    max_iters: int = 20  # at most this many timed calls per row
    compile_backend: str = "inductor"  # torch.compile backend of the fast path
    json: Optional[str] = None  # also write the rows as JSON here (at the end)
    out: Optional[str] = None  # folder for live.md / live.jsonl as rows finish, report.md / report.json at the end
    phases: tuple[str, ...] = DEFAULT_PHASES
    cache_dir: str = DEFAULT_CACHE_DIR  # Inductor's and Triton's caches
    # measured / estimated activations per image (the smoke's train_memory stage): train.memory's estimate, scaled
    # by it, sizes the train rows
    activation_scale: float = 1.0


class Report(Harness):
    """A report in progress: its settings, scale, device, models, budget, rows and checks."""

    def __init__(self, settings: ReportSettings, scale: Scale, device: torch.device, start: Optional[float] = None):
        """`start`: the time.perf_counter() the budget counts from (the process's start when run as a script;
        default now)."""
        live = LiveOutput(Path(settings.out) if settings.out else None, peak_bf16_tflops(device_name(device)))
        budget = Budget(settings.budget_s, time.perf_counter() if start is None else start)
        super().__init__(budget, device, Timing(settings.target_s, settings.max_iters, scale.tolerance), live)
        self.settings, self.scale = settings, scale
        self.models = Models(scale, device, settings.compile_backend)
        self.graphs_at_start = unique_graphs()
        self.train_batches: dict[str, int] = {}  # model name -> its train rows' batch, chosen once

    def reserve(self, impl: str) -> float:
        """Budget a model row needs left to start: compiling rows need more."""
        if impl == "upstream_compiled":
            return self.scale.upstream_compile_reserve_s
        return self.scale.compile_reserve_s if impl.startswith("fast") else self.scale.reserve_s

    def train_batch(self, name: str) -> int:
        """The batch of `name`'s train rows and checks: on CUDA the largest that fits in the memory free when
        first asked (after the inference models are released), at most the scale's; elsewhere the scale's."""
        if name not in self.train_batches:
            batch, free = self.scale.train_batch, self.free_memory()
            if free is not None:  # train.memory's estimate of plain eager training under bf16 autocast
                fitting = calibrated(memory_model(self.models.config(name)), self.settings.activation_scale)
                batch = train_batch_for(fitting.largest_fitting(free), batch)
            self.train_batches[name] = batch
        return self.train_batches[name]

    def free_memory(self) -> Optional[int]:
        """Bytes free on the device now (None off CUDA: the CPU's rows run at the scale's batch)."""
        return torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None

    def images(self, batch: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator(self.device).manual_seed(seed)
        s = self.scale.size
        return torch.rand(batch, 3, s, s, generator=g, device=self.device) * 2 - 1

    def sampling(self) -> SamplingOptions:
        """The reconstruct rows' sampler: upstream's evaluation setting (cfg 1.5, pow_0.25, guidance interval),
        the scale's steps, for every implementation."""
        return UPSTREAM.replace(steps=self.scale.recon_steps)

    # --- output ---------------------------------------------------------------------------------------

    def header(self) -> str:
        name, sampling, sc = device_name(self.device), self.sampling(), self.scale
        triton = "n/a"
        if triton_available():
            import triton

            triton = triton.__version__
        peak = peak_bf16_tflops(name)
        return "\n".join([
            f"# FlowMo GPU report{' (dry run: tiny models on the CPU)' if self.settings.dry_run else ''}",
            "",
            f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- device: {name}; bf16 dense peak: {f'{peak:.0f} TFLOP/s' if peak else 'unknown (MFU not shown)'}",
            f"- torch {torch.__version__}, CUDA {torch.version.cuda}, Triton {triton}",
            f"- upstream: {upstream.reference_path() or 'not set (' + str(upstream.skip_reason()) + ')'}",
            (f"- attention backends installed: {', '.join(b.name for b in installed_backends())} (plain: timed per "
             "shape, fastest used; fast: SDPA inside the compiled blocks)"),
            (f"- sizes: {sc.size}px; decoder, reconstruct and encode batch {sc.batch}, latency batch 1 "
             f"({sampling.steps} steps, cfg {sampling.cfg}, {sampling.schedule}; warmed on {short_plan(sampling).steps}"
             f" steps); train batch {self.train_batch_text()} ({TRAIN_STEP_WORK}, every side)"),
            f"- phases: {', '.join(self.settings.phases)}; compiled graphs (dynamo unique_graphs): {self.graphs()}",
            f"- compile caches: {os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'default')} (Inductor), "
            f"{os.environ.get('TRITON_CACHE_DIR', 'default')} (Triton)",
            (f"- wall time: {self.budget.elapsed():.0f} s of a {self.budget.seconds:.0f} s budget (from the "
             "process's start)"),
        ])

    def train_batch_text(self) -> str:
        chosen = ", ".join(f"{name} {b}" for name, b in self.train_batches.items())
        if not chosen:
            return f"at most {self.scale.train_batch}"
        return chosen + (f" (the largest of {TRAIN_BATCHES} that fits)" if self.device.type == "cuda" else "")

    def graphs(self) -> int:
        return unique_graphs() - self.graphs_at_start

    def markdown(self) -> str:
        """The whole report: header, checks, FLOP formula, the timings table."""
        lines = [self.header(), "", "## Checks: fast path against plain path", "", *CHECKS_HEAD]
        lines += [markdown_check(c) for c in self.checks]
        if not self.checks:
            asked = [p for p in CHECKED if p in self.settings.phases]
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
        if self.settings.json:
            self.save(self.settings.json)
        if self.settings.out:
            Path(self.settings.out, "report.md").write_text(text + "\n")
            self.save(Path(self.settings.out, "report.json"))
