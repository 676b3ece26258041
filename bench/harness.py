"""The GPU report's harness: the time budget (counted from the process's start, enforced by an alarm), phases
that start only with the time they need left, rows that are attempted (a skip or a failure is recorded, never
raised), timed (warm-up, then the median of timed calls, peak memory) and compared with the plain row, and
the live output of every row and check; the compile caches and dynamo's count of compiled graphs. The
workloads themselves are in bench/gpu_report.py and bench/kernel_rows.py."""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from bench.impls import Unavailable
from bench.report_rows import Check, LiveOutput, Row


class BudgetExceeded(BaseException):
    """Raised by the alarm when the global time budget runs out, or on SIGTERM (BaseException: library code
    that catches Exception must not swallow it)."""


@dataclass
class Budget:
    seconds: float
    start: float = field(default_factory=time.perf_counter)  # a time.perf_counter() value
    terminated: bool = False  # SIGTERM: no more rows
    handlers: dict = field(default_factory=dict)  # signal -> the handler before `arm`

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return 0.0 if self.terminated else self.seconds - self.elapsed()

    def arm(self) -> None:
        """Interrupt whatever runs when the budget is spent or on SIGTERM (a `timeout` kill): the table still
        prints."""
        def alarm(signum, frame):
            self.terminated = self.terminated or signum == signal.SIGTERM
            raise BudgetExceeded()

        for signum in (signal.SIGALRM, signal.SIGTERM):
            self.handlers[signum] = signal.signal(signum, alarm)
        signal.setitimer(signal.ITIMER_REAL, max(self.left(), 1.0), 5.0)  # again every 5 s, should one be swallowed

    def disarm(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for signum, handler in self.handlers.items():
            signal.signal(signum, handler)


@dataclass(frozen=True)
class Timing:
    """How long each row is timed: about `target_s`, at most `max_iters` calls after the warm-up; outputs
    within `tolerance` (relative L2) of the plain row's pass."""

    target_s: float
    max_iters: int
    tolerance: float


def log(budget: Budget, message: str) -> None:
    print(f"[{budget.elapsed():6.1f} s] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def nvtx_range(name: str, device: torch.device):
    """An NVTX range (the `nvtx` package when installed, else torch.cuda.nvtx) around a phase on CUDA."""
    if device.type != "cuda":
        yield
        return
    try:
        import nvtx
    except ImportError:
        nvtx = None
    if nvtx is not None:
        with nvtx.annotate(name, domain="flowmo"):
            yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float32."""
    a, b = a.detach().float(), b.detach().float()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-12))


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def unique_graphs() -> int:
    """Distinct graphs dynamo compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def use_compile_cache(folder: Path) -> None:
    """Inductor's and Triton's on-disk caches in `folder` (read when they first compile, after this)."""
    for variable, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
        path = folder / sub
        path.mkdir(parents=True, exist_ok=True)
        os.environ[variable] = str(path.resolve())


class Harness:
    """Runs rows and checks within the budget and keeps them (`rows`, `checks`) in the order they ran."""

    def __init__(self, budget: Budget, device: torch.device, timing: Timing, live: LiveOutput):
        self.budget = budget
        self.device = device
        self.timing = timing
        self.live = live
        self.rows: list[Row] = []
        self.checks: list[Check] = []
        self.outputs: dict[tuple[str, str], torch.Tensor] = {}  # (workload, model) -> the plain row's output

    def phase(self, name: str, need_s: float) -> bool:
        """Whether phase `name` may start: `need_s` (its compiles and rows) left in the budget. A phase that may
        not is one row in the table saying so."""
        if self.budget.left() >= need_s:
            log(self.budget, f"phase {name} ({need_s:.0f} s needed, {self.budget.left():.0f} s left)")
            return True
        row = Row(f"phase {name}", "all", "—", 0, None,
                  note=f"skipped: {self.budget.left():.0f} s of budget left, the phase needs {need_s:.0f} s")
        log(self.budget, f"phase {name}: skipped (time budget)")
        self.rows.append(row)
        self.live.row(row, self.rows)
        return False

    def attempt(self, label: str, reserve_s: float, fn: Callable[[], None], row: Optional[Row] = None) -> None:
        """Run one row or check if the budget allows; failures are recorded, never raised."""
        if row is not None:
            self.rows.append(row)
        if self.budget.left() < reserve_s:
            self._note(row, f"skipped: {self.budget.left():.0f} s of budget left, needs {reserve_s:.0f} s")
            log(self.budget, f"{label}: skipped (time budget)")
            if row is not None:
                self.live.row(row, self.rows)
            return
        log(self.budget, f"{label} ...")
        try:
            with nvtx_range(label, self.device):
                fn()
        except Unavailable as e:
            self._note(row, f"skipped: {e}")
        except BudgetExceeded:
            self._note(row, "stopped: time budget spent")
            log(self.budget, f"{label}: stopped, time budget spent")
        except Exception as e:  # one failing row must not cost the rest of the report
            self._note(row, f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160])
            traceback.print_exc(file=sys.stderr)
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        if row is not None and row.ms is not None:
            log(self.budget, f"{label}: {row.ms:.1f} ms")
        if row is not None:
            self.live.row(row, self.rows)

    def add_check(self, check: Check) -> None:
        self.checks.append(check)
        self.live.check(check)

    @staticmethod
    def _note(row: Optional[Row], note: str) -> None:
        if row is not None:
            row.note = note

    def measure(self, row: Row, fn: Callable[[], object], warm: Optional[Callable[[], object]] = None) -> object:
        """`warm` (compile on a cheaper call, e.g. a short sampler plan), then the warm-up call of `fn` (capture),
        then time `fn` until the timing's target or call count; fills row.ms (median), row.first_s (`warm` and
        the warm-up call) and row.peak_gib. Returns the warm-up call's output."""
        device = self.device
        sync(device)
        if device.type == "cuda":
            baseline = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        if warm is not None:
            warm()
        out = fn()
        sync(device)
        row.first_s = time.perf_counter() - start
        graphs, times = unique_graphs(), []
        while not times or (sum(times) < self.timing.target_s and len(times) < self.timing.max_iters):
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
        row.ms = 1000 * statistics.median(times)
        if unique_graphs() > graphs:  # the warm-up did not compile all the timed calls run
            row.note = f"{unique_graphs() - graphs} graphs compiled while timed"
        if device.type == "cuda":
            row.peak_gib = (torch.cuda.max_memory_allocated(device) - baseline) / 2**30
        return out

    def compare(self, row: Row, out: torch.Tensor, kind: str = "rel L2") -> Optional[float]:
        """Record the row's output against the plain row's (the plain row stores its own); returns the
        difference, None for the plain row or without one."""
        key = (row.workload, row.model)
        if row.impl in ("plain", "torch"):
            self.outputs[key] = out.detach()
            return None
        if key not in self.outputs:
            return None
        ref = self.outputs[key]
        if kind == "ids":
            differ = float((out != ref).float().mean())
            row.check = f"ids differ {100 * differ:.2f}%"
            return differ
        diff = rel_l2(out, ref)
        row.check = f"{kind} {diff:.1e}" + ("" if diff <= self.timing.tolerance else " (above tolerance!)")
        return diff
