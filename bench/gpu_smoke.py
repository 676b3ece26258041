"""First contact with a GPU, sized to the budget a task gets for it: the checks most likely to find a defect per
second of GPU time first, each stage within its own time limit, a line per check the moment it finishes.

    python bench/gpu_smoke.py --out DIR          # on the CUDA machine (H100 / H200): ends within --budget-s (330 s)
    python bench/gpu_smoke.py --dry-run          # anywhere: every stage on the CPU with tiny models (a test)
    python bench/gpu_smoke.py --stages kernels,sampler --out DIR   # a rerun of some stages

Stages, in order (limit in seconds; a stage past its limit is stopped where it is and the next one starts):
  versions (10)            Python, torch, CUDA, Triton, the device, `nvidia-smi`, free memory
  kernels (40)             every Triton op against its twin, forward and backward, bf16 then float32, at FlowMo-Lo/Hi
                           shapes: modulate and gated residual at D = 768 and 1152, L = 257 and 4352; QK-norm + RoPE
                           at head dim 96; LFQ at d = 9, 14, 20
  generator (30)           the token generator's CUDA graph against eager `generate`, replays under
                           `torch.cuda.set_sync_debug_mode("error")`, batches 3 and 5, with and without classes; a
                           FlowMo-Hi-sized head (16384-way) at batch 8, compiled, with its peak memory
  sampler (60)             tiny FlowMo's `sample_images` with CUDA graphs (kernels auto and triton, compile off and
                           on, `cast_for_inference`) against eager `flow.sample`; what the self-checks cost
  train_memory (45)        FlowMo-Lo at 256 px, loss + backward at batches 1 and 2, peak memory: the report's train
                           batch
  generator_training (90)  `torchrun -m train.generator --preset tiny trainer.compile=true` with FSDP2 for 20 steps,
                           then its resume
  report (what is left)    bench/gpu_report.py's decoder and train phases, at the train batch measured above

Every stage also reads the self-checks of the fast paths it ran (flowmo_fast.fastpath): a fast path that fell back
is a failed check. Output: each check, row and note printed as it finishes and appended to DIR/live.md and
DIR/live.jsonl; DIR/smoke.md and DIR/smoke.json at the end (with the command's own stderr.log, 5 files: a GPU
machine gives back at most 8). Compile caches and scratch files (token shards, the trainer's run) live under /tmp.
The budget counts from the process's start; SIGTERM (a `timeout`) stops the stage running and writes what ran.
"""

from __future__ import annotations

import time

START = time.perf_counter()  # the budget counts from here, before the imports

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Optional  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository root holds `bench` and the packages
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.gpu_report import GpuReport  # noqa: E402
from bench.harness import Budget, BudgetExceeded, Harness, Timing, device_name, log, use_compile_cache  # noqa: E402
from bench.report import DRY, FULL, ReportSettings  # noqa: E402
from bench.report_rows import CHECKS_HEAD, Check, LiveOutput, markdown_check, markdown_table  # noqa: E402
from bench.smoke_checks import DRY_SIZES, GPU_SIZES, Stages  # noqa: E402
from flowmo_fast.fastpath import raise_recompile_limit  # noqa: E402
from flowmo_fast.hardware import peak_bf16_tflops  # noqa: E402
from flowmo_kernels import triton_available  # noqa: E402


@dataclass(frozen=True)
class Stage:
    name: str
    limit_s: Optional[float]  # None: what is left of the budget


STAGES = (Stage("versions", 10), Stage("kernels", 40), Stage("generator", 30), Stage("sampler", 60),
          Stage("train_memory", 45), Stage("generator_training", 90), Stage("report", None))
STAGE_NAMES = tuple(s.name for s in STAGES)
DEFAULT_BUDGET_S = 330.0  # within 6 minutes, printing included: two runs and the machine's start fit 15 minutes
REPORT_PHASES = ("decoder", "train")
REPORT_NEEDS = {"decoder": 30, "train": 40}  # seconds a report phase needs left to start in the smoke run


@dataclass(frozen=True)
class SmokeSettings:
    """One smoke run (the command's flags)."""

    dry_run: bool = False
    budget_s: float = DEFAULT_BUDGET_S
    out: Optional[str] = None
    cache_dir: str = "/tmp/flowmo_smoke/cache"
    work_dir: str = "/tmp/flowmo_smoke/work"
    stages: tuple[str, ...] = STAGE_NAMES


@dataclass
class StageRecord:
    name: str
    limit_s: float
    seconds: float
    outcome: str  # "done", "stopped at its limit", "error: ...", "skipped: ..."


class Smoke(Harness):
    """A smoke run in progress: its stages' checks and rows, each written the moment it is done."""

    def __init__(self, settings: SmokeSettings, device: torch.device, start: float):
        self.total = Budget(settings.budget_s, start)
        live = LiveOutput(Path(settings.out) if settings.out else None, peak_bf16_tflops(device_name(device)))
        super().__init__(self.total, device, Timing(0.0, 1, FULL.tolerance), live)
        self.settings = settings
        self.records: list[StageRecord] = []
        self.stages = Stages(self, DRY_SIZES if settings.dry_run else GPU_SIZES, Path(settings.work_dir),
                             "eager" if settings.dry_run else "inductor")

    def evaluate(self, name: str, value: Callable[[], float], tol: float) -> Check:
        """The check `name`: value() against `tol`; an error in value() is a failed check that says so."""
        try:
            return Check(name, float(value()), tol)
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            message = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            return Check(f"{name}: error {type(e).__name__}: {message}", math.inf, tol)

    # --- the stages ----------------------------------------------------------------------------------------------

    def header(self) -> str:
        triton = "n/a"
        if triton_available():
            import triton

            triton = triton.__version__
        return "\n".join([
            f"# FlowMo GPU smoke run{' (dry run: tiny models on the CPU)' if self.settings.dry_run else ''}",
            "",
            f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- device: {device_name(self.device)}{self.capability()}",
            f"- Python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}, Triton {triton}",
            f"- stages: {', '.join(self.settings.stages)}; budget {self.settings.budget_s:.0f} s from the process's "
            "start",
        ])

    def capability(self) -> str:
        if self.device.type != "cuda":
            return ""
        return ", compute capability {}.{}".format(*torch.cuda.get_device_capability(self.device))

    def versions(self) -> None:
        try:
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=8).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            smi = f"nvidia-smi: {type(e).__name__}: {e}"
        self.live.note("```\n" + (smi or "nvidia-smi: no output") + "\n```")
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            self.live.note(f"memory: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")

    def report(self) -> None:
        """bench/gpu_report.py's decoder and train phases in what is left, their train rows sized by train.memory's
        estimate as the train_memory stage measured it."""
        dry = self.settings.dry_run
        scale = DRY if dry else FULL
        scale = replace(scale, phase_s={**scale.phase_s, **({} if dry else REPORT_NEEDS)})
        settings = ReportSettings(dry_run=dry, budget_s=self.total.left(), target_s=0.0 if dry else 1.0,
                                  max_iters=1 if dry else 5,
                                  compile_backend="eager" if self.settings.dry_run else "inductor",
                                  phases=REPORT_PHASES, cache_dir=self.settings.cache_dir,
                                  activation_scale=self.stages.activation_scale)
        report = GpuReport(settings, scale, self.device, start=time.perf_counter())
        report.live = self.live  # its rows and checks go to this run's live output
        try:
            report.run()
        finally:
            self.rows += report.rows
            self.checks += report.checks

    def steps(self) -> dict[str, Callable[[], None]]:
        s = self.stages
        return {"versions": self.versions, "kernels": s.kernels, "generator": s.generator, "sampler": s.sampler,
                "train_memory": s.train_memory, "generator_training": lambda: s.generator_training(self.budget.left),
                "report": self.report}

    def run_stage(self, stage: Stage, step: Callable[[], None]) -> None:
        """`step` within the stage's limit (and what is left of the whole budget); a stage that runs over is stopped
        where it is, an error ends it; either way the next stage runs."""
        limit = min(stage.limit_s if stage.limit_s is not None else math.inf, self.total.left())
        if limit < 1:
            self.record(StageRecord(stage.name, limit, 0.0, f"skipped: {self.total.left():.0f} s of the budget left"))
            return
        self.budget = Budget(limit)
        log(self.total, f"stage {stage.name} (limit {limit:.0f} s)")
        self.budget.arm()
        outcome = "done"
        try:
            step()
        except BudgetExceeded:
            outcome = "stopped: SIGTERM" if self.budget.terminated else "stopped at its limit"
            self.total.terminated = self.total.terminated or self.budget.terminated
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            outcome = f"error: {type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
        finally:
            self.budget.disarm()
            seconds, self.budget = self.budget.elapsed(), self.total
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.record(StageRecord(stage.name, limit, seconds, outcome))

    def record(self, record: StageRecord) -> None:
        self.records.append(record)
        log(self.total, f"stage {record.name}: {record.outcome} ({record.seconds:.1f} s)")
        self.live.note(f"stage {record.name}: {record.outcome} in {record.seconds:.1f} s "
                       f"(limit {record.limit_s:.0f} s)")

    def run(self) -> None:
        steps = self.steps()
        for stage in STAGES:
            if stage.name in self.settings.stages:
                self.run_stage(stage, steps[stage.name])

    # --- output ----------------------------------------------------------------------------------------------------

    def markdown(self) -> str:
        lines = [self.header(), f"- wall time: {self.total.elapsed():.0f} s", "", "## Stages", "",
                 "| stage | limit s | s | outcome |", "|---|--:|--:|---|"]
        lines += [f"| {r.name} | {r.limit_s:.0f} | {r.seconds:.1f} | {r.outcome} |" for r in self.records]
        lines += ["", "## Checks", "", *CHECKS_HEAD, *(markdown_check(c) for c in self.checks), "", "## Rows", ""]
        return "\n".join(lines) + "\n" + markdown_table(self.rows, peak_bf16_tflops(device_name(self.device))) + "\n"

    def finish(self) -> None:
        text = self.markdown()
        print(text, flush=True)
        if self.settings.out:
            Path(self.settings.out, "smoke.md").write_text(text)
            data = {"header": self.header(), "stages": [asdict(r) for r in self.records],
                    "checks": [asdict(c) for c in self.checks], "rows": [asdict(r) for r in self.rows]}
            Path(self.settings.out, "smoke.json").write_text(json.dumps(data, indent=1))

    def failed(self) -> bool:
        return any(not c.passed for c in self.checks) or any(r.outcome.startswith("error") for r in self.records)


def parse_args(argv: Optional[list[str]] = None) -> SmokeSettings:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="every stage on the CPU with tiny models")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds from the process's start for all stages (default {DEFAULT_BUDGET_S:.0f})")
    p.add_argument("--out", default=None, metavar="DIR", help="live.md, live.jsonl as checks finish; smoke.md, "
                   "smoke.json at the end")
    p.add_argument("--stages", default=",".join(STAGE_NAMES), help=f"comma-separated subset of {','.join(STAGE_NAMES)}")
    p.add_argument("--cache-dir", default=SmokeSettings.cache_dir, help="compile caches (default %(default)s)")
    p.add_argument("--work-dir", default=SmokeSettings.work_dir, help="scratch files (default %(default)s)")
    args = p.parse_args(argv)
    stages = tuple(x.strip() for x in args.stages.split(",") if x.strip())
    unknown = sorted(set(stages) - set(STAGE_NAMES))
    if unknown or not stages:
        p.error(f"--stages: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(STAGE_NAMES)}")
    return SmokeSettings(args.dry_run, args.budget_s, args.out, args.cache_dir, args.work_dir, stages)


def main(argv: Optional[list[str]] = None, start: Optional[float] = None) -> int:
    """`start`: the time.perf_counter() the budget counts from (default now). 0: every check passed."""
    settings = parse_args(argv)
    if settings.dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        print("gpu_smoke: no CUDA device here; run with --dry-run to exercise it on the CPU", file=sys.stderr)
        return 2
    use_compile_cache(Path(settings.cache_dir))
    raise_recompile_limit()
    smoke = Smoke(settings, device, time.perf_counter() if start is None else start)
    smoke.live.start(smoke.header())
    try:
        smoke.run()
    finally:
        smoke.finish()
    return 1 if smoke.failed() else 0


if __name__ == "__main__":
    sys.exit(main(start=START))
