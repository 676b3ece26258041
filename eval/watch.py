"""`python -m eval.watch RUN_DIR`: evaluate every checkpoint of a training run, as training writes them.

Evaluates each checkpoint in RUN_DIR/checkpoints once, in step order, then waits for new ones; stops after
`--until-step N`, after `--idle-minutes M` without a new checkpoint, after `--patience K` evaluations without a
better `--select` metric, or at once with `--once`. Every checkpoint is measured as eval.rfid measures one (the
same code, eval.rfid.measure_model), on the same images with the same per-image noise, so the curve compares
like with like. The metric networks are built once per watch.

Writes RUN_DIR/eval/history.jsonl, best.json, curves.png (eval/history.py) and, with --keep-best, best.pth;
TensorBoard scalars eval/<metric> go into RUN_DIR itself, beside training's. A restarted watch skips the steps
in history.jsonl. Also runs as `torchrun --nproc-per-node=N -m eval.watch RUN_DIR`: all processes share each
evaluation; the main process decides what comes next and writes the results.
"""

from __future__ import annotations

import argparse
import enum
import functools
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Union

from eval import rfid, weights
from eval.history import (
    FAILED,
    OK,
    Evaluation,
    History,
    Standing,
    keep_checkpoint,
    kept_before,
    plot_curves,
    standing,
    write_best,
)
from eval.rfid import EvaluationSettings
from flowmo_fast import flags, load_checkpoint
from flowmo_fast.distributed import Processes, gather_objects, on_rank0, processes
from flowmo_fast.flowmo.model import FlowMo
from flowmo_fast.formats.checkpoint import CheckpointError, file_sha256, list_checkpoints, step_of

EVAL_DIR = "eval"  # RUN_DIR/eval
INTERRUPTED = 130  # exit status after Ctrl-C, as a shell reports SIGINT


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eval.watch",
        description="Evaluate every checkpoint of a training run as it appears; curves, best checkpoint, early "
        "stopping (also under torchrun).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run's folder (results/<experiment>): checkpoints/ is "
                   "read, eval/ written")
    rfid.add_evaluation_flags(p)
    w = p.add_argument_group("when to stop, which checkpoint is best")
    w.add_argument("--once", action="store_true", help="evaluate the checkpoints there now, then exit")
    w.add_argument("--until-step", type=flags.positive_int, metavar="N",
                   help="stop once a checkpoint of step N or later is evaluated")
    w.add_argument("--idle-minutes", type=flags.positive_float, metavar="M",
                   help="stop after M minutes without a new checkpoint")
    w.add_argument("--poll-seconds", type=flags.positive_float, default=30.0, metavar="S",
                   help="how often to look for new checkpoints (default 30)")
    w.add_argument("--select", choices=tuple(rfid.METRICS), default="rfid",
                   help="the metric that picks the best checkpoint (rfid, lpips: lower is better; psnr, ssim: higher)")
    w.add_argument("--patience", type=flags.positive_int, metavar="K",
                   help="early stopping: stop after K evaluations without a better --select")
    w.add_argument("--keep-best", action="store_true",
                   help="hard-link (or copy) the best checkpoint to RUN_DIR/eval/best.pth, out of retention's reach")
    flags.add_device_flag(p)
    args = p.parse_args(argv)
    flags.check_data_flags(p, args)
    if args.no_lpips and args.select.startswith("lpips_"):
        p.error(f"--select {args.select} needs LPIPS: drop --no-lpips or select another metric")
    if args.select == "rfid" and args.max_images == 1:
        p.error("--select rfid needs at least 2 images (--max-images 2 or more), or select another metric")
    if not os.path.isdir(args.run_dir):
        p.error(f"RUN_DIR {args.run_dir!r} is not a folder: give a training run's folder, e.g. results/<experiment>")
    return args


class Next(enum.Enum):
    EVALUATE = "evaluate"
    WAIT = "wait"
    STOP = "stop"


@dataclass(frozen=True)
class WatchSettings:
    """One eval.watch run: what to evaluate (`evaluation`, as eval.rfid), when to stop, what is best."""

    run_dir: str  # the run's folder: checkpoints/ read, eval/ written
    evaluation: EvaluationSettings = EvaluationSettings()
    once: bool = False  # evaluate the checkpoints there now, then stop
    until_step: Optional[int] = None  # stop once a checkpoint of this step or later is evaluated
    idle_minutes: Optional[float] = None  # stop after this long without a new checkpoint
    poll_seconds: float = 30.0
    select: str = "rfid"  # the metric that picks the best checkpoint
    patience: Optional[int] = None  # stop after this many evaluations without a better `select`
    keep_best: bool = False  # the best checkpoint hard-linked (or copied) to eval/best.pth
    device: str = "auto"


def settings_from(args: argparse.Namespace) -> WatchSettings:
    return WatchSettings(
        run_dir=args.run_dir, evaluation=rfid.evaluation_settings(args), once=args.once, until_step=args.until_step,
        idle_minutes=args.idle_minutes, poll_seconds=args.poll_seconds, select=args.select, patience=args.patience,
        keep_best=args.keep_best, device=args.device,
    )


@dataclass(frozen=True)
class Action:
    """What all processes do next, as the main process decided."""

    kind: Next
    step: int = -1
    path: str = ""
    reason: str = ""  # why the watch stops


def on_main(fn, procs: Processes):
    """fn() on the main process only: its value there (None elsewhere); its error raised on every process."""
    box = []
    on_rank0(lambda: box.append(fn()), procs)
    return box[0] if box else None


class Watcher:
    """The main process's side of a watch: the history, what to evaluate next, when to stop, the outputs."""

    def __init__(self, settings: WatchSettings):
        self.settings = settings
        self.folder = os.path.join(settings.run_dir, EVAL_DIR)
        os.makedirs(self.folder, exist_ok=True)
        self.history = History(os.path.join(self.folder, "history.jsonl"), self.say)
        self.evaluated: list[int] = []  # steps this watch evaluated, in order
        self.seconds: list[float] = []
        self.seen: set[int] = set()  # steps listed so far
        self.awaiting: set[int] = set()  # listed, not yet evaluated
        self.skipped: set[int] = set()  # deleted before their turn
        self.paths: dict[int, str] = {}  # step -> checkpoint file, as last listed
        self.last_new = time.monotonic()
        self.waiting = False
        self.board = None  # TensorBoard writer, opened with the first result
        self.kept = kept_before(os.path.join(self.folder, "best.json"))  # what best.pth holds: {path, step}
        self.say(f"{settings.run_dir}: {len(self.history.records)} evaluation(s) in {self.history.path}; selecting "
                 f"by {settings.select}; sampler flags {self.sampler_flags()}, seed {settings.evaluation.seed}")
        best = standing(self.history.records, settings.select).best
        if settings.keep_best and best is not None and (self.kept or {}).get("step") != best.step:
            self.keep(best)  # a restarted watch keeps the best so far if no earlier watch did

    def say(self, line: str) -> None:
        print(f"eval.watch: {line}", flush=True)

    def sampler_flags(self) -> str:
        return str(self.settings.evaluation.sampling.given() or "the checkpoint's eval.sampling")

    def next_action(self) -> Action:
        listed = {step_of(p): p for p in list_checkpoints(self.settings.run_dir)}
        self.paths.update(listed)
        if set(listed) - self.seen:
            self.seen |= set(listed)
            self.last_new = time.monotonic()
        for step in sorted(self.awaiting - set(listed)):
            self.report_deleted(step)
        done = self.history.steps() | self.skipped
        pending = [s for s in sorted(listed) if s not in done]
        self.awaiting = set(pending)
        reason = self.stop_reason(pending)
        if reason:
            return Action(Next.STOP, reason=reason)
        if pending:
            self.waiting = False
            self.announce(pending)
            return Action(Next.EVALUATE, pending[0], os.path.abspath(listed[pending[0]]))
        if not self.waiting:
            self.waiting = True
            self.say(f"waiting for new checkpoints in {os.path.join(self.settings.run_dir, 'checkpoints')}")
        return Action(Next.WAIT)

    def stop_reason(self, pending: list[int]) -> str:
        w, handled = self.settings, self.history.steps() | self.skipped
        if w.until_step is not None and any(s >= w.until_step for s in handled):
            return f"step {max(handled)} >= --until-step {w.until_step} evaluated"
        now = standing(self.history.records, w.select)
        if w.patience is not None and now.best is not None and now.since_best >= w.patience:
            return f"--patience {w.patience}: {now.since_best} evaluations without a better {w.select}"
        if pending:
            return ""
        if w.once:
            return "--once: every checkpoint there is evaluated"
        idle = time.monotonic() - self.last_new
        if w.idle_minutes is not None and idle >= w.idle_minutes * 60:
            return f"no new checkpoint for {idle / 60:.1f} minutes (--idle-minutes {w.idle_minutes:g})"
        return ""

    def announce(self, pending: list[int]) -> None:
        eta = ""
        if self.seconds:
            each = sum(self.seconds) / len(self.seconds)
            eta = f"; ~{each:.0f}s each, ~{each * len(pending):.0f}s for the {len(pending)} pending"
        self.say(f"step {pending[0]} ({self.paths[pending[0]]}): {len(pending)} checkpoint(s) pending{eta}")

    def report_deleted(self, step: int) -> None:
        if step not in self.skipped:
            self.skipped.add(step)
            self.say(f"step {step}: {self.paths[step]} was deleted before its turn (training's retention); skipped")

    def record(self, action: Action, result: Union[Evaluation, "Deleted"]) -> None:
        """Take one checkpoint's result: append it to the history, update best.json, curves.png, TensorBoard."""
        if isinstance(result, Deleted):
            self.report_deleted(action.step)
            return
        now = standing(self.history.records + [result], self.settings.select)
        if self.settings.keep_best and now.best is result:
            self.keep(result)  # before the history says so: a crash in between re-evaluates and keeps again
        self.history.append(result)
        self.awaiting.discard(result.step)
        self.evaluated.append(result.step)
        self.seconds.append(result.seconds)
        if result.status == FAILED:
            self.say(f"step {result.step} failed, recorded in history.jsonl; going on: {result.error}")
        else:
            self.write_scalars(result)
            self.say(f"step {result.step}: {rfid.metrics_line(result.metrics)} | {result.num_images} images, "
                     f"{result.images_per_second:.2f} img/s, {result.seconds:.1f}s; best: {self.describe(now)}")
        self.write_outputs(now)

    def check_like(self, which: str, sampler: dict, data: dict) -> None:
        """A curve compares like with like: every evaluation in a history on the same images, sampler and seed."""
        earlier = next((r for r in self.history.records if r.status == OK), None)
        if earlier is None:
            return
        before, now = (json.loads(json.dumps({"which": w, "sampler": s, "data": d}))  # as history.jsonl has them
                       for w, s, d in ((earlier.which, earlier.sampler, earlier.data), (which, sampler, data)))
        if before != now:
            raise ValueError(
                f"{self.history.path} holds evaluations of the {earlier.which} weights with sampler {earlier.sampler} "
                f"on {earlier.data}; this watch would use {now['which']}, {now['sampler']} on {now['data']}. Give "
                f"the flags of the earlier evaluations, or move {self.folder} away to start a new curve"
            )

    def describe(self, now: Standing) -> str:
        if now.best is None:
            return "none yet"
        return f"step {now.best.step} ({self.settings.select} {now.best.score(self.settings.select):.4g})"

    def write_outputs(self, now: Standing) -> None:
        if now.best is not None:
            write_best(os.path.join(self.folder, "best.json"), now.best, self.settings.select, self.kept)
        plot_curves(os.path.join(self.folder, "curves.png"), self.history.records, self.settings.select, now.best)

    def keep(self, best: Evaluation) -> None:
        """--keep-best: the best checkpoint at RUN_DIR/eval/best.pth."""
        dest = os.path.join(self.folder, "best.pth")
        try:
            keep_checkpoint(best.checkpoint, dest)
        except FileNotFoundError:
            self.say(f"--keep-best: {best.checkpoint} (step {best.step}) is gone already; not kept")
            return
        self.kept = {"path": os.path.abspath(dest), "step": best.step}

    def write_scalars(self, result: Evaluation) -> None:
        if self.board is None:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(self.settings.run_dir, filename_suffix=".eval")
        for name, value in result.metrics.items():
            if value is not None:
                self.board.add_scalar(f"eval/{name}", value, global_step=result.step)
        self.board.flush()

    def finish(self, reason: str) -> "Finished":
        now = standing(self.history.records, self.settings.select)
        where = f" -> {os.path.join(self.folder, 'best.json')}" if now.best is not None else ""
        self.say(f"stopped: {reason}. Best: {self.describe(now)}{where}")
        return Finished(reason, list(self.evaluated), now.best)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


@dataclass(frozen=True)
class Finished:
    """How a watch ended (main process)."""

    reason: str
    evaluated: list  # steps this watch evaluated (ok or failed), in order
    best: Optional[Evaluation]


@dataclass(frozen=True)
class Deleted:
    """A checkpoint gone before its turn (training's retention)."""

    step: int


class Loaded(NamedTuple):
    """A checkpoint as every process loaded it: the model and (main process) its sha256, or, when it is gone
    or unusable on any process, the same answer everywhere: `deleted`, or the `problem`."""

    model: Optional[FlowMo] = None
    sha256: Optional[str] = None
    deleted: bool = False
    problem: Optional[str] = None


def load_everywhere(path: str, which: str, procs: Processes) -> Loaded:
    """Every process loads the checkpoint; all agree on whether it could."""
    loaded = Loaded()
    try:
        sha = file_sha256(path) if procs.is_main else None
        loaded = Loaded(load_checkpoint(path, which=which, device=procs.device), sha)
    except FileNotFoundError:
        loaded = Loaded(deleted=True)
    except (CheckpointError, ValueError) as e:
        loaded = Loaded(problem=str(e))
    failures = [(deleted, problem) for deleted, problem in gather_objects((loaded.deleted, loaded.problem), procs)
                if deleted or problem is not None]
    if not failures:
        return loaded
    if any(deleted for deleted, _ in failures):
        return Loaded(deleted=True)
    return Loaded(problem=failures[0][1])


def evaluate_checkpoint(
    action: Action, s: EvaluationSettings, procs: Processes, measure, datasets, check_like
) -> Union[Evaluation, Deleted, None]:
    """One checkpoint, on every process: the main process gets its Evaluation (or Deleted), the others None.
    `check_like(which, sampler, data)`, on every process, refuses settings unlike the history's."""
    start = time.perf_counter()
    loaded = load_everywhere(action.path, s.which, procs)
    if loaded.deleted:
        return Deleted(action.step)
    if loaded.problem is not None:
        return Evaluation(action.step, action.path, FAILED, which=s.which, error=loaded.problem)
    model, sha = loaded.model, loaded.sha256
    sampling = s.sampling.over(model.sampling())
    size = model.config.data.image_size
    sampler, data = rfid.sampler_record(sampling, s.seed), rfid.data_record(datasets(size), s, size)
    check_like(s.which, sampler, data)
    measured = rfid.measure_model(model, sampling, datasets(size), measure, s, procs, desc=f"step {action.step}")
    if measured is None:
        return None
    return Evaluation(
        action.step, action.path, OK, sha, measured.metrics, num_images=measured.num_images,
        seconds=time.perf_counter() - start, images_per_second=measured.images_per_second,
        sampler=sampler, data=data, which=s.which,
    )


def watch(settings: WatchSettings, procs: Processes) -> Optional[Finished]:
    """The whole watch; returns how it ended on the main process (None elsewhere)."""
    s = settings.evaluation
    measure = rfid.build_metrics(rfid.locate_weights(s.weights), procs.device)  # once, and before any waiting
    datasets = functools.lru_cache(maxsize=None)(s.source.open)
    watcher: Optional[Watcher] = on_main(lambda: Watcher(settings), procs)

    def check_like(which: str, sampler: dict, data: dict) -> None:
        on_main(lambda: watcher.check_like(which, sampler, data), procs)
    try:
        while True:
            action = on_rank0(lambda: watcher.next_action(), procs)
            if action.kind == Next.STOP:
                return on_main(lambda: watcher.finish(action.reason), procs)
            if action.kind == Next.WAIT:
                time.sleep(settings.poll_seconds)
                continue
            result = evaluate_checkpoint(action, s, procs, measure, datasets, check_like)
            on_main(lambda: watcher.record(action, result), procs)
    finally:
        if watcher is not None:
            watcher.close()


def main(argv: Optional[Sequence[str]] = None) -> Optional[Finished]:
    settings = settings_from(parse_args(argv))
    with flags.one_line_errors("eval.watch", also=(weights.WeightsUnavailable,)):
        with processes(settings.device) as procs:
            try:
                return watch(settings, procs)
            except KeyboardInterrupt:
                if procs.is_main:
                    print(f"\neval.watch: interrupted; {os.path.join(settings.run_dir, EVAL_DIR, 'history.jsonl')} holds "
                          "every evaluation finished so far: run the same command again to go on", file=sys.stderr)
                raise SystemExit(INTERRUPTED) from None


if __name__ == "__main__":
    main()
