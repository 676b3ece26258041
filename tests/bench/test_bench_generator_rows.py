"""bench/generator_rows.py through the GPU report's dry run: the token generator's rows are timed (plain and fast),
carry their FLOPs, and the fast path is checked against the plain one; the generate rows time `generate` alone (no
FlowMo model is built), and the phase runs as an invocation of its own."""

from __future__ import annotations

import json

import pytest
import torch

from bench import gpu_report, report
from bench.report_rows import Row


def test_generator_phase_dry_run(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FLOWMO_REFERENCE", raising=False)

    def no_flowmo(self, name, impl, training=False):
        raise AssertionError("the generator phase built a FlowMo model")

    monkeypatch.setattr(report.Models, "get", no_flowmo)  # its rows time the generator alone
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


def test_the_generator_phase_is_an_invocation_of_its_own():
    assert "generator" not in gpu_report.parse_args([]).phases and "decoder" in gpu_report.parse_args([]).phases
    assert gpu_report.parse_args(["--phases", "generator"]).phases == ("generator",)
    with pytest.raises(SystemExit):
        gpu_report.parse_args(["--phases", "decoder,generator"])
