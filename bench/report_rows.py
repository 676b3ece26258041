"""The report's records and their output: a timed row, a check, the markdown table (ratios against the plain
and the fastest upstream row of the same workload and model) and the live output that writes each the moment
it is done."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from flowmo_fast.flowmo import flops


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
    measured. The markdown is the report's header, then the checks and the timings as they come, each run of
    checks or rows under its table's head, notes between them (a row's ratios compare it with the rows done before
    it)."""

    folder: Optional[Path]
    peak: Optional[float]
    table: str = ""  # the table the last line went to: "checks", "rows" or "" (a note, the header)

    def start(self, header: str) -> None:
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            for name in ("live.md", "live.jsonl"):
                (self.folder / name).write_text("")
        self._emit([header], None)

    def check(self, c: Check) -> None:
        head = [] if self.table == "checks" else ["", "## Checks: fast path against plain path (as they ran)", "",
                                                   *CHECKS_HEAD]
        self.table = "checks"
        self._emit([*head, markdown_check(c)], {"check": asdict(c)})

    def note(self, text: str) -> None:
        """A finding that is neither a check nor a timed row (versions, `nvidia-smi`), as markdown."""
        self.table = ""
        self._emit(["", text], {"note": text})

    def row(self, r: Row, done: list[Row]) -> None:
        head = [] if self.table == "rows" else ["", "## Timings (as measured)", "", *TABLE_HEAD]
        self.table = "rows"
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
