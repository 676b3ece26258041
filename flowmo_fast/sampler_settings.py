"""FlowMo's sampler settings, in one place, as three types with one job each:
- `SamplingConfig`: the config section `eval.sampling` (upstream's keys, as stored in every checkpoint);
- `SamplingOptions`: what the sampler runs with (steps, guidance scale, time schedule, guidance interval), and
  the plan of one sampling run computed from it (times, step sizes, guided steps);
- `SamplingOverrides`: the settings a user gave (a command's flags), over a checkpoint's own options.

The defaults are upstream's `eval.sampling`: 25 steps, cfg 1.5, schedule pow_0.25, guidance for EDM sigmas in
(0.17, 1.02). A model samples with its own config's settings unless given others.
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


@dataclass(frozen=True)
class SamplerPlan:
    """One sampling run, from t = 1 towards 0: the time and step size (Python floats, float32-rounded as
    upstream's host tensors) and whether guidance applies, per step."""

    times: tuple[float, ...]
    step_sizes: tuple[float, ...]
    guided: tuple[bool, ...]


@dataclass(frozen=True)
class SamplingOptions:
    """The evaluation sampler's settings. Hashable (a CUDA-graph capture is keyed by it)."""

    steps: int
    cfg: float
    schedule: str  # "linear" or "pow_P"
    cfg_interval: Optional[tuple[float, float]]  # EDM sigmas (lo, hi) where guidance applies; None: every step

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"sampler steps={self.steps!r}: must be a positive integer")
        parse_schedule(self.schedule)
        object.__setattr__(self, "cfg", float(self.cfg))
        object.__setattr__(self, "cfg_interval", parse_cfg_interval(self.cfg_interval))

    @classmethod
    def from_config(cls, sampling: SamplingConfig) -> "SamplingOptions":
        """A config's `eval.sampling` (upstream's keys) as options."""
        return cls(sampling.sample_steps, sampling.cfg, sampling.schedule, sampling.cfg_interval)

    def replace(self, **changes) -> "SamplingOptions":
        return dataclasses.replace(self, **changes)

    @property
    def guidance(self) -> bool:
        """Whether any step runs the unconditional pass (cfg 1 makes it a no-op)."""
        return self.cfg != 1.0

    def plan(self) -> SamplerPlan:
        """Times, step sizes and guided steps, computed once per sampling run (never on the device)."""
        ts, dts = self.schedule_tensors()
        guided = tuple(self.in_interval(t) and self.guidance for t in ts.tolist())
        return SamplerPlan(tuple(ts.tolist()), tuple(dts.tolist()), guided)

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

    def over(self, base: SamplingOptions) -> SamplingOptions:
        return base.replace(**self.given())

    def given(self) -> dict:
        """The settings given, by name."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


UPSTREAM = SamplingOptions.from_config(SamplingConfig())  # upstream's defaults, from the config's one copy
