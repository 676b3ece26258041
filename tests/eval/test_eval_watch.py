"""The eval.watch command: every checkpoint of a run once, in step order; resuming; a watch beside a run that is
still writing checkpoints; deleted, corrupt and half-written checkpoints; early stopping; Ctrl-C; its numbers
against eval.rfid's; and 2 processes against 1.

Runs use the tiny checkpoint (weights nudged per step, so every step measures differently), the random-weight
FID Inception, no LPIPS, 2 images and 2 sampler steps. Checkpoints at further steps are written by the test
itself, atomically as training writes them, instead of by a training run."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import flowmo_fast
from eval import rfid, watch
from eval.history import Evaluation, History
from flowmo_fast.formats.checkpoint import checkpoint_path, list_checkpoints, step_of

REPO = Path(__file__).resolve().parents[2]
FIRST_STEPS = [2, 4, 6]


def write_checkpoint(run_dir, step: int, source) -> Path:
    """The tiny checkpoint's weights nudged by a draw seeded by `step`, saved as training saves step `step`."""
    model = flowmo_fast.load_checkpoint(source, which="model")
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    path = Path(checkpoint_path(str(run_dir), step))
    flowmo_fast.save_checkpoint(path, model, total_steps=step)
    return path


def watch_args(run_dir, inception_weights, *extra) -> list[str]:
    return [
        str(run_dir), "--no-lpips", "--steps", "2", "--max-images", "2", "--batch-size", "1", "--workers", "0",
        "--device", "cpu", "--inception-weights", str(inception_weights), "--poll-seconds", "0.2", *extra,
    ]  # fmt: skip


def one_thread(fn):
    """fn() on one thread, as each command subprocess (OMP_NUM_THREADS=1): the same arithmetic, bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def run_watch(argv: list[str]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        finished = one_thread(lambda: watch.main(argv))
    return finished, out.getvalue()


def history_of(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "eval" / "history.jsonl").read_text().splitlines()]


def copy_run(source, dest) -> Path:
    """The run's checkpoints (hard links) and its history.jsonl, in a fresh folder."""
    (dest / "checkpoints").mkdir(parents=True)
    for path in list_checkpoints(str(source)):
        os.link(path, dest / "checkpoints" / os.path.basename(path))
    if (source / "eval" / "history.jsonl").exists():
        (dest / "eval").mkdir()
        shutil.copy(source / "eval" / "history.jsonl", dest / "eval" / "history.jsonl")
    return dest


@pytest.fixture(scope="session")
def run_checkpoints(tiny_checkpoint, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    for step in FIRST_STEPS:
        write_checkpoint(run, step, tiny_checkpoint)
    return run


@pytest.fixture(scope="session")
def watched_run(run_checkpoints, inception_weights, tmp_path_factory):
    """`--once --keep-best` on a run with checkpoints 2, 4, 6: (how it finished, the run folder, its stdout)."""
    run = copy_run(run_checkpoints, tmp_path_factory.mktemp("watched") / "run")
    finished, stdout = run_watch(watch_args(run, inception_weights, "--once", "--keep-best"))
    return finished, run, stdout


def default_sigint() -> None:
    """Ctrl-C as a terminal delivers it: a shell starts background jobs (`cmd &`, as CI may run the suite) with
    SIGINT ignored, and a child that inherits that never sees the test's SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Command:
    """`python -m eval.watch ...` in a subprocess (or under torchrun with nproc), its output read as it comes."""

    def __init__(self, argv: list[str], nproc: int = 0):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        launcher = torchrun if nproc else [sys.executable]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [*launcher, "-m", "eval.watch", *argv], cwd=REPO, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=default_sigint,
        )
        self.lines: list[str] = []
        self.queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.queue.put(line)

    def wait_for(self, text: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert time.monotonic() < deadline and self.proc.poll() is None or not self.queue.empty(), (
                f"no line with {text!r}; output so far:\n{self.output()[-4000:]}"
            )
            with contextlib.suppress(queue.Empty):
                self.lines.append(self.queue.get(timeout=0.1))

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        time.sleep(0.2)  # the reader thread takes the last lines
        return code, self.output()

    def output(self) -> str:
        while not self.queue.empty():
            self.lines.append(self.queue.get())
        return "".join(self.lines)


def wait_for_step(run_dir, step: int, command: Command, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    path = Path(run_dir) / "eval" / "history.jsonl"
    while not (path.exists() and step in {r["step"] for r in history_of(run_dir)}):
        assert time.monotonic() < deadline and command.proc.poll() is None, command.output()[-4000:]
        time.sleep(0.1)


# ---- one pass, resuming, and what is written -------------------------------------------------------------


def test_once_evaluates_every_checkpoint_once_in_step_order(watched_run):
    finished, run, stdout = watched_run
    assert finished.evaluated == FIRST_STEPS and "--once" in finished.reason
    history = history_of(run)
    assert [r["step"] for r in history] == FIRST_STEPS and all(r["status"] == "ok" for r in history)
    for record in history:
        ckpt = Path(checkpoint_path(str(run), record["step"]))
        assert record["checkpoint"] == str(ckpt) and record["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
        assert record["num_images"] == 2 and record["seconds"] > 0 and record["images_per_second"] > 0
        sampler = {"steps": 2, "cfg": 1.5, "schedule": "pow_0.25", "cfg_interval": [0.17, 1.02], "solver": "euler",
                   "seed": 0}
        assert record["sampler"] == sampler  # --steps, the rest from the checkpoint's eval.sampling
        assert set(record["metrics"]) == {"rfid", "psnr", "ssim"} and all(np.isfinite(list(record["metrics"].values())))
    assert len({r["metrics"]["psnr"] for r in history}) == 3  # each step measured its own checkpoint
    for step in FIRST_STEPS:
        assert f"step {step} (" in stdout and f"step {step}: rFID" in stdout


def test_best_json_curves_and_kept_checkpoint(watched_run):
    _, run, _ = watched_run
    history = history_of(run)
    best = min(history, key=lambda r: r["metrics"]["rfid"])
    saved = json.loads((run / "eval" / "best.json").read_text())
    assert (saved["step"], saved["checkpoint"], saved["select"]) == (best["step"], best["checkpoint"], "rfid")
    assert saved["value"] == best["metrics"]["rfid"] and saved["higher_is_better"] is False
    assert saved["kept"] == {"path": str(run / "eval" / "best.pth"), "step": best["step"]}
    assert (run / "eval" / "best.pth").read_bytes() == Path(best["checkpoint"]).read_bytes()
    with Image.open(run / "eval" / "curves.png") as curves:
        assert curves.format == "PNG" and curves.size[0] > 3 * curves.size[1]  # three panels side by side


def test_tensorboard_scalars_sit_in_the_run_folder(watched_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run, _ = watched_run
    events = EventAccumulator(str(run)).Reload()
    assert {"eval/rfid", "eval/psnr", "eval/ssim"} <= set(events.Tags()["scalars"])
    by_step = {r["step"]: r["metrics"]["psnr"] for r in history_of(run)}
    scalars = events.Scalars("eval/psnr")
    assert [s.step for s in scalars] == FIRST_STEPS
    assert [s.value for s in scalars] == pytest.approx([by_step[s] for s in FIRST_STEPS], rel=1e-6)


def test_a_rerun_evaluates_none(watched_run, inception_weights):
    _, run, _ = watched_run
    before = (run / "eval" / "history.jsonl").read_bytes()
    finished, stdout = run_watch(watch_args(run, inception_weights, "--once", "--keep-best"))
    assert finished.evaluated == [] and "3 evaluation(s)" in stdout
    assert (run / "eval" / "history.jsonl").read_bytes() == before


def test_watch_measures_a_checkpoint_as_eval_rfid_does(watched_run, inception_weights, tmp_path):
    _, run, _ = watched_run
    record = history_of(run)[1]
    flags = watch_args(run, inception_weights)[1:-2]  # the shared flags, without RUN_DIR and --poll-seconds
    result = one_thread(lambda: rfid.main(["--ckpt", record["checkpoint"], "--out", str(tmp_path), *flags]))
    assert result["metrics"] == record["metrics"]
    assert json.loads(json.dumps(result["sampler"])) == record["sampler"]


@pytest.mark.parametrize("flag, was, now", [("--seed", "'seed': 0", "'seed': 1"),
                                            ("--solver", "'solver': 'euler'", "'solver': 'ab2'")])
def test_settings_unlike_the_history_are_refused_before_measuring(
    watched_run, tiny_checkpoint, inception_weights, tmp_path, flag, was, now
):
    """A curve compares like with like: a restarted watch with another seed, or another solver, stops at the
    first new checkpoint."""
    run = copy_run(watched_run[1], tmp_path / "run")
    write_checkpoint(run, 8, tiny_checkpoint)
    before = (run / "eval" / "history.jsonl").read_bytes()
    with pytest.raises(SystemExit) as info:
        run_watch(watch_args(run, inception_weights, "--once", flag, "1" if flag == "--seed" else "ab2"))
    message = str(info.value.code)
    assert message.startswith("eval.watch: error:") and was in message and now in message
    assert (run / "eval" / "history.jsonl").read_bytes() == before


def test_a_history_from_before_solvers_goes_on_with_euler(watched_run, tiny_checkpoint, inception_weights, tmp_path):
    """Records without a solver (written before it was a setting) ran Euler: a watch with Euler continues them,
    one with another solver is refused."""
    run = copy_run(watched_run[1], tmp_path / "run")
    old = [{**r, "sampler": {k: v for k, v in r["sampler"].items() if k != "solver"}} for r in history_of(run)]
    (run / "eval" / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    write_checkpoint(run, 8, tiny_checkpoint)
    with pytest.raises(SystemExit, match="'solver': 'heun'"):
        run_watch(watch_args(run, inception_weights, "--once", "--solver", "heun"))
    finished, _ = run_watch(watch_args(run, inception_weights, "--once"))
    assert finished.evaluated == [8] and history_of(run)[-1]["sampler"]["solver"] == "euler"


# ---- a run that goes on ----------------------------------------------------------------------------------


def test_watch_picks_up_new_checkpoints_and_stops_after_until_step(
    watched_run, tiny_checkpoint, inception_weights, tmp_path
):
    """A restarted watch (2, 4, 6 done) waits; training writes 8 (beside a half-written temporary file), then 10
    and 12: it evaluates 8 and 10, then stops."""
    run = copy_run(watched_run[1], tmp_path / "run")
    command = Command(watch_args(run, inception_weights, "--until-step", "10", "--idle-minutes", "2"))
    command.wait_for("waiting for new checkpoints")
    (run / "checkpoints" / ".tmp-x1y2z3.pth").write_bytes(b"PK\x03\x04 half a zip")  # atomic_write's partial file
    write_checkpoint(run, 8, tiny_checkpoint)
    wait_for_step(run, 8, command)
    write_checkpoint(run, 10, tiny_checkpoint)
    write_checkpoint(run, 12, tiny_checkpoint)
    code, output = command.finish()
    assert code == 0, output[-4000:]
    history = history_of(run)
    assert [r["step"] for r in history] == [2, 4, 6, 8, 10] and all(r["status"] == "ok" for r in history)
    assert "stopped: step 10 >= --until-step 10" in output


def test_corrupt_and_deleted_checkpoints_are_reported_and_passed_and_ctrl_c_leaves_the_history_valid(
    watched_run, tiny_checkpoint, inception_weights, tmp_path
):
    """Checkpoint 8 is a truncated file, 12 is deleted while 10 is evaluated: a failed record for the first (and
    the watch goes on), one line for the second. Then Ctrl-C while the watch waits: the history stays valid."""
    run = copy_run(watched_run[1], tmp_path / "run")
    whole = write_checkpoint(run, 10, tiny_checkpoint).read_bytes()
    Path(checkpoint_path(str(run), 8)).write_bytes(whole[: len(whole) // 2])
    write_checkpoint(run, 12, tiny_checkpoint)
    command = Command(watch_args(run, inception_weights))
    command.wait_for("step 10 (")
    os.remove(checkpoint_path(str(run), 12))
    command.wait_for("waiting for new checkpoints")
    history = history_of(run)[3:]
    command.proc.send_signal(signal.SIGINT)
    code, output = command.finish()
    assert [(r["step"], r["status"]) for r in history] == [(8, "failed"), (10, "ok")]
    assert "not a readable PyTorch checkpoint" in history[0]["error"]
    assert "step 8 failed" in output
    assert f"step 12: {checkpoint_path(str(run), 12)} was deleted before its turn" in output
    assert code == watch.INTERRUPTED and "interrupted" in output and "Traceback" not in output
    assert history_of(run)[3:] == history


def test_patience_stops_after_k_evaluations_without_improvement(
    watched_run, run_checkpoints, tiny_checkpoint, inception_weights, tmp_path
):
    """A history that got worse after step 2 (PSNR 99 dB, then 1 dB): with --patience 2 the watch evaluates 6,
    the second without improvement, and stops before 8."""
    run = copy_run(run_checkpoints, tmp_path / "run")
    write_checkpoint(run, 8, tiny_checkpoint)
    (run / "eval").mkdir()
    real = history_of(watched_run[1])[0]  # made-up metrics, the settings the watch below uses
    made_up = [{**real, "step": 2, "metrics": {"rfid": 1.0, "psnr": 99.0, "ssim": 0.9}},
               {**real, "step": 4, "metrics": {"rfid": 9.0, "psnr": 1.0, "ssim": 0.1}}]  # fmt: skip
    (run / "eval" / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in made_up))
    finished, stdout = run_watch(watch_args(run, inception_weights, "--patience", "2", "--select", "psnr", "--once"))
    assert finished.evaluated == [6] and "--patience 2" in finished.reason and finished.best.step == 2
    best = json.loads((run / "eval" / "best.json").read_text())
    assert (best["step"], best["select"], best["value"], best["higher_is_better"]) == (2, "psnr", 99.0, True)
    assert "Best: step 2 (psnr 99)" in stdout


# ---- pieces ----------------------------------------------------------------------------------------------


def test_only_complete_step_files_are_checkpoints(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("00000020.pth", ".tmp-abc123.pth", "notes.pth", "3.pth", "00000010.pth.tmp"):
        (folder / name).write_bytes(b"x")
    assert [step_of(p) for p in list_checkpoints(str(tmp_path))] == [3, 20]
    assert list_checkpoints(str(tmp_path / "missing")) == []


def test_history_cuts_a_torn_last_line_and_never_writes_a_step_twice(tmp_path):
    path = tmp_path / "history.jsonl"
    whole = Evaluation(2, "c2", metrics={"psnr": 7.0}).to_json() + "\n"
    path.write_text(whole + Evaluation(4, "c4").to_json()[:30])  # a crash in the middle of the second line
    notes = []
    history = History(str(path), notes.append)
    assert [r.step for r in history.records] == [2] and path.read_text() == whole and "incomplete line" in notes[0]
    history.append(Evaluation(4, "c4", metrics={"psnr": 6.0}))
    with pytest.raises(ValueError, match="step 4 is in .* already"):
        history.append(Evaluation(4, "c4"))
    assert [r.step for r in History(str(path)).records] == [2, 4]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--select", "lpips_vgg"], "--select lpips_vgg needs LPIPS"),
        (["--max-images", "1"], "--select rfid needs at least 2 images"),
        (["--patience", "0"], "must be a positive integer"),
        (["--idle-minutes", "0"], "must be positive"),
        (["--select", "fid"], "invalid choice"),
    ],
)
def test_bad_flags_are_refused(tmp_path, inception_weights, capsys, extra, message):
    with pytest.raises(SystemExit):
        watch.parse_args(watch_args(tmp_path, inception_weights, *extra))
    assert message in capsys.readouterr().err


def test_a_missing_run_folder_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        watch.parse_args([str(tmp_path / "no-such-run")])
    assert "is not a folder" in capsys.readouterr().err


@pytest.mark.distributed
def test_two_processes_give_the_history_of_one(watched_run, run_checkpoints, inception_weights, tmp_path):
    run = copy_run(run_checkpoints, tmp_path / "run")
    code, output = Command(watch_args(run, inception_weights, "--once"), nproc=2).finish(timeout=600)
    assert code == 0, output[-4000:]
    one = history_of(watched_run[1])
    two = history_of(run)
    assert [r["step"] for r in two] == FIRST_STEPS
    assert [r["metrics"] for r in two] == [r["metrics"] for r in one]
    assert [r["sha256"] for r in two] == [r["sha256"] for r in one]
