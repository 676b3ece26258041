"""eval.decode_curve's sweep and records, and what is read from them: the points a curve has (`Sweep`), one
point's record (a line of curve.jsonl), the metrics' noise (the baseline's spread over noise seeds), each
solver's verdict, the markdown table and the plot.

Pure functions of the records: a rerun that measures nothing new writes the same table and plot.
"""

from __future__ import annotations

import dataclasses
import io
import json
import statistics
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Optional

from eval.rfid import METRICS
from flowmo_fast.formats.checkpoint import atomic_write
from flowmo_fast.sampler_settings import SOLVERS, parse_solver

REFERENCE_DISTANCE = "ref_rmse"  # not a quality: no noise, no verdict; its own panel, on a log scale
ZOOM_PASSES = 8  # quality panels show the values of points with this many passes or more (and the baseline's band)
COLUMNS = ("psnr", "ssim", "lpips_alex", "lpips_vgg", "rfid", REFERENCE_DISTANCE)
FORMATS = {"psnr": ".2f", "ssim": ".4f", "lpips_alex": ".4f", "lpips_vgg": ".4f", "rfid": ".3f",
           REFERENCE_DISTANCE: ".2e"}


DEFAULT_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 25, 32)


class SolverSteps(NamedTuple):
    solver: str
    steps: int

    def __str__(self) -> str:
        return f"{self.solver}:{self.steps}"


def solver_steps(text: str) -> SolverSteps:
    """'heun:200' -> SolverSteps("heun", 200)."""
    solver, _, steps = text.partition(":")
    if not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"{text!r}: expected SOLVER:STEPS such as heun:200")
    return SolverSteps(parse_solver(solver), int(steps))


@dataclass(frozen=True)
class Sweep:
    """A curve's points: every solver at every step count, judged against the baseline (run at `noise_seeds`
    seeds for the metrics' noise) and measured against the reference solution."""

    solvers: tuple[str, ...] = SOLVERS
    steps: tuple[int, ...] = DEFAULT_STEPS
    baseline: SolverSteps = SolverSteps("euler", 25)  # upstream's
    reference: SolverSteps = SolverSteps("heun", 200)
    noise_seeds: int = 3


@dataclass
class PointRecord:
    """One point of the curve as curve.jsonl has it."""

    solver: str
    steps: int
    seed: int
    passes: int  # decoder passes per image
    metrics: dict[str, Optional[float]] = field(default_factory=dict)  # name -> mean over images (None: n/a)
    num_images: int = 0
    seconds: float = 0.0

    @classmethod
    def from_json(cls, line: str) -> "PointRecord":
        d = json.loads(line)
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


def qualities(records: Iterable[PointRecord]) -> list[str]:
    """The quality metrics the records have (every column but the reference distance), in table order."""
    present = {name for r in records for name, v in r.metrics.items() if v is not None}
    return [name for name in COLUMNS if name in present and name != REFERENCE_DISTANCE]


def find(records: Iterable[PointRecord], solver: str, steps: int, seed: int) -> Optional[PointRecord]:
    return next((r for r in records if (r.solver, r.steps, r.seed) == (solver, steps, seed)), None)


def noise_of(records: list[PointRecord], baseline: SolverSteps, seed: int, seeds: int) -> dict[str, float]:
    """Each quality metric's standard deviation over the baseline's noise seeds (those measured, at least 2)."""
    runs = [r for k in range(seeds) if (r := find(records, *baseline, seed + k)) is not None]
    if len(runs) < 2:
        return {}
    return {name: statistics.stdev(r.metrics[name] for r in runs) for name in qualities(runs)}


def matches(record: PointRecord, baseline: PointRecord, noise: dict[str, float]) -> bool:
    """Every quality metric within its noise of the baseline's, either way: a coarse ODE solution is smoother
    than the baseline's, and a smoother image scores a higher PSNR and SSIM to the original (not a better one)."""
    return all(
        abs(record.metrics[name] - baseline.metrics[name]) <= spread
        for name, spread in noise.items()
        if record.metrics.get(name) is not None and baseline.metrics.get(name) is not None
    )


def accurate(record: PointRecord, baseline: PointRecord) -> bool:
    """No farther from the reference solution than the baseline (ref_rmse): as accurate a solution of the ODE."""
    mine, theirs = record.metrics.get(REFERENCE_DISTANCE), baseline.metrics.get(REFERENCE_DISTANCE)
    return mine is not None and theirs is not None and mine <= theirs


def from_on(line: list[PointRecord], holds) -> Optional[PointRecord]:
    """The fewest-passes point of `line` (sorted by passes) from which on `holds` is true of every point."""
    found = None
    for record in reversed(line):
        if not holds(record):
            break
        found = record
    return found


@dataclass(frozen=True)
class Verdict:
    """One solver against the baseline: which points match it within the noise, from which point on every one
    does, and from which on every one is as accurate a solution of the ODE (None: no such point)."""

    solver: str
    baseline: PointRecord
    matching: tuple[PointRecord, ...]
    stays: Optional[PointRecord]
    accurate: Optional[PointRecord]

    @property
    def sentence(self) -> str:
        base = self.baseline
        judge = f"{base.solver}:{base.steps} ({base.passes} passes)"
        at = "no step count measured"
        if self.matching:
            at = (f"{', '.join(str(r.steps) for r in self.matching)} steps "
                  f"({', '.join(str(r.passes) for r in self.matching)} passes)")
        return (f"{self.solver}: matches {judge} within the noise at {at}; from {on(self.stays, base)} on; "
                f"as accurate (ref_rmse) from {on(self.accurate, base)} on")


def on(point: Optional[PointRecord], base: PointRecord) -> str:
    if point is None:
        return "none of them"
    return f"{point.steps} steps ({point.passes} passes, {point.passes / base.passes:.0%} of the baseline's)"


def verdicts(records: list[PointRecord], solvers: Iterable[str], steps: Iterable[int], baseline: SolverSteps,
             seed: int, noise: dict[str, float]) -> dict[str, Verdict]:
    """Per solver, its verdict from its points at `steps` (noise seed `seed`, by passes); none without the
    baseline or its noise."""
    base = find(records, *baseline, seed)
    if base is None or not noise:
        return {}
    out = {}
    for solver in solvers:
        line = sorted((r for r in records if r.solver == solver and r.seed == seed and r.steps in steps),
                      key=lambda r: (r.passes, r.steps))
        good = tuple(r for r in line if matches(r, base, noise))
        stays = from_on(line, lambda r: matches(r, base, noise))
        out[solver] = Verdict(solver, base, good, stays, from_on(line, lambda r: r is base or accurate(r, base)))
    return out


def cell(name: str, value: Optional[float]) -> str:
    return "n/a" if value is None else format(value, FORMATS[name])


def write_table(path: str, header: list[str], records: list[PointRecord], s: Sweep, seed: int,
                noise: dict[str, float], found: dict[str, Verdict]) -> None:
    """curve.md: the settings, the metrics' noise, one row per point (noise seed `seed`), then the verdicts."""
    names = [n for n in COLUMNS if any(r.metrics.get(n) is not None for r in records)]
    base = find(records, *s.baseline, seed)
    lines = ["# Decoding cost: quality against decoder passes", "", *(f"- {h}" for h in header), ""]
    lines += [f"| solver | steps | passes | {' | '.join(names)} | s | matches {s.baseline} | as accurate |",
              "| --- " * (len(names) + 6) + "|"]
    lines.append(f"| noise (std over {s.noise_seeds} seeds) | | | "
                 + " | ".join(cell(n, noise.get(n)) for n in names) + " | | | |")
    rows = sorted((r for r in records if r.seed == seed), key=lambda r: (r.solver != s.baseline.solver, r.solver,
                                                                         r.passes))
    for r in rows:
        verdict = "" if base is None or not noise else ("yes" if matches(r, base, noise) else "no")
        closer = "" if base is None or REFERENCE_DISTANCE not in r.metrics else ("yes" if accurate(r, base) else "no")
        label = " (reference)" if (r.solver, r.steps) == tuple(s.reference) else ""
        lines.append(f"| {r.solver}{label} | {r.steps} | {r.passes} | "
                     + " | ".join(cell(n, r.metrics.get(n)) for n in names)
                     + f" | {r.seconds:.1f} | {verdict} | {closer} |")
    lines += ["", *(f"- {v.sentence}" for v in found.values())]
    lines += ["", "(no verdict: the baseline or its noise is missing)" if not found else "", ""]
    body = "\n".join(lines).encode()
    atomic_write(path, lambda f: f.write(body))


def write_plot(path: str, records: list[PointRecord], s: Sweep, seed: int, noise: dict[str, float]) -> None:
    """curve.png: one panel per metric against decoder passes (log scale), one line per solver (noise seed
    `seed`); the baseline's value as a dashed line in its noise band. Quality panels are zoomed to the points
    of ZOOM_PASSES passes or more (the cheapest points of a bad solver would squash the rest; the table has
    them all)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [n for n in COLUMNS if any(r.metrics.get(n) is not None for r in records)]
    base = find(records, *s.baseline, seed)
    figure = Figure(figsize=(3.4 * len(names), 3.2), layout="constrained")
    for axes, name in zip(figure.subplots(1, len(names), squeeze=False)[0], names):
        for solver in s.solvers:
            line = sorted((r for r in records if r.solver == solver and r.seed == seed and r.steps in s.steps
                           and r.metrics.get(name) is not None), key=lambda r: r.passes)
            axes.plot([r.passes for r in line], [r.metrics[name] for r in line], marker="o", markersize=3,
                      label=solver)
        band = []
        if base is not None and base.metrics.get(name) is not None and name != REFERENCE_DISTANCE:
            value, spread = base.metrics[name], noise.get(name, 0.0)
            band = [value - spread, value + spread]
            axes.axhline(value, color="gray", linestyle="--", linewidth=1, label=f"{s.baseline}")
            axes.axhspan(value - spread, value + spread, color="gray", alpha=0.2, linewidth=0)
        axes.set_xscale("log", base=2)
        if name == REFERENCE_DISTANCE:
            axes.set_yscale("log")
        else:
            zoom_to(axes, band + [r.metrics[name] for r in records if r.seed == seed and r.passes >= ZOOM_PASSES
                                  and r.metrics.get(name) is not None and r.steps in s.steps])
        info = METRICS.get(name)
        direction = f" ({'higher' if info.higher_is_better else 'lower'} is better)" if info else f" to {s.reference}"
        axes.set_title(name + direction, fontsize="medium")
        axes.set_xlabel("decoder passes per image")
    figure.axes[0].legend(fontsize="small")
    figure.suptitle(f"quality panels: y range of the points with {ZOOM_PASSES} passes or more", fontsize="small")
    png = io.BytesIO()
    FigureCanvasAgg(figure).print_png(png)
    atomic_write(path, lambda f: f.write(png.getvalue()))


def zoom_to(axes, values: list[float]) -> None:
    """y limits around `values`, padded, inside the present ones (nothing without values)."""
    if not values:
        return
    lo, hi = axes.get_ylim()
    low, high = min(values), max(values)
    pad = 0.1 * (high - low) or 0.01 * abs(high) or 0.01
    axes.set_ylim(max(lo, low - pad), min(hi, high + pad))
