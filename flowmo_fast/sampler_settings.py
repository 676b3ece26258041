"""FlowMo's sampler settings, in one place, as three types with one job each:
- `SamplingConfig`: the config section `eval.sampling` (upstream's keys and our `solver`, as stored in every
  checkpoint);
- `SamplingOptions`: what the sampler runs with (steps, guidance scale, time schedule, guidance interval, ODE
  solver), and the plan of one sampling run computed from it (per step: times, step size, guidance, the
  solver's coefficients);
- `SamplingOverrides`: the settings a user gave (a command's flags), over a checkpoint's own options.

The defaults are upstream's `eval.sampling`: 25 Euler steps, cfg 1.5, schedule pow_0.25, guidance for EDM sigmas
in (0.17, 1.02). A model samples with its own config's settings unless given others.

Solvers of the ODE dz/dt = f(z, t) from t = 1 to 0, with f the (guided) velocity and h_i = t_i - t_(i+1) > 0 (a
guided velocity costs two decoder passes, an unguided one one):
- `euler` (upstream's; 1 velocity a step): z_(i+1) = z_i - h_i f(z_i, t_i). First order.
- `heun` (2 velocities a step): k1 = f(z_i, t_i), k2 = f(z_i - h_i k1, t_(i+1)), z_(i+1) = z_i - h_i (k1 + k2) / 2.
- `midpoint` (2 velocities a step): k1 as Heun's, k2 = f(z_i - h_i k1 / 2, t_i - h_i / 2), z_(i+1) = z_i - h_i k2.
- `ab2`, Adams-Bashforth 2 on the schedule's uneven steps (1 velocity a step, reusing the previous step's one):
  z_(i+1) = z_i - h_i ((1 + r / 2) k_i - (r / 2) k_(i-1)), r = h_i / h_(i-1); its first step is Euler's, and so is
  a step where guidance switches on or off (the previous velocity is of the other field, not an earlier value
  of this one).
The last three are second order. Guidance applies to every velocity whose time lies in the interval (Euler: each
step's start time, as upstream), so all solvers solve one ODE and converge to one solution.
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch


@dataclass
class SamplingConfig:
    sample_steps: int = 25
    schedule: str = "pow_0.25"
    cfg: float = 1.5
    mode: str = "rf"
    cfg_interval: Optional[str] = "(.17,1.02)"  # EDM sigmas (lo, hi); None = guide at every step
    solver: str = "euler"  # ours: the ODE solver (SOLVERS); upstream's is euler


def parse_cfg_interval(interval) -> Optional[tuple[float, float]]:
    """"(.17,1.02)", ".17,1.02" or a pair -> (lo, hi) as EDM sigmas; None stays None."""
    if interval is None:
        return None
    if isinstance(interval, str):
        text = interval.strip()
        if text.lower() in ("", "none", "null"):
            return None
        try:
            interval = ast.literal_eval(text if text.startswith("(") else f"({text})")
        except (ValueError, SyntaxError):
            interval = None
    if not (isinstance(interval, (tuple, list)) and len(interval) == 2):
        raise ValueError(f"cfg_interval {interval!r}: expected two numbers 'lo,hi' such as '.17,1.02'")
    lo, hi = float(interval[0]), float(interval[1])
    if lo > hi:
        raise ValueError(f"cfg_interval ({lo}, {hi}): lo must not exceed hi")
    return lo, hi


def parse_schedule(schedule: str) -> Optional[float]:
    """Sampler schedule: "linear" -> None, "pow_P" -> P (> 0)."""
    if schedule == "linear":
        return None
    if schedule.startswith("pow_"):
        try:
            p = float(schedule[4:])
        except ValueError:
            p = 0.0
        if p > 0:
            return p
    raise ValueError(f"sampler schedule {schedule!r}: allowed are 'linear' and 'pow_P' with P > 0 (e.g. 'pow_0.25')")


EULER = "euler"
SOLVERS = (EULER, "heun", "midpoint", "ab2")


def parse_solver(solver: str) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"sampler solver {solver!r}: allowed are {', '.join(SOLVERS)}")
    return solver


@dataclass(frozen=True)
class Stage:
    """The second velocity of a two-pass step (Heun, midpoint): k2 at z_i - lead k1 and time `time`; the step
    then moves along k1 + weight (k2 - k1)."""

    time: float
    lead: float
    weight: float
    guided: bool


@dataclass(frozen=True)
class SolverStep:
    """One step of a sampling run, from `time` down by `size`; Python floats, computed on the host."""

    time: float  # t_i (float32-rounded, as upstream's host tensors)
    size: float  # h_i = t_i - t_(i+1) > 0
    guided: bool  # guidance on the velocity at t_i
    history: float = 0.0  # multistep: the step moves along k_i + history (k_(i-1) - k_i); 0: along k_i alone
    stage: Optional[Stage] = None  # two-pass methods: the second velocity

    @property
    def passes(self) -> int:
        """Decoder passes per image: one per velocity, two for a guided one (conditional + unconditional)."""
        return 1 + self.guided + (1 + self.stage.guided if self.stage is not None else 0)


@dataclass(frozen=True)
class SamplerPlan:
    """One sampling run, from t = 1 towards 0, step by step."""

    steps: tuple[SolverStep, ...]

    @property
    def times(self) -> tuple[float, ...]:
        return tuple(s.time for s in self.steps)

    @property
    def step_sizes(self) -> tuple[float, ...]:
        return tuple(s.size for s in self.steps)

    @property
    def guided(self) -> tuple[bool, ...]:
        """Whether guidance applies at each step's start."""
        return tuple(s.guided for s in self.steps)

    @property
    def passes(self) -> int:
        """Decoder passes per image of the whole run."""
        return sum(s.passes for s in self.steps)


def with_history(steps: list[SolverStep]) -> list[SolverStep]:
    """Adams-Bashforth 2 on uneven steps: k_i + (r / 2) (k_i - k_(i-1)), r = h_i / h_(i-1), from the second step
    on; Euler (no history) where guidance switches, whose previous velocity is of the other field."""
    out = steps[:1]
    for previous, step in zip(steps, steps[1:]):
        r = step.size / previous.size
        out.append(dataclasses.replace(step, history=-r / 2 if step.guided == previous.guided else 0.0))
    return out


@dataclass(frozen=True)
class SamplingOptions:
    """The evaluation sampler's settings. Hashable (a CUDA-graph capture is keyed by it)."""

    steps: int
    cfg: float
    schedule: str  # "linear" or "pow_P"
    cfg_interval: Optional[tuple[float, float]]  # EDM sigmas (lo, hi) where guidance applies; None: every step
    solver: str = EULER  # SOLVERS (module docstring)

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"sampler steps={self.steps!r}: must be a positive integer")
        parse_schedule(self.schedule)
        parse_solver(self.solver)
        object.__setattr__(self, "cfg", float(self.cfg))
        object.__setattr__(self, "cfg_interval", parse_cfg_interval(self.cfg_interval))

    @classmethod
    def from_config(cls, sampling: SamplingConfig) -> "SamplingOptions":
        """A config's `eval.sampling` (upstream's keys) as options."""
        return cls(sampling.sample_steps, sampling.cfg, sampling.schedule, sampling.cfg_interval, sampling.solver)

    def replace(self, **changes) -> "SamplingOptions":
        return dataclasses.replace(self, **changes)

    @property
    def guidance(self) -> bool:
        """Whether any step runs the unconditional pass (cfg 1 makes it a no-op)."""
        return self.cfg != 1.0

    def plan(self) -> SamplerPlan:
        """Times, step sizes, guidance and the solver's coefficients of every step, computed once per sampling
        run (never on the device)."""
        ts, dts = self.schedule_tensors()
        times, sizes = ts.tolist(), dts.tolist()
        ends = [*times[1:], 0.0]  # t_(i+1), exactly the next step's time
        steps = [
            SolverStep(t, h, self.guided_at(t), stage=self.stage(t, h, end)) for t, h, end in zip(times, sizes, ends)
        ]
        return SamplerPlan(tuple(with_history(steps) if self.solver == "ab2" else steps))

    def stage(self, t: float, h: float, end: float) -> Optional[Stage]:
        """The second velocity of a step from t to end = t - h (two-pass solvers), else None."""
        if self.solver == "heun":
            return Stage(end, h, 0.5, self.guided_at(end))
        if self.solver == "midpoint":
            return Stage(t - h / 2, h / 2, 1.0, self.guided_at(t - h / 2))
        return None

    def guided_at(self, t: float) -> bool:
        """Whether the velocity at time t runs the unconditional pass too."""
        return self.guidance and self.in_interval(t)

    def schedule_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(times [steps], step sizes [steps]) on the CPU in float32, as upstream computes them."""
        p = parse_schedule(self.schedule)
        if p is None:
            ts = torch.arange(1, self.steps + 1).flip(0) / self.steps
            return ts, torch.ones_like(ts) * (1.0 / self.steps)
        ts = torch.arange(0, self.steps + 1).flip(0) ** (1 / p) / self.steps ** (1 / p)
        return ts[:-1], ts[:-1] - ts[1:]

    def in_interval(self, t: float) -> bool:
        """Whether time t lies in the guidance interval (EDM sigma s maps to t = s / (1 + s))."""
        if self.cfg_interval is None:
            return True
        lo, hi = (s / (1 + s) for s in self.cfg_interval)
        return lo <= t <= hi

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SamplingOverrides:
    """Sampler settings a user gave (None: not given) over a model's own (`SamplingOptions` of its config)."""

    steps: Optional[int] = None
    cfg: Optional[float] = None
    schedule: Optional[str] = None
    cfg_interval: Union[tuple[float, float], str, None] = None  # "none": guidance at every step (None: not given)
    solver: Optional[str] = None

    def over(self, base: SamplingOptions) -> SamplingOptions:
        return base.replace(**self.given())

    def then(self, later: "SamplingOverrides") -> "SamplingOverrides":
        """These settings with those `later` gives put over them (a named sampler, then the flags)."""
        return dataclasses.replace(self, **later.given())

    def given(self) -> dict:
        """The settings given, by name."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


UPSTREAM = SamplingOptions.from_config(SamplingConfig())  # upstream's defaults, from the config's one copy

# Named samplers (`--sampler NAME`), over a checkpoint's own settings; measured in the README's "Decoding cost":
# fast: Adams-Bashforth 2 in 12 steps, 15 decoder passes per image with upstream's guidance interval instead of
# Euler's 31 at 25 steps, matched upstream's 25 Euler steps in PSNR and SSIM within the noise of reseeding on both
# checkpoints measured there (tiny ones: LPIPS and rFID were not measured).
NAMED_SAMPLERS = {"fast": SamplingOverrides(steps=12, solver="ab2")}
