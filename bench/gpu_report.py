"""GPU performance report: our fast path against our plain path and upstream, as one markdown table.

    python bench/gpu_report.py --out DIR          # on a CUDA machine (H100 / H200): ends within 6 minutes
    FLOWMO_REFERENCE=/path/to/FlowMo python bench/gpu_report.py    # adds upstream's rows
    python bench/gpu_report.py --dry-run          # anywhere: tiny models on the CPU, the same code paths
    python bench/gpu_report.py --phases train,lfq # a subset (e.g. what a first run's budget skipped)

fast = regional torch.compile of the blocks + Triton kernels (`kernels="auto"`) + the CUDA-graph sampler;
plain = eager, PyTorch kernels, no CUDA graphs; upstream_eager / upstream_compiled = upstream's FlowMo
(its own @torch.compile decorators) with the same config and weights. bf16 autocast on CUDA, as in training
and evaluation. Random weights (speed does not depend on them), built directly on the device.

Every check and row is printed (a markdown line and a JSON line) and appended to `--out`'s live files the
moment it is done, so a run killed at any point keeps what it measured; the whole table prints at the end.
The time budget (`--budget-s`) counts from the start of the process, imports and CUDA start-up included.

Phases, in order of importance (each an NVTX range; a row that the time budget cannot fit is skipped, and
a row that fails is reported as such, so the table always prints):
1. check: fast against plain values (decoder forward; training loss and gradient norm), FlowMo-Lo;
2. reconstruct: FlowMo-Lo, batch 32, 25 steps, cfg 1.5 (encode, quantize, guided sampler);
3. latency: the same reconstruct at batch 1 (where launch overhead, which CUDA graphs remove, is the cost);
4. decoder forward: FlowMo-Lo, batch 32 (one pass; the MFU target of issue 7);
5. per model, FlowMo-Lo then FlowMo-Hi: train step (256px, batch 8 per chunk: forward, backward, Adam
   step; no perceptual loss) and encode (tokenizer images/s, `flowmo_fast.tokenize.make_encoder`, batch 32);
6. LFQ loss: forward + backward at one training batch's codes (d = 9 for Lo, 14 for Hi), Triton vs torch
   (a check) and upstream's LFQ;
7. kernels, for `kernels="auto"` (flowmo_kernels.AUTO_WHEN_COMPILED): each fused op forward + backward at
   FlowMo-Lo's training shapes in bf16, as plain PyTorch eager, plain PyTorch under torch.compile and the
   Triton kernel; then FlowMo-Lo's decoder forward and train step with the fast path forced to Triton
   kernels inside the compiled blocks (`fast_triton`) next to `fast` (auto: plain ops there);
8. upstream compiled: reconstruct, decoder forward, train step and encode of FlowMo-Lo, train step of
   FlowMo-Hi (its whole-model compiles take minutes: last, so they cannot crowd out our rows).
Rows 2-5 run plain, fast and upstream eager.

Times are the median of the timed calls after a warm-up call (compilation, CUDA-graph capture). Peak
memory is the allocator's peak during the row minus what was allocated before it (activations, workspace,
graph pools, optimizer state; not the weights). FLOPs are counted analytically (bench/flops.py, printed).
"""

from __future__ import annotations

import time

START = time.perf_counter()  # the budget counts from here, before the imports (torch's take seconds)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Optional  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository root holds `bench` and the packages
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import flowmo_fast  # noqa: E402
from bench import flops, upstream  # noqa: E402
from flowmo_fast import flow  # noqa: E402
from flowmo_fast.attention import installed_backends  # noqa: E402
from flowmo_fast.config import HIDDEN_PER_WIDTH, NUM_HEADS, ModelConfig  # noqa: E402
from flowmo_fast.fast import compile_blocks, raise_recompile_limit  # noqa: E402
from flowmo_fast.hardware import peak_bf16_tflops  # noqa: E402
from flowmo_fast.model import autocast_for  # noqa: E402
from flowmo_fast.sampling import UPSTREAM, SamplingOptions  # noqa: E402
from flowmo_fast.token_shards import TokenSpec  # noqa: E402
from flowmo_fast.tokenize import make_encoder  # noqa: E402
from flowmo_kernels import get_ops, triton_available  # noqa: E402
from train.objective import FlowMoObjective  # noqa: E402
from train.step import build_optimizer, train_step  # noqa: E402

PHASES = ("check", "reconstruct", "latency", "decoder", "train", "encode", "lfq", "kernels", "upstream_compiled")
OURS = ("plain", "fast")
ENTROPY_WEIGHT, COMMIT_WEIGHT = ModelConfig().entropy_loss_weight, ModelConfig().commit_loss_weight  # the config's
# The whole run, start-up and printing included, ends within 6 minutes (the GPU machine's run is cut at 7).
DEFAULT_BUDGET_S = 330.0


@dataclass(frozen=True)
class Scale:
    """What the report runs: the models (name -> preset, overrides) and the workload sizes."""

    models: dict
    size: int
    recon_batch: int
    recon_steps: int
    train_batch: int
    encode_batch: int
    tolerance: float  # relative L2 difference allowed between fast and plain (and upstream and plain)
    reserve_s: float  # budget a row needs left to start; compiling rows need `compile_reserve_s`
    compile_reserve_s: float
    upstream_compile_reserve_s: float


FULL = Scale(
    models={"FlowMo-Lo": ("flowmo_lo", ["opt.lpips_weight=0.0"]), "FlowMo-Hi": ("flowmo_hi", ["opt.lpips_weight=0.0"])},
    size=256, recon_batch=32, recon_steps=25, train_batch=8, encode_batch=32,
    tolerance=5e-2, reserve_s=20, compile_reserve_s=60, upstream_compile_reserve_s=150,
)
DRY = Scale(
    models={"FlowMo-Lo (tiny)": ("tiny", []),
            "FlowMo-Hi (tiny)": ("tiny", ["model.context_dim=56", "model.codebook_size_for_entropy=14"])},
    size=32, recon_batch=2, recon_steps=4, train_batch=2, encode_batch=2,
    tolerance=1e-4, reserve_s=5, compile_reserve_s=10, upstream_compile_reserve_s=10,
)


@dataclass
class Row:
    workload: str
    model: str
    impl: str
    images: int  # per call
    flops_per_image: Optional[int]
    ms: Optional[float] = None
    peak_gib: Optional[float] = None
    first_s: Optional[float] = None  # the warm-up call: compiling, autotuning, CUDA-graph capture
    check: str = ""  # difference from the plain row's output
    note: str = ""


@dataclass
class Check:
    name: str
    value: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.value <= self.tolerance


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


TABLE_HEAD = (
    "| workload | model | impl | ms | images/s | TFLOP/s | MFU | peak GiB | vs plain | vs best upstream "
    "| first call s | check | note |",
    "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|---|",
)
CHECKS_HEAD = ("| check | value | tolerance | result |", "|---|--:|--:|---|")


@dataclass
class Baselines:
    """Per (workload, model): the plain row's ms and the fastest upstream row's ms, among the given rows."""

    plain_ms: dict
    best_upstream_ms: dict

    @classmethod
    def of(cls, rows: list[Row]) -> "Baselines":
        best_upstream: dict[tuple[str, str], float] = {}
        plain_ms: dict[tuple[str, str], float] = {}
        for r in rows:
            if r.ms is None:
                continue
            key = (r.workload, r.model)
            if r.impl.startswith("upstream"):
                best_upstream[key] = min(best_upstream.get(key, float("inf")), r.ms)
            if r.impl in ("plain", "torch"):
                plain_ms[key] = r.ms
        return cls(plain_ms, best_upstream)


def markdown_row(r: Row, baselines: Baselines, peak: Optional[float]) -> str:
    """One line of the timings table; `vs plain` and `vs best upstream` compare rows of the same workload and
    model (those in `baselines`)."""
    key = (r.workload, r.model)
    cells = [r.workload, r.model, r.impl]
    if r.ms is None:
        cells += ["—"] * 8
    else:
        plain, upstream_ms = baselines.plain_ms, baselines.best_upstream_ms
        tf = flops.tflops(r.flops_per_image, r.images, r.ms / 1000) if r.flops_per_image else None
        util = flops.mfu(tf, peak) if tf is not None else None
        cells += [
            f"{r.ms:.1f}",
            f"{1000 * r.images / r.ms:.1f}",
            f"{tf:.3g}" if tf is not None else "—",
            f"{100 * util:.1f}%" if util is not None else "—",
            f"{r.peak_gib:.2f}" if r.peak_gib is not None else "—",
            f"{plain[key] / r.ms:.2f}x" if key in plain and not r.impl.startswith("upstream") else "—",
            f"{upstream_ms[key] / r.ms:.2f}x" if key in upstream_ms else "—",
            f"{r.first_s:.1f}" if r.first_s is not None else "—",
        ]
    cells += [r.check, r.note]
    return "| " + " | ".join(cells) + " |"


def markdown_table(rows: list[Row], peak: Optional[float]) -> str:
    """The timings table, every row compared with all the others."""
    baselines = Baselines.of(rows)
    return "\n".join([*TABLE_HEAD, *(markdown_row(r, baselines, peak) for r in rows)])


def markdown_check(c: Check) -> str:
    return f"| {c.name} | {c.value:.2e} | {c.tolerance:.0e} | {'pass' if c.passed else 'FAIL'} |"


@dataclass
class LiveOutput:
    """Each check and row, the moment it is done: printed and flushed (a markdown line, then a JSON line) and
    appended to `folder`/live.md and live.jsonl when given, so a run killed at any point keeps what it
    measured. The markdown is the report's header, then the checks table and the timings table as they grow
    (a row's ratios compare it with the rows done before it)."""

    folder: Optional[Path]
    peak: Optional[float]
    checks: int = 0
    rows: int = 0

    def start(self, header: str) -> None:
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            for name in ("live.md", "live.jsonl"):
                (self.folder / name).write_text("")
        self._emit([header], None)

    def check(self, c: Check) -> None:
        head = [] if self.checks else ["", "## Checks: fast path against plain path (as they ran)", "", *CHECKS_HEAD]
        self.checks += 1
        self._emit([*head, markdown_check(c)], {"check": asdict(c)})

    def row(self, r: Row, done: list[Row]) -> None:
        head = [] if self.rows else ["", "## Timings (as measured)", "", *TABLE_HEAD]
        self.rows += 1
        self._emit([*head, markdown_row(r, Baselines.of(done), self.peak)], {"row": asdict(r)})

    def _emit(self, markdown: list[str], record: Optional[dict]) -> None:
        text = "\n".join(markdown) + "\n"
        line = json.dumps(record) + "\n" if record is not None else ""
        print(text + line, end="", flush=True)
        if self.folder is not None:
            with open(self.folder / "live.md", "a") as f:
                f.write(text)
            if line:
                with open(self.folder / "live.jsonl", "a") as f:
                    f.write(line)


class Models:
    """Per model name and implementation one model on the device, built on first use; every implementation
    starts from the same random initial weights (kept, so training one row does not change the others)."""

    def __init__(self, scale: Scale, device: torch.device, compile_backend: str):
        self.scale = scale
        self.device = device
        self.compile_backend = compile_backend
        self.initial: dict[str, dict] = {}
        self.built: dict[tuple[str, str], torch.nn.Module] = {}
        self.upstream_module = None

    def config(self, name: str):
        preset, overrides = self.scale.models[name]
        return flowmo_fast.load_config([*overrides, f"data.image_size={self.scale.size}"], preset=preset)

    def initial_weights(self, name: str) -> dict:
        if name not in self.initial:
            torch.manual_seed(0)
            with torch.device(self.device):
                template = flowmo_fast.FlowMo(self.config(name))
            self.initial[name] = template.state_dict()
        return self.initial[name]

    def get(self, name: str, impl: str) -> torch.nn.Module:
        key = (name, impl)
        if key not in self.built:
            weights, config = self.initial_weights(name), self.config(name)
            if impl in (*OURS, "fast_triton"):
                if impl == "fast_triton":
                    require_triton(self.device)
                with torch.device(self.device):
                    model = flowmo_fast.FlowMo(config)
                model.load_state_dict(weights)
                model.kernels = {"plain": "torch", "fast": "auto", "fast_triton": "triton"}[impl]
                model.cuda_graphs = impl != "plain"
                if impl != "plain":
                    compile_blocks(model, dynamic=False, backend=self.compile_backend)
            else:
                reason = upstream.skip_reason()
                if reason is not None:
                    raise Skipped(reason)
                with torch.device(self.device):
                    self.upstream_module, model = upstream.load_upstream(
                        config, weights, compiled=impl == "upstream_compiled"
                    )
            self.built[key] = model.eval()
        return self.built[key]

    def release(self, name: str) -> None:
        """Free every model of `name` (and its initial weights)."""
        for key in [k for k in self.built if k[0] == name]:
            del self.built[key]
        self.initial.pop(name, None)
        gc.collect()  # models sit in reference cycles (the CUDA-graph sampler, compiled modules)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class Skipped(Exception):
    """A row that cannot run here; the message says why."""


def require_triton(device: torch.device) -> None:
    """Skip the calling row unless Triton kernels can run: Triton installed and a CUDA device."""
    if not (device.type == "cuda" and triton_available()):
        raise Skipped("Triton kernels run on CUDA")


class Report:
    def __init__(self, args: argparse.Namespace, scale: Scale, device: torch.device, start: Optional[float] = None):
        """`start`: the time.perf_counter() the budget counts from (the process's start when run as a script;
        default now)."""
        self.args = args
        self.scale = scale
        self.device = device
        self.budget = Budget(args.budget_s, time.perf_counter() if start is None else start)
        self.models = Models(scale, device, args.compile_backend)
        self.rows: list[Row] = []
        self.checks: list[Check] = []
        self.outputs: dict[tuple[str, str], torch.Tensor] = {}  # (workload, model) -> the plain row's output
        self.live = LiveOutput(Path(args.out) if args.out else None, peak_bf16_tflops(device_name(device)))

    # --- running rows ---------------------------------------------------------------------------------

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
        except Skipped as e:
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

    def measure(self, row: Row, fn: Callable[[], object]) -> object:
        """Warm up (compile, capture), then time `fn` until `--target-s` or `--max-iters`; fills row.ms
        (median), row.first_s and row.peak_gib. Returns the warm-up call's output."""
        device = self.device
        sync(device)
        if device.type == "cuda":
            baseline = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        row.first_s = time.perf_counter() - start
        times: list[float] = []
        while not times or (sum(times) < self.args.target_s and len(times) < self.args.max_iters):
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
        row.ms = 1000 * statistics.median(times)
        if device.type == "cuda":
            row.peak_gib = (torch.cuda.max_memory_allocated(device) - baseline) / 2**30
        return out

    def compare(self, row: Row, out: torch.Tensor, kind: str = "rel L2") -> None:
        """Record the row's output against the plain row's (the plain row stores its own)."""
        key = (row.workload, row.model)
        if row.impl in ("plain", "torch"):
            self.outputs[key] = out.detach()
            return
        if key not in self.outputs:
            return
        ref = self.outputs[key]
        if kind == "ids":
            differ = float((out != ref).float().mean())
            row.check = f"ids differ {100 * differ:.2f}%"
        else:
            diff = rel_l2(out, ref)
            row.check = f"{kind} {diff:.1e}" + ("" if diff <= self.scale.tolerance else " (above tolerance!)")

    def reserve(self, impl: str) -> float:
        """Budget a model row needs left to start: compiling rows need more."""
        if impl == "upstream_compiled":
            return self.scale.upstream_compile_reserve_s
        return self.scale.compile_reserve_s if impl.startswith("fast") else self.scale.reserve_s

    # --- workloads ------------------------------------------------------------------------------------

    def images(self, batch: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator(self.device).manual_seed(seed)
        s = self.scale.size
        return torch.rand(batch, 3, s, s, generator=g, device=self.device) * 2 - 1

    def run_checks(self, name: str) -> None:
        """Fast against plain: decoder forward at the sampler's batch, training loss and gradient norm."""
        plain, fast = self.models.get(name, "plain"), self.models.get(name, "fast")
        b, s = self.scale.recon_batch, self.scale.size
        g = torch.Generator(self.device).manual_seed(5)
        context = plain.config.model.context_dim
        zt = torch.randn(b, 3, s, s, generator=g, device=self.device)
        code = torch.randn(b, plain.code_length, context + 1, generator=g, device=self.device).sign()
        t = torch.rand(b, generator=g, device=self.device)
        with torch.no_grad(), autocast_for(self.device):
            v_plain, v_fast = plain.decode(zt, code, t), fast.decode(zt, code, t)
        tol = self.scale.tolerance
        self.add_check(Check(f"{name} decoder forward, fast vs plain (rel L2)", rel_l2(v_fast, v_plain), tol))

        values = {impl: self.loss_and_grad_norm(name, impl) for impl in OURS}
        (loss_p, norm_p), (loss_f, norm_f) = values["plain"], values["fast"]
        self.add_check(Check(f"{name} training loss, fast vs plain (rel)", abs(loss_f / loss_p - 1), tol))
        self.add_check(Check(f"{name} gradient norm, fast vs plain (rel)", abs(norm_f / norm_p - 1), tol))

    def loss_and_grad_norm(self, name: str, impl: str) -> tuple[float, float]:
        """Training loss and gradient norm at fixed times and noise, no guidance dropout; no step taken."""
        model = self.models.get(name, impl).train()
        b, s = self.scale.train_batch, self.scale.size
        g = torch.Generator(self.device).manual_seed(6)
        t = torch.rand(b, generator=g, device=self.device)
        noise = torch.randn(b, 3, s, s, generator=g, device=self.device)
        try:
            with autocast_for(self.device):
                loss = flow.rectified_flow_loss(model, self.images(b), t=t, noise=noise, enable_cfg=False).loss
            loss.backward()
            grads = [p.grad.float().flatten() for p in model.parameters() if p.grad is not None]
            return float(loss.detach()), float(torch.linalg.vector_norm(torch.cat(grads)))
        finally:  # later rows get the model in eval mode, without gradients, even after a failure
            model.zero_grad(set_to_none=True)
            model.eval()

    def sampling(self) -> SamplingOptions:
        """The reconstruct rows' sampler: upstream's evaluation setting (cfg 1.5, pow_0.25, guidance interval),
        the scale's steps. Upstream's rows get the same steps and cfg."""
        return UPSTREAM.replace(steps=self.scale.recon_steps)

    def reconstruct(self, name: str, impl: str, batch: Optional[int] = None) -> None:
        """Images -> reconstructions: at the scale's batch (throughput), or at `batch` (1: latency)."""
        sc = self.scale
        workload = "reconstruct" if batch is None else f"reconstruct latency (batch {batch})"
        batch = sc.recon_batch if batch is None else batch
        sampling = self.sampling()
        per_image = flops.reconstruct_flops(self.models.config(name), sc.size, sc.size, sampling)
        row = Row(workload, name, impl, batch, per_image)

        def run():
            model, images = self.models.get(name, impl), self.images(batch)
            seed = lambda: torch.Generator(self.device).manual_seed(1)  # noqa: E731
            if impl in OURS:
                fn = lambda: model.reconstruct(images, sampling, generator=seed())  # noqa: E731
            else:
                noise = torch.randn(images.shape, generator=seed(), device=self.device)

                def fn():
                    with autocast_for(self.device):
                        return upstream.upstream_reconstruct(
                            self.models.upstream_module, model, images, noise, sampling.steps, sampling.cfg
                        ).float()
            self.compare(row, self.measure(row, fn))

        self.attempt(f"{workload} {name} {impl}", self.reserve(impl), run, row)

    def decoder_forward(self, name: str, impl: str) -> None:
        sc = self.scale
        per_image = flops.decoder_flops(self.models.config(name), sc.size, sc.size)
        row = Row("decoder forward", name, impl, sc.recon_batch, per_image)

        def run():
            model = self.models.get(name, impl)
            b, s = sc.recon_batch, sc.size
            g = torch.Generator(self.device).manual_seed(7)
            m = self.models.config(name).model
            zt = torch.randn(b, 3, s, s, generator=g, device=self.device)
            code = torch.randn(b, m.code_length, m.context_dim + 1, generator=g, device=self.device).sign()
            t = torch.rand(b, generator=g, device=self.device)

            @torch.no_grad()
            def fn():
                with autocast_for(self.device):
                    if not impl.startswith("upstream"):
                        return model.decode(zt, code, t).float()
                    return model.decode(img=zt, code=code, timesteps=t)[0].float()

            self.compare(row, self.measure(row, fn))

        self.attempt(f"decoder forward {name} {impl}", self.reserve(impl), run, row)

    def train_step(self, name: str, impl: str) -> None:
        sc = self.scale
        per_image = flops.train_step_flops(self.models.config(name), sc.size, sc.size)
        row = Row("train step", name, impl, sc.train_batch, per_image)

        def run():
            model, config = self.models.get(name, impl).train(), self.models.config(name)
            images = self.images(sc.train_batch)
            if impl.startswith("upstream"):
                optimizer = upstream.upstream_optimizer(model, config)

                def fn():
                    optimizer.zero_grad(set_to_none=True)
                    with autocast_for(self.device):
                        loss = self.models.upstream_module.rf_loss(model.config, model, {"image": images}, {})[0]
                    loss.backward()
                    optimizer.step()
            else:  # what train.pretrain runs each step (train/step.py), without the perceptual term, as upstream's row
                optimizer, objective = build_optimizer(model, config), FlowMoObjective(model, None).train()

                def fn():
                    train_step(objective, model, images, optimizer, config, self.device)

            try:
                self.measure(row, fn)
            finally:  # Adam's state goes with this function's frame
                model.zero_grad(set_to_none=True)
                with torch.no_grad():  # back to the initial weights, which the later rows compare against
                    model.load_state_dict(self.models.initial_weights(name))
                model.eval()

        self.attempt(f"train step {name} {impl}", self.reserve(impl), run, row)

    def encode(self, name: str, impl: str) -> None:
        sc = self.scale
        per_image = flops.encoder_flops(self.models.config(name), sc.size, sc.size)
        row = Row("encode (token ids)", name, impl, sc.encode_batch, per_image)

        def run():
            model = self.models.get(name, impl)
            images = self.images(sc.encode_batch, seed=2)
            if impl in OURS:
                encode = make_encoder(model, TokenSpec.for_model(model), compile=False, batch_size=sc.encode_batch)
                fn = lambda: torch.from_numpy(encode(images).astype("int64"))  # noqa: E731
            else:

                @torch.no_grad()
                def fn():
                    with autocast_for(self.device):
                        return model._quantize(model.encode(images)[0])[1].reshape(images.shape[0], -1).cpu()

            self.compare(row, self.measure(row, fn), kind="ids")

        self.attempt(f"encode {name} {impl}", self.reserve(impl), run, row)

    def lfq_loss(self, name: str, impl: str) -> None:
        """The quantizer loss, forward + backward, at the codes of one training batch."""
        config = self.models.config(name).model
        bits = config.codebook_size_for_entropy
        n = self.scale.train_batch * config.code_length * config.context_dim // bits
        row = Row(f"LFQ loss (N={n}, d={bits})", name, impl, self.scale.train_batch, None)

        def run():
            g = torch.Generator(self.device).manual_seed(8)
            x = (0.1 * torch.randn(n, bits, generator=g, device=self.device)).requires_grad_()
            if impl == "upstream":
                if upstream.skip_reason() is not None:
                    raise Skipped(upstream.skip_reason())
                quantizer = upstream.import_upstream().lookup_free_quantize.LFQ(
                    codebook_size=2**bits, dim=bits, num_codebooks=1, token_factorization=False
                ).to(self.device).train()

                def loss_of(x):
                    (_, aux, _), breakdown = quantizer(x.T[None], return_loss_breakdown=True)  # [1, d, N]
                    return ENTROPY_WEIGHT * aux + COMMIT_WEIGHT * breakdown.commitment
            else:
                if impl == "triton":
                    require_triton(self.device)
                lfq = get_ops(impl, self.device).lfq

                def loss_of(x):
                    out = lfq(x)
                    entropy = out.per_sample_entropy - out.codebook_entropy
                    return ENTROPY_WEIGHT * entropy + COMMIT_WEIGHT * out.commitment

            def fn():
                x.grad = None
                loss = loss_of(x)
                loss.backward()
                return torch.stack([loss.detach().float(), torch.linalg.vector_norm(x.grad.float())])

            out = self.measure(row, fn)
            key = (row.workload, row.model)
            if impl == "torch":
                self.outputs[key] = out
            elif key in self.outputs:
                diff = float(((out - self.outputs[key]).abs() / self.outputs[key].abs()).max())
                row.check = f"loss, grad norm rel {diff:.1e}"
                if impl == "triton":
                    self.add_check(Check(f"{name} LFQ loss and gradient, Triton vs torch (rel)", diff, 1e-4))

        self.attempt(f"LFQ loss {name} {impl}", self.scale.reserve_s, run, row)

    def kernel_op(self, name: str, op: str, impl: str) -> None:
        """One fused op, forward + backward, at the model's training shapes (bf16 on CUDA): `torch` eager,
        `torch compiled` (what Inductor makes of the plain op alone) or `triton`."""
        m = self.models.config(name).model
        b, length = self.scale.train_batch, (self.scale.size // m.patch_size) ** 2 + m.code_length
        hidden, head_dim = HIDDEN_PER_WIDTH * m.mup_width, HIDDEN_PER_WIDTH * m.mup_width // NUM_HEADS
        heads = (b, NUM_HEADS, length, head_dim)
        shape = f"2 x {list(heads)}" if op == "qk_norm_rope" else f"{[b, length, hidden]}"
        row = Row(f"kernel fwd+bwd: {op} {shape}", name, impl, b, None)

        def run():
            if impl == "triton":
                require_triton(self.device)
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            g = torch.Generator(self.device).manual_seed(9)

            def rand(*shape):
                return torch.randn(*shape, generator=g, device=self.device).to(dtype).requires_grad_()

            x, y = rand(b, length, hidden), rand(b, length, hidden)
            shift, scale, gate = rand(b, 1, hidden), rand(b, 1, hidden), rand(b, 1, hidden)
            q, k, weight = rand(*heads), rand(*heads), rand(head_dim)
            cos, sin = (torch.rand(length, head_dim // 2, generator=g, device=self.device) for _ in range(2))
            ops = get_ops("triton" if impl == "triton" else "torch", self.device)
            calls = {
                "modulate": (lambda: ops.modulate(x, shift, scale, dtype), (x, shift, scale)),
                "gated_residual": (lambda: ops.gated_residual(x, gate, y), (x, gate, y)),
                "qk_norm_rope": (
                    lambda: torch.stack(ops.qk_norm_rope(q, k, weight, weight, cos, sin, dtype)), (q, k, weight)
                ),
            }
            forward, leaves = calls[op]
            if impl == "torch compiled":
                forward = torch.compile(forward, backend=self.args.compile_backend)

            def fn():
                out = forward()
                grads = torch.autograd.grad(out.float().square().mean(), leaves)
                return torch.cat([out.detach().float().flatten(), *(gr.float().flatten() for gr in grads)])

            self.compare(row, self.measure(row, fn))

        self.attempt(f"kernel {op} {impl}", self.reserve("fast" if impl == "torch compiled" else "plain"), run, row)

    # --- the whole report -----------------------------------------------------------------------------

    def run(self) -> None:
        """Rows in order of importance, one model at a time (so a model's weights are freed before the next);
        only the phases of `--phases`."""
        lo, *others = self.scale.models
        phases = self.args.phases
        if "check" in phases:
            self.attempt(f"check {lo}", 0, lambda: self.run_checks(lo))
        workloads = {
            "reconstruct": self.reconstruct,
            "latency": lambda name, impl: self.reconstruct(name, impl, batch=1),
            "decoder": self.decoder_forward,
        }
        for phase, workload in workloads.items():
            if phase in phases:
                for impl in (*OURS, "upstream_eager"):
                    workload(lo, impl)
        for name in (lo, *others):
            for impl in (*OURS, "upstream_eager"):
                if "train" in phases:
                    self.train_step(name, impl)
                if "encode" in phases:
                    self.encode(name, impl)
            self.models.release(name)
        if "lfq" in phases:
            for name in (lo, *others):
                for impl in ("torch", "triton", "upstream"):
                    self.lfq_loss(name, impl)
        if "kernels" in phases:
            for op in ("modulate", "gated_residual", "qk_norm_rope"):
                for impl in ("torch", "torch compiled", "triton"):
                    self.kernel_op(lo, op, impl)
            self.decoder_forward(lo, "fast_triton")
            self.train_step(lo, "fast_triton")
            self.models.release(lo)
        if "upstream_compiled" not in phases:
            return
        if self.args.dry_run:
            self.rows.append(Row("reconstruct, decoder forward, train step, encode", "all", "upstream_compiled", 0,
                                 None, note="not run in --dry-run (inductor compiles for minutes on a CPU)"))
            self.live.row(self.rows[-1], self.rows)
            return
        for workload in (self.reconstruct, self.decoder_forward, self.train_step, self.encode):  # compiles longest
            workload(lo, "upstream_compiled")
        self.models.release(lo)
        for name in others:
            self.train_step(name, "upstream_compiled")
            self.models.release(name)

    # --- output ---------------------------------------------------------------------------------------

    def header(self) -> str:
        name, sampling = device_name(self.device), self.sampling()
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
            (f"- sizes: {self.scale.size}px; reconstruct batch {self.scale.recon_batch} and 1 ({sampling.steps} steps, "
             f"cfg {sampling.cfg}, {sampling.schedule}); train batch {self.scale.train_batch}; encode batch "
             f"{self.scale.encode_batch}"),
            (f"- wall time: {self.budget.elapsed():.0f} s of a {self.budget.seconds:.0f} s budget (from the "
             "process's start)"),
        ])

    def markdown(self) -> str:
        """The whole report: header, checks, FLOP formula, the timings table."""
        lines = [self.header(), "", "## Checks: fast path against plain path", "", *CHECKS_HEAD]
        lines += [markdown_check(c) for c in self.checks]
        if not self.checks:
            lines.append("| (no check ran) | | | FAIL |" if "check" in self.args.phases else
                         "| (not asked for: --phases) | | | |")
        lines += ["", "## FLOP counts", "", "```", flops.FORMULA, "```", ""]
        lines += ["vs plain: plain ms / ms; vs best upstream: faster upstream row's ms / ms (above 1: we are faster).",
                  "", "## Timings", ""]
        return "\n".join(lines) + "\n" + markdown_table(self.rows, peak_bf16_tflops(device_name(self.device)))

    def save(self, path: Path) -> None:
        checks, rows = [asdict(c) for c in self.checks], [asdict(r) for r in self.rows]
        data = {"header": self.header(), "checks": checks, "rows": rows}
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
    return 1 if failed or (not report.checks and "check" in args.phases) else 0


if __name__ == "__main__":
    sys.exit(main(start=START))
