"""The GPU report's bookkeeping, without a GPU: the table's ratios, budget and failures."""

import torch

from bench import gpu_report
from bench.gpu_report import Row


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
    table = gpu_report.markdown_table(rows, peak=80.0).splitlines()
    fast = table[3].split(" | ")
    # 4 images x 1 TFLOP in 0.1 s = 40 TFLOP/s = 50% of 80; 4x the plain row, 3x the faster upstream row
    assert fast[3:11] == ["100.0", "40.0", "40", "50.0%", "1.50", "4.00x", "3.00x", ""]
    assert table[4].split(" | ")[8:10] == ["—", "0.60x"]  # upstream rows: no `vs plain`; vs the faster upstream
    assert table[6].split(" | ")[8:10] == ["—", "—"]
    assert table[7].split(" | ")[3] == "—" and "skipped: budget" in table[7]


def report(budget_s: float) -> gpu_report.Report:
    args = gpu_report.parse_args(["--dry-run", "--budget-s", str(budget_s)])
    return gpu_report.Report(args, gpu_report.DRY, torch.device("cpu"))


def test_rows_the_budget_cannot_fit_are_skipped_not_run():
    r, ran = report(budget_s=0.0), []
    row = Row("encode", "Lo", "plain", 2, None)
    r.attempt("encode", reserve_s=5.0, fn=lambda: ran.append(1), row=row)
    assert ran == [] and row.note.startswith("skipped:") and row.ms is None


def test_a_failing_row_is_recorded_and_the_report_goes_on():
    r = report(budget_s=60.0)
    row = Row("encode", "Lo", "fast", 2, None)

    def fail():
        raise ValueError("shapes do not match")

    r.attempt("encode", reserve_s=0.0, fn=fail, row=row)
    assert row.note == "error: ValueError: shapes do not match"
    measured = Row("encode", "Lo", "plain", 2, None)
    r.attempt("encode", reserve_s=0.0, fn=lambda: r.measure(measured, lambda: torch.zeros(1)), row=measured)
    assert measured.ms is not None and measured.note == ""
