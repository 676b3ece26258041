"""`python -m eval.decode_curve --ckpt CKPT [--data DIR]`: what FlowMo's decoding costs, as reconstruction quality
against decoder passes per image, for each ODE solver and step count of the sampler.

Every point of the curve (a solver and a step count) reconstructs the same images with the same per-image noise
(--seed) as eval.rfid does (its code, eval.rfid.measure_model), and records the decoder passes per image
(flowmo_fast.flowmo.decoder_passes), PSNR, SSIM, LPIPS (where the AlexNet and VGG weights are had), rFID (where
the FID Inception's are) and `ref_rmse`: each image's root mean square distance, in [-1, 1] pixel units, to a
many-step solution of the same ODE (--reference, default heun:200) from the same noise, which measures the solver
alone, not the model. The other sampler settings (guidance, schedule, interval) are the checkpoint's
eval.sampling, or the flags'.

The baseline (--baseline, default upstream's euler:25) also runs with --noise-seeds - 1 other noise seeds: the
standard deviation of its metrics over the seeds is the noise a point is judged within. A point "matches" the
baseline when each of its quality metrics is within that noise of the baseline's, either way (fewer steps give
smoother images, which score a higher PSNR: not a better decoding), and is "as accurate" when its ref_rmse is no
larger than the baseline's. A solver's verdict: the step counts that match, and the fewest passes from which on
every point of it matches, and from which on every one is as accurate.

Writes into --out (default eval_results/<checkpoint name>_curve): settings.json (what the curve measures: the
checkpoint, images, sampler, metrics, reference), curve.jsonl (one line per point, appended as each finishes, so
a rerun, after a crash or with more solvers or step counts, computes only the points missing; a rerun with other
settings is refused), curve.md (the table and the verdict), curve.png (each metric against passes, one line per
solver) and reference-rank*.pt (the reference solution, kept for reruns). Also runs under torchrun, as eval.rfid.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from eval import rfid, weights
from eval.curve_report import (
    DEFAULT_STEPS,
    PointRecord,
    Sweep,
    noise_of,
    solver_steps,
    verdicts,
    write_plot,
    write_table,
)
from eval.history import append_line, check_or_record_settings, complete_lines
from flowmo_fast import flags, load_checkpoint
from flowmo_fast.distributed import Processes, on_rank0, processes
from flowmo_fast.flowmo import decoder_passes
from flowmo_fast.formats.checkpoint import atomic_write, file_sha256
from flowmo_fast.formats.pretrained import resolve_checkpoint
from flowmo_fast.sampler_settings import SOLVERS, SamplingOptions, parse_solver


@dataclass(frozen=True)
class CurveSettings:
    """One eval.decode_curve run."""

    ckpt: str  # a checkpoint file (a published name resolved already)
    out: str  # folder for settings.json, curve.jsonl, curve.md, curve.png, the reference
    evaluation: rfid.EvaluationSettings = rfid.EvaluationSettings()  # its sampling: never steps or solver
    sweep: Sweep = Sweep()  # the baseline's noise seeds: --seed, --seed + 1, ...
    rfid: bool = True  # measure rFID where the Inception weights are had
    device: str = "auto"


class Point(NamedTuple):
    solver: str
    steps: int
    seed: int


def points(s: CurveSettings) -> list[Point]:
    """The baseline at each noise seed first (the judge), then the sweep; each once."""
    seed, sweep = s.evaluation.seed, s.sweep
    wanted = [Point(*sweep.baseline, seed + k) for k in range(sweep.noise_seeds)]
    wanted += [Point(solver, n, seed) for solver in sweep.solvers for n in sweep.steps]
    return list(dict.fromkeys(wanted))


# ---- metric weights, settings, records ---------------------------------------------------------------------


def available_weights(given: rfid.MetricWeights, want_rfid: bool, log) -> dict[str, str]:
    """The metric weight files that can be had (given, cached or downloaded). A missing one that was not named
    is left out with one line saying so; one named by a flag or environment variable must exist."""
    paths = {}
    for name, spec, explicit in rfid.metric_weight_files(given, inception=want_rfid):
        try:
            paths[name] = weights.locate(spec, explicit, progress=False)
        except weights.WeightsUnavailable:
            if explicit or os.environ.get(spec.env):
                raise
            log(f"note: no {spec.what} weights ({spec.filename}: not given, not cached, not downloadable), so "
                f"{'rFID' if name == 'inception' else 'LPIPS-' + name} is left out; {spec.flag} PATH adds it")
    return paths


def curve_identity(s: CurveSettings, model, base: SamplingOptions, dataset, metric_names: list[str]) -> dict:
    """What a curve measures; a rerun must measure the same to add points to it (settings.json)."""
    size = model.config.data.image_size
    sampler = {k: v for k, v in base.to_dict().items() if k not in ("steps", "solver")}
    return json.loads(json.dumps({
        "checkpoint": {"sha256": file_sha256(s.ckpt), "which": s.evaluation.which},  # the file may move
        "data": rfid.data_record(dataset, s.evaluation, size),
        "sampler": {**sampler, "seed": s.evaluation.seed},
        "metrics": metric_names,
        "reference": str(s.sweep.reference),
    }))


def read_records(path: str, log) -> dict[Point, PointRecord]:
    records = {}
    for number, line in enumerate(complete_lines(path, log), 1):
        try:
            record = PointRecord.from_json(line)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{path} line {number} is not a curve point ({e}); repair or delete it, then "
                             "rerun") from None
        records[Point(record.solver, record.steps, record.seed)] = record
    return records


# ---- the reference solution and the distance to it --------------------------------------------------------


class Reference:
    """The reference solution of this process's images, by row: collected while it is sampled (as an
    eval.rfid.PerImage that adds no value), or read back from its file."""

    names: Sequence[str] = ()

    def __init__(self, path: str, sampler: dict):
        self.path, self.sampler = path, sampler
        self.images: dict[int, Tensor] = {}

    def __call__(self, rows: list[int], reconstructions: Tensor) -> dict[str, Tensor]:
        for row, image in zip(rows, reconstructions.float().cpu()):
            self.images[row] = image
        return {}

    def load(self, rows: list[int]) -> bool:
        """Whether the file holds this sampler's solution of exactly these rows (then it is read in)."""
        if not os.path.exists(self.path):
            return False
        saved = torch.load(self.path, map_location="cpu", weights_only=True)
        if saved["sampler"] != json.dumps(self.sampler, sort_keys=True) or saved["rows"].tolist() != rows:
            return False
        self.images = dict(zip(rows, saved["images"]))
        return True

    def save(self) -> None:
        rows = sorted(self.images)
        images = torch.stack([self.images[r] for r in rows]) if rows else torch.zeros(0)
        saved = {"sampler": json.dumps(self.sampler, sort_keys=True), "rows": torch.tensor(rows), "images": images}
        atomic_write(self.path, lambda f: torch.save(saved, f))


class ReferenceDistance:
    """ref_rmse of each image: sqrt(mean((x - x_ref)^2)) over its pixels, in [-1, 1] units (float64 [B])."""

    names: Sequence[str] = ("ref_rmse",)

    def __init__(self, reference: Reference):
        self.reference = reference

    def __call__(self, rows: list[int], reconstructions: Tensor) -> dict[str, Tensor]:
        ref = torch.stack([self.reference.images[r] for r in rows]).double()
        diff = reconstructions.double().cpu() - ref
        return {"ref_rmse": diff.pow(2).flatten(1).mean(dim=1).sqrt()}


# ---- the run ----------------------------------------------------------------------------------------------


@dataclass
class Curve:
    """One run's state: the model and what measures it, the points done, the reference."""

    settings: CurveSettings
    procs: Processes
    model: object
    base: SamplingOptions  # the checkpoint's sampler with the user's flags; each point sets solver and steps
    dataset: object
    measure: object
    records: dict[Point, PointRecord]
    reference: Reference
    identity: dict  # settings.json

    def options(self, point: Point) -> SamplingOptions:
        return self.base.replace(solver=point.solver, steps=point.steps)

    def say(self, line: str) -> None:
        if self.procs.is_main:
            print(line, flush=True)

    def measure_point(self, point: Point, also: Optional[rfid.PerImage]) -> Optional[PointRecord]:
        """One point, measured by every process; its record on the main process (None elsewhere)."""
        options = self.options(point)
        evaluation = dataclasses.replace(self.settings.evaluation, seed=point.seed)
        start = time.perf_counter()
        desc = f"{point.solver} {point.steps} steps, seed {point.seed}"
        measured = rfid.measure_model(self.model, options, self.dataset, self.measure, evaluation, self.procs,
                                      desc=desc, also=also)
        if measured is None:
            return None
        return PointRecord(point.solver, point.steps, point.seed, decoder_passes(options), measured.metrics,
                           measured.num_images, time.perf_counter() - start)


def open_curve(s: CurveSettings, procs: Processes, log) -> Curve:
    """Weights, model, images, settings.json checked (or written), the points done so far."""
    paths = available_weights(s.evaluation.weights, s.rfid, log)
    measure = rfid.build_metrics(paths, procs.device)
    model = load_checkpoint(s.ckpt, which=s.evaluation.which, device=procs.device)
    base = s.evaluation.sampling.over(model.sampling())
    dataset = s.evaluation.source.open(model.config.data.image_size)
    names = [*measure.names, *(["rfid"] if "inception" in paths else [])]
    identity = on_rank0(lambda: curve_identity(s, model, base, dataset, names), procs)  # one hash of the file
    os.makedirs(s.out, exist_ok=True)
    check_or_record_settings(os.path.join(s.out, "settings.json"), identity, "a curve of other settings",
                             write=procs.is_main)
    records = read_records(os.path.join(s.out, "curve.jsonl"), log)
    ref_path = os.path.join(s.out, f"reference-rank{procs.rank}-of-{procs.world_size}.pt")
    reference = Reference(ref_path, {**identity["sampler"], "reference": identity["reference"]})
    return Curve(s, procs, model, base, dataset, measure, records, reference, identity)


def ensure_reference(curve: Curve) -> None:
    """The reference solution of this process's rows: from its file, else sampled (and its point recorded)."""
    s = curve.settings
    rows = [r for batch in rfid.batches_of_rank(len(curve.dataset), s.evaluation, curve.procs) for r in batch]
    if curve.reference.load(rows):
        return
    point = Point(*s.sweep.reference, s.evaluation.seed)
    curve.say(f"reference: {s.sweep.reference} ({decoder_passes(curve.options(point))} passes per image)")
    record = curve.measure_point(point, curve.reference)
    curve.reference.save()
    if record is not None and point not in curve.records:
        append_line(os.path.join(s.out, "curve.jsonl"), record.to_json())
        curve.records[point] = record


def run(s: CurveSettings, procs: Processes) -> Optional[dict[Point, PointRecord]]:
    """Every point not measured yet, then the table and the plot; the records on the main process."""
    curve = open_curve(s, procs, curve_log(procs))
    ensure_reference(curve)
    todo = [p for p in points(s) if p not in curve.records]
    cost = {p: decoder_passes(curve.options(p)) for p in todo}  # passes: what a point's time goes with
    curve.say(f"eval.decode_curve: {s.ckpt}, {curve.dataset.describe()}; {len(points(s)) - len(todo)} point(s) "
              f"in {s.out} already, {len(todo)} to measure ({sum(cost.values())} passes per image)")
    start, done_cost = time.perf_counter(), 0
    for i, point in enumerate(todo, 1):
        also = ReferenceDistance(curve.reference) if point.seed == s.evaluation.seed else None
        record = curve.measure_point(point, also)
        done_cost += cost[point]
        if record is not None:
            append_line(os.path.join(s.out, "curve.jsonl"), record.to_json())
            curve.records[Point(record.solver, record.steps, record.seed)] = record
            left = (time.perf_counter() - start) / done_cost * (sum(cost.values()) - done_cost)
            curve.say(f"[{i}/{len(todo)}] {point.solver} {point.steps} steps, seed {point.seed}, {record.passes} "
                      f"passes: {rfid.metrics_line(record.metrics)} | {record.seconds:.1f}s; about {left:.0f}s left")
    if procs.is_main:
        report(curve)
        return curve.records
    return None


def report(curve: Curve) -> None:
    """curve.md, curve.png and the verdict lines."""
    s, records = curve.settings, list(curve.records.values())
    sweep, seed = s.sweep, s.evaluation.seed
    noise = noise_of(records, sweep.baseline, seed, sweep.noise_seeds)
    found = verdicts(records, sweep.solvers, sweep.steps, sweep.baseline, seed, noise)
    header = [f"checkpoint `{s.ckpt}` ({s.evaluation.which}); {curve.dataset.describe()}",
              f"sampler: {curve.identity['sampler']} with each point's solver and steps",
              f"reference: {sweep.reference}; baseline {sweep.baseline}, its noise over {sweep.noise_seeds} seeds"]
    write_table(os.path.join(s.out, "curve.md"), header, records, sweep, seed, noise, found)
    write_plot(os.path.join(s.out, "curve.png"), records, sweep, seed, noise)
    for line in found.values():
        curve.say(line.sentence)
    curve.say(f"-> {os.path.join(s.out, 'curve.md')}, {os.path.join(s.out, 'curve.png')}")


def curve_log(procs: Processes):
    return (lambda line: print(line, flush=True)) if procs.is_main else (lambda line: None)


# ---- the command ------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eval.decode_curve",
        description="Reconstruction quality against decoder passes, per ODE solver and step count (also under "
        "torchrun): table, plot and verdict; resumable.",
    )
    p.add_argument("--ckpt", required=True, help="FlowMo checkpoint file, or flowmo_lo / flowmo_hi by name")
    rfid.add_evaluation_flags(p)
    p.add_argument("--no-rfid", action="store_true", help="skip rFID (no Inception weights needed)")
    c = p.add_argument_group("the curve (it sweeps the sampler's --steps and --solver: give these instead)")
    c.add_argument("--solvers", type=flags.comma_list(flags.checked(parse_solver)), default=SOLVERS,
                   help=f"comma-separated (default {','.join(SOLVERS)})")
    c.add_argument("--step-counts", type=flags.comma_list(flags.positive_int), default=DEFAULT_STEPS,
                   help=f"comma-separated step counts (default {','.join(map(str, DEFAULT_STEPS))})")
    c.add_argument("--baseline", type=flags.checked(solver_steps), default=Sweep.baseline,
                   help="SOLVER:STEPS the points are judged against (default euler:25, upstream's)")
    c.add_argument("--reference", type=flags.checked(solver_steps), default=Sweep.reference,
                   help="SOLVER:STEPS of the many-step solution ref_rmse is measured to (default heun:200)")
    c.add_argument("--noise-seeds", type=flags.positive_int, default=Sweep.noise_seeds,
                   help="noise seeds the baseline runs with, for the metrics' noise (default 3; at least 2)")
    p.add_argument("--out", metavar="DIR", help="default: eval_results/<checkpoint name>_curve")
    flags.add_device_flag(p)
    args = p.parse_args(argv)
    flags.check_data_flags(p, args)
    if args.steps is not None or args.solver is not None or args.sampler is not None:
        p.error("--steps, --solver and --sampler set what the curve sweeps: give --step-counts and --solvers")
    if args.noise_seeds < 2:
        p.error("--noise-seeds must be at least 2: the metrics' noise is their spread over the baseline's seeds")
    args.out = args.out or os.path.join("eval_results", os.path.splitext(os.path.basename(args.ckpt))[0] + "_curve")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    args = parse_args(argv)
    with flags.one_line_errors("eval.decode_curve", also=(weights.WeightsUnavailable,)):
        settings = CurveSettings(
            ckpt=resolve_checkpoint(args.ckpt), out=args.out, evaluation=rfid.evaluation_settings(args),
            sweep=Sweep(args.solvers, args.step_counts, args.baseline, args.reference, args.noise_seeds),
            rfid=not args.no_rfid, device=args.device,
        )
        with processes(settings.device) as procs:
            return run(settings, procs)


if __name__ == "__main__":
    main()
