"""The GPU report without a GPU: the table's ratios, budget, failures, phases, output as rows finish, the
compile caches, and a dry run end to end that compiles only what its phases need."""

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import flowmo_fast
from bench import gpu_report, report, report_rows
from bench.harness import Budget, Harness, Timing
from bench.report_rows import LiveOutput, Row
from flowmo_fast.sampler_settings import UPSTREAM
from train.memory import largest_micro_batch, memory_model

SCRIPT = Path(gpu_report.__file__)


def test_table_ratios_compare_rows_of_one_workload_and_model():
    flops_per_image = 10**12
    rows = [
        Row("reconstruct", "Lo", "plain", 4, flops_per_image, ms=400.0),
        Row("reconstruct", "Lo", "fast", 4, flops_per_image, ms=100.0, peak_gib=1.5),
        Row("reconstruct", "Lo", "upstream_eager", 4, flops_per_image, ms=500.0),
        Row("reconstruct", "Lo", "upstream_compiled", 4, flops_per_image, ms=300.0),
        Row("reconstruct", "Hi", "fast", 4, flops_per_image, ms=100.0),  # no plain or upstream row for Hi
        Row("reconstruct", "Lo", "upstream_compiled", 4, None, note="skipped: budget"),
    ]
    table = report_rows.markdown_table(rows, peak=80.0).splitlines()
    fast = table[3].split(" | ")
    # 4 images x 1 TFLOP in 0.1 s = 40 TFLOP/s = 50% of 80; 4x the plain row, 3x the faster upstream row
    assert fast[3:12] == ["100.0", "40.0", "40", "50.0%", "1.50", "4.00x", "3.00x", "—", ""]
    assert table[4].split(" | ")[8:10] == ["—", "0.60x"]  # upstream rows: no `vs plain`; vs the faster upstream
    assert table[6].split(" | ")[8:10] == ["—", "—"]
    assert table[7].split(" | ")[3] == "—" and "skipped: budget" in table[7]


def harness(budget_s: float) -> Harness:
    return Harness(Budget(budget_s), torch.device("cpu"), Timing(0.0, 1, 1e-4), LiveOutput(None, None))


def test_rows_the_budget_cannot_fit_are_skipped_not_run():
    r, ran = harness(budget_s=0.0), []
    row = Row("encode", "Lo", "plain", 2, None)
    r.attempt("encode", reserve_s=5.0, fn=lambda: ran.append(1), row=row)
    assert ran == [] and row.note.startswith("skipped:") and row.ms is None


def test_a_failing_row_is_recorded_and_the_report_goes_on():
    r = harness(budget_s=60.0)
    row = Row("encode", "Lo", "fast", 2, None)

    def fail():
        raise ValueError("shapes do not match")

    r.attempt("encode", reserve_s=0.0, fn=fail, row=row)
    assert row.note == "error: ValueError: shapes do not match"
    measured = Row("encode", "Lo", "plain", 2, None)
    r.attempt("encode", reserve_s=0.0, fn=lambda: r.measure(measured, lambda: torch.zeros(1)), row=measured)
    assert measured.ms is not None and measured.note == ""


def graphs_needed(scale: report.Scale) -> int:
    """Distinct graphs a full dry run needs: per compiled block variant one graph for the inner blocks and one
    for the last block of its tower (it keeps one stream), variants being the decoder without gradients at the
    phases' batch and its guided double, at 1 and 2 (latency), with gradients at the train batch; the encoder
    without gradients at the batch and at 1, with gradients at the train batch; and one graph per fused op
    compiled alone in the kernels phase. Both models share every block graph (same widths). (The token generator's
    phase is an invocation of its own.)"""
    config = flowmo_fast.load_config(list(scale.models["FlowMo-Lo (tiny)"][1]), preset="tiny")
    m = config.model
    assert m.enc_depth >= 2 and m.dec_depth >= 2 and len({1, 2, scale.batch, 2 * scale.batch}) == 4
    return 2 * (4 + 1) + 2 * (2 + 1) + 3


def test_dry_run_end_to_end(tmp_path, monkeypatch, capsys):
    """`--dry-run`: every phase runs on tiny CPU models through the same code as on a GPU; the checks pass,
    every row that can run here has a time and no row failed; the JSON holds what the table shows, and the
    live files every row and check, in the order they finished. It compiles no more graphs than its phases
    need (a check at another batch than its phase's, a train row chunked below its check's batch, a warm-up at
    another shape: each compiles graphs used once) and its header says how many; its compile caches sit in
    --cache-dir, not in the output folder (a GPU machine gives back at most 8 files). The train phase starts
    with none of FlowMo-Lo's inference models held (their memory is the train rows'), and every model's train batch
    is chosen before any training model is built (Hi's too: not from what Lo's train rows left free)."""
    monkeypatch.delenv("FLOWMO_REFERENCE", raising=False)
    for variable in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(variable, "elsewhere")  # restored after the test
    held_at_train = []
    train_checks = gpu_report.GpuReport.train_checks

    def spy(self, name):
        held_at_train.append(sorted(key for key in self.models.built if not key[2]))
        return train_checks(self, name)

    monkeypatch.setattr(gpu_report.GpuReport, "train_checks", spy)
    held_when_sized = {}

    def free_memory(self):
        held_when_sized[len(self.train_batches)] = [key for key in self.models.built if key[2]]  # training models
        return 10**15  # bytes: the scale's batch fits (the CPU has no free memory to read)

    monkeypatch.setattr(gpu_report.GpuReport, "free_memory", free_memory)
    torch._dynamo.reset()  # graphs an earlier test compiled would be reused, not counted
    out = tmp_path / "report.json"
    rc = gpu_report.main(["--dry-run", "--target-s", "0", "--max-iters", "1", "--json", str(out),
                          "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    printed = capsys.readouterr().out
    assert rc == 0 and printed.rstrip().splitlines()[-1].startswith("| ")  # the table prints last
    saved = json.loads(out.read_text())
    assert saved["checks"] and all(c["value"] <= c["tolerance"] for c in saved["checks"])
    rows = [Row(**r) for r in saved["rows"]]
    assert not [r for r in rows if r.note.startswith("error") or "compiled while timed" in r.note]
    timed = {(r.workload.split(":")[0], r.model, r.impl) for r in rows if r.ms is not None}
    workloads = ("reconstruct", "reconstruct latency (batch 1)", "decoder forward",
                 "train step (1 micro-batch, no norm logging)", "encode (token ids)")
    for workload in workloads:
        assert {(workload, "FlowMo-Lo (tiny)", impl) for impl in ("plain", "fast")} <= timed, workload
    live = [json.loads(line) for line in (tmp_path / "out" / "live.jsonl").read_text().splitlines()]
    assert [x["row"] for x in live if "row" in x] == saved["rows"]
    assert [x["check"] for x in live if "check" in x] == saved["checks"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["rows"] == saved["rows"]
    assert ("kernel fwd+bwd", "FlowMo-Lo (tiny)", "torch compiled") in timed
    skipped = {r.impl: r.note for r in rows if r.ms is None}
    assert skipped["triton"].startswith("skipped") and skipped["upstream_eager"].startswith("skipped")
    assert held_when_sized == {0: [], 1: []}  # Lo's and Hi's batches, with no training model built yet
    first_rows = list(dict.fromkeys(r.workload.split(":")[0] for r in rows))[:5]  # the most valuable first
    assert first_rows == ["decoder forward", "reconstruct", "train step (1 micro-batch, no norm logging)",
                          "reconstruct latency (batch 1)", "encode (token ids)"]
    assert 0 < saved["unique_graphs"] <= graphs_needed(gpu_report.DRY)
    assert f"compiled graphs (dynamo unique_graphs): {saved['unique_graphs']}" in saved["header"]
    cache = (tmp_path / "cache").resolve()
    assert (os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ["TRITON_CACHE_DIR"]) == (
        str(cache / "inductor"), str(cache / "triton"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["live.jsonl", "live.md", "report.json", "report.md"]
    assert held_at_train == [[]]


def test_phases_select_rows(monkeypatch, capsys):
    monkeypatch.delenv("FLOWMO_REFERENCE", raising=False)
    rc = gpu_report.main(["--dry-run", "--target-s", "0", "--max-iters", "1", "--phases", "lfq,latency"])
    printed = capsys.readouterr().out
    workloads = {line.split(" | ")[0].lstrip("| ") for line in printed.splitlines() if line.startswith("| ")}
    assert rc == 0 and "not asked for: --phases" in printed
    assert {"reconstruct latency (batch 1)", "LFQ loss (N=128, d=9)"} <= workloads
    assert not {"reconstruct", "decoder forward", "encode (token ids)"} & workloads
    with pytest.raises(SystemExit):
        gpu_report.parse_args(["--phases", "reconstruct,warp"])


def start_script(args: list, folder: Path) -> subprocess.Popen:
    """bench/gpu_report.py as a script (its own process: the budget counts from its start), output to files."""
    env = {k: v for k, v in os.environ.items() if k != "FLOWMO_REFERENCE"}
    with open(folder / "stdout", "w") as stdout, open(folder / "stderr", "w") as stderr:
        return subprocess.Popen([sys.executable, str(SCRIPT), *args], env=env, cwd=SCRIPT.parents[1],
                                stdout=stdout, stderr=stderr, text=True)


def finished_rows(path: Path) -> list:
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["row"] for line in lines if line.startswith('{"row"')]


def test_a_killed_run_keeps_every_row_it_finished(tmp_path):
    """Killed (SIGKILL, no chance to clean up) right after its first row finished: that row is already in
    the live files, as a JSON line and a markdown line, and was printed; the final report never came."""
    out = tmp_path / "out"
    proc = start_script(["--dry-run", "--phases", "lfq", "--target-s", "2", "--out", str(out)], tmp_path)
    try:
        deadline = time.monotonic() + 600  # against a hang only
        while proc.poll() is None and not finished_rows(out / "live.jsonl") and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    rows = [Row(**r) for r in finished_rows(out / "live.jsonl")]
    assert rows and not (out / "report.md").exists(), (tmp_path / "stderr").read_text()[-3000:]
    markdown = (out / "live.md").read_text()
    printed = (tmp_path / "stdout").read_text()
    for r in rows:
        line = report_rows.markdown_row(r, report_rows.Baselines.of(rows), None)
        assert line in markdown and line in printed


def test_the_budget_counts_from_the_process_start(tmp_path):
    """A budget of the first phase's need plus less than the script's own start-up (torch's imports alone take
    more than 0.5 s): the phase does not start, so no check runs; counted from after start-up, it would."""
    need = gpu_report.DRY.phase_s["decoder"]
    proc = start_script(["--dry-run", "--phases", "decoder", "--budget-s", str(need + 0.5)], tmp_path)
    assert proc.wait(timeout=600) == 1  # no check ran
    log = (tmp_path / "stderr").read_text()
    assert "phase decoder: skipped (time budget)" in log, log[-3000:]


def test_a_phase_starts_only_with_the_time_it_needs_left():
    """Not one row of a phase starts with less than its need left (a row's own reserve may be smaller): the
    phase is one row saying so."""
    r = harness(budget_s=30.0)
    assert not r.phase("train", need_s=60.0)
    assert [(row.workload, row.ms) for row in r.rows] == [("phase train", None)]
    assert r.rows[0].note.startswith("skipped:") and "needs 60 s" in r.rows[0].note
    assert r.phase("lfq", need_s=10.0) and len(r.rows) == 1


def test_measure_warms_before_the_first_call():
    """`warm` runs once, before the warm-up call, and counts in the first-call time, not in the median."""
    r, calls = harness(budget_s=60.0), []
    row = Row("reconstruct", "Lo", "fast", 2, None)
    r.measure(row, lambda: calls.append("call"), warm=lambda: calls.append("warm"))
    assert calls == ["warm", "call", "call"] and row.ms is not None


def test_the_sampler_is_warmed_on_a_short_plan_with_every_kind_of_step():
    """Upstream's 25-step plan guides some steps and not others: the short plan has both (both decoder batch
    sizes compile), in 3 steps."""
    full = UPSTREAM.replace(steps=25)
    short = gpu_report.short_plan(full)
    assert short.steps == 3 and set(short.plan().guided) == set(full.plan().guided) == {True, False}
    assert gpu_report.short_plan(full.replace(cfg=1.0)).plan().guided == (False,)  # nothing guided: 1 step


def test_a_row_that_compiles_while_timed_says_so():
    """Each timed call at a new shape compiles a new graph (dynamic=False): the row's median includes
    compiling, and its note says so; a row whose warm-up compiled everything has no note."""
    r = harness(budget_s=60.0)
    compiled = torch.compile(lambda x: x * 2 + 1, backend="eager", dynamic=False)
    sizes = iter(range(3, 100))
    recompiling = Row("decoder forward", "Lo", "fast", 2, None)
    r.measure(recompiling, lambda: compiled(torch.ones(next(sizes))))
    assert recompiling.note == "1 graphs compiled while timed"
    steady = Row("decoder forward", "Lo", "fast", 2, None)
    r.measure(steady, lambda: compiled(torch.ones(2)))
    assert steady.ms is not None and steady.note == ""


GIB = 2**30


def test_the_train_batch_is_chosen_from_free_memory(monkeypatch):
    """The train rows' batch is the largest of 8, 4, 2, 1 that train.memory's estimate of FlowMo training fits in the
    free memory (Lo's inference models released first), never above the scale's; off CUDA the scale's batch."""
    assert [report.train_batch_for(fitting, 8) for fitting in (17, 8, 7, 4, 3, 2, 1, 0)] == [8, 8, 4, 4, 2, 2, 1, 1]
    assert report.train_batch_for(17, 4) == 4
    lo = report.FULL.models["FlowMo-Lo"]
    config = flowmo_fast.load_config([*lo[1], "data.image_size=256"], preset=lo[0])
    full = report.Report(report.ReportSettings(dry_run=True), report.FULL, torch.device("cpu"))
    assert full.train_batch("FlowMo-Lo") == 8  # the CPU: no free memory to read
    for free_gib in (79, 30, 20):  # as an idle H100 reports it, and smaller cards
        monkeypatch.setattr(report.Report, "free_memory", lambda self, f=free_gib: f * GIB)
        full = report.Report(report.ReportSettings(dry_run=True), report.FULL, torch.device("cpu"))
        expected = report.train_batch_for(largest_micro_batch(config, free_gib * GIB), 8)
        assert full.train_batch("FlowMo-Lo") == expected
        assert f"train batch FlowMo-Lo {expected}, FlowMo-Hi {full.train_batch('FlowMo-Hi')} (" in full.header()
    assert expected < 8  # 20 GiB: the estimate, not the scale, set it
    monkeypatch.setattr(report.Report, "free_memory", lambda self: 79 * GIB)
    measured = report.Report(report.ReportSettings(dry_run=True, activation_scale=2.0), report.FULL, torch.device("cpu"))
    doubled = replace(memory_model(config), per_image=2 * memory_model(config).per_image)
    assert measured.train_batch("FlowMo-Lo") == report.train_batch_for(doubled.largest_fitting(79 * GIB), 8) < 8