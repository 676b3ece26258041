"""What eval.watch keeps of a run's evaluations, in RUN_DIR/eval/: history.jsonl (one line per checkpoint),
best.json (the best checkpoint by the selection metric), curves.png (each metric against step, best marked) and
best.pth (the best checkpoint, kept from training's retention).

history.jsonl is only ever appended to, one whole line per write, so an interrupted watch leaves complete lines
(a torn last line, from a crash mid-write, is cut off when the history is next opened); eval.decode_curve's
curve.jsonl is written and read with the same two functions (`append_line`, `complete_lines`). Which checkpoint is best,
and for how long it has been, is computed from the history alone: a restarted watch picks up where it was.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Iterable, Literal, Optional

from eval.rfid import METRICS
from flowmo_fast.formats.checkpoint import atomic_write
from flowmo_fast.sampler_settings import EULER

Status = Literal["ok", "failed"]  # as history.jsonl writes it
OK: Status = "ok"
FAILED: Status = "failed"


@dataclass
class Evaluation:
    """One checkpoint's evaluation (status ok) or why it could not be evaluated (status failed)."""

    step: int
    checkpoint: str  # the file evaluated
    status: Status = OK
    sha256: Optional[str] = None
    metrics: dict[str, Optional[float]] = field(default_factory=dict)  # name -> value (None: not defined)
    num_images: int = 0
    seconds: float = 0.0  # loading, reconstructing and measuring this checkpoint
    images_per_second: Optional[float] = None
    sampler: dict = field(default_factory=dict)  # SamplingOptions and seed
    data: dict = field(default_factory=dict)  # the data set and which of its images
    which: str = "ema"
    error: Optional[str] = None

    def score(self, select: str) -> Optional[float]:
        """The value of metric `select`, or None when this evaluation has none (failed, or not defined)."""
        return self.metrics.get(select) if self.status == OK else None

    @classmethod
    def from_json(cls, line: str) -> "Evaluation":
        d = json.loads(line)
        if d.get("sampler") and "solver" not in d["sampler"]:  # written before solvers were a setting: Euler's
            d["sampler"] = {**d["sampler"], "solver": EULER}
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


class History:
    """RUN_DIR/eval/history.jsonl: the evaluations so far, in the order they were made."""

    def __init__(self, path: str, log=print):
        self.path = path
        self.records: list[Evaluation] = self._read(log)

    def _read(self, log) -> list[Evaluation]:
        records = []
        for number, line in enumerate(complete_lines(self.path, log), 1):
            try:
                records.append(Evaluation.from_json(line))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{self.path} line {number} is not an evaluation record ({e}); "
                                 "repair or delete that line, then start the watch again") from None
        return records

    def steps(self) -> set[int]:
        return {r.step for r in self.records}

    def append(self, record: Evaluation) -> None:
        """Add one line, written whole (one write), flushed to disk before returning."""
        if record.step in self.steps():
            raise ValueError(f"step {record.step} is in {self.path} already: a step is evaluated once")
        append_line(self.path, record.to_json())
        self.records.append(record)


def complete_lines(path: str, log=print) -> list[str]:
    """The lines of an append-only JSONL file (none if it is missing); a last line torn by a crash mid-write is
    cut off the file, said in one `log` line."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) < len(data):  # a line torn by a crash mid-write: never finished, as far as we know
        log(f"note: {path} ends in an incomplete line ({len(data) - len(complete)} bytes); cut off")
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    return complete.decode().splitlines()


def append_line(path: str, text: str) -> None:
    """`text` and a newline at the end of `path`, written whole (one write), flushed to disk before returning."""
    line = (text + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        written = 0
        while written < len(line):
            written += os.write(fd, line[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def check_or_record_settings(path: str, settings: dict, what: str, write: bool = True) -> None:
    """Refuse an output folder whose `path` records other settings (`what` it then holds, e.g. "a curve of other
    settings"), naming the keys that differ; `write` (the main process): record these when there is none yet."""
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        if before != settings:
            changed = sorted(k for k in settings if before.get(k) != settings[k])
            raise ValueError(
                f"{path} holds {what} ({', '.join(changed)}: {[before.get(k) for k in changed]} then, "
                f"{[settings[k] for k in changed]} now); give the earlier flags, or another --out"
            )
        return
    if write:
        body = json.dumps(settings, indent=2).encode()
        atomic_write(path, lambda f: f.write(body))


@dataclass(frozen=True)
class Standing:
    """The best evaluation by the selection metric, and how many scored evaluations came after it."""

    best: Optional[Evaluation]
    since_best: int


def standing(records: Iterable[Evaluation], select: str) -> Standing:
    """Best = first in history order with the best value of `select` (its direction from eval.rfid.METRICS)."""
    higher = METRICS[select].higher_is_better
    best, since = None, 0
    for record in records:
        value = record.score(select)
        if value is None:
            continue
        if best is None or (value > best.score(select) if higher else value < best.score(select)):
            best, since = record, 0
        else:
            since += 1
    return Standing(best, since)


def best_record(best: Evaluation, select: str, kept: Optional[dict]) -> dict:
    """best.json: the step, its checkpoint, the selection metric and its value; `kept`: {path, step} of
    best.pth (--keep-best), whose step differs from the best's only when the best was gone before it was kept."""
    return {
        "step": best.step,
        "checkpoint": best.checkpoint,
        "sha256": best.sha256,
        "select": select,
        "value": best.score(select),
        "higher_is_better": METRICS[select].higher_is_better,
        "metrics": best.metrics,
        "kept": kept,
    }


def write_best(path: str, best: Evaluation, select: str, kept: Optional[dict]) -> None:
    body = json.dumps(best_record(best, select, kept), indent=2).encode()
    atomic_write(path, lambda f: f.write(body))


def kept_before(best_json: str) -> Optional[dict]:
    """{path, step} of the best.pth an earlier watch kept, if best.json says so and the file is there."""
    try:
        with open(best_json) as f:
            kept = json.load(f).get("kept")
    except (FileNotFoundError, ValueError, AttributeError):
        return None
    return kept if isinstance(kept, dict) and os.path.exists(kept.get("path", "")) else None


def keep_checkpoint(source: str, dest: str) -> None:
    """`source` at `dest`: a hard link (no copy, and it outlives the deletion of `source`), else a copy;
    replaced atomically."""
    tmp = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.tmp")
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(source, tmp)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        shutil.copyfile(source, tmp)  # another file system, or one without hard links
    os.replace(tmp, dest)


def metric_names(records: Iterable[Evaluation]) -> list[str]:
    """Every metric any evaluation has, in order of first appearance."""
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record.metrics))
    return list(names)


def plot_curves(path: str, records: list[Evaluation], select: str, best: Optional[Evaluation]) -> None:
    """curves.png: one panel per metric, value against step; the best checkpoint's step marked in each."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    evaluated = sorted((r for r in records if r.status == OK), key=lambda r: r.step)
    names = metric_names(evaluated)
    if not names:
        return
    figure = Figure(figsize=(3.6 * len(names), 3.2), layout="constrained")
    for axes, name in zip(figure.subplots(1, len(names), squeeze=False)[0], names):
        points = [(r.step, r.metrics[name]) for r in evaluated if r.metrics.get(name) is not None]
        axes.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3)
        info = METRICS.get(name)
        axes.set_title(name + (f" ({'higher' if info.higher_is_better else 'lower'} is better)" if info else ""))
        axes.set_xlabel("step")
        if best is not None:
            axes.axvline(best.step, color="tab:red", linestyle="--", linewidth=1)
            if best.metrics.get(name) is not None:
                axes.plot([best.step], [best.metrics[name]], "*", color="tab:red", markersize=12,
                          label=f"best by {select}: step {best.step}")
                axes.legend(fontsize="small")
    png = io.BytesIO()
    FigureCanvasAgg(figure).print_png(png)
    atomic_write(path, lambda f: f.write(png.getvalue()))
