"""bench/generator_rows.py through the GPU report's dry run: the token generator's rows are timed (plain and fast),
carry their FLOPs, and the fast path is checked against the plain one."""

from __future__ import annotations

import json

import torch

from bench import gpu_report
from bench.report_rows import Row


def test_generator_phase_dry_run(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FLOWMO_REFERENCE", raising=False)
    torch._dynamo.reset()
    out = tmp_path / "report.json"
    rc = gpu_report.main(["--dry-run", "--target-s", "0", "--max-iters", "1", "--phases", "generator",
                          "--json", str(out)])
    capsys.readouterr()
    saved = json.loads(out.read_text())
    rows = [Row(**r) for r in saved["rows"]]
    assert rc == 0 and not [r for r in rows if r.note], [r.note for r in rows]
    assert [(r.workload.split(" (")[0], r.impl) for r in rows] == [
        ("generator train step", "plain"), ("generator train step", "fast"),
        ("generate", "plain"), ("generate", "fast"),
    ]
    assert all(r.ms and r.flops_per_image > 0 and r.images == gpu_report.DRY.batch for r in rows)
    assert rows[3].check == "ids differ 0.00%"  # the eager backend in a dry run: the same ids
    [check] = saved["checks"]
    assert check["name"].endswith("generator training loss, fast vs plain (rel)") and check["value"] <= 1e-6
