"""bench/gpu_smoke.py without a GPU: the dry run runs every stage on the CPU within its limit and passes its checks,
writing at most 8 files (none below) under --out and its caches elsewhere; a stage past its limit is stopped and the
next one runs; a check that raises is a failed check that names the error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import gpu_smoke
from bench.harness import Budget

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_runs_every_stage_within_its_limit(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FLOWMO_REFERENCE", raising=False)
    for variable in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(variable, "elsewhere")  # restored after the test
    out = tmp_path / "out"
    rc = gpu_smoke.main(["--dry-run", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                         "--work-dir", str(tmp_path / "work")])
    printed = capsys.readouterr().out
    saved = json.loads((out / "smoke.json").read_text())
    stages = {s["name"]: s for s in saved["stages"]}
    assert rc == 0 and list(stages) == list(gpu_smoke.STAGE_NAMES), saved["stages"]
    assert all(s["outcome"] == "done" and s["seconds"] <= s["limit_s"] for s in stages.values()), saved["stages"]
    checks = saved["checks"]
    assert checks and all(c["value"] <= c["tolerance"] for c in checks)
    names = " / ".join(c["name"] for c in checks)
    for found in ("triton modulate", "triton gated_residual", "triton qk_norm_rope", "triton lfq", "bfloat16",
                  "float32", "batch 3, classes", "batch 5, no classes", "16384-way heads", "kernels=auto, compile=on",
                  "resume continued", "training loss, fast vs plain", "passed their self-checks"):
        assert found in names, found
    files = sorted(p.name for p in out.iterdir())
    assert files == ["live.jsonl", "live.md", "smoke.json", "smoke.md"]  # + the command's stderr.log: 5 of 8
    live = [json.loads(line) for line in (out / "live.jsonl").read_text().splitlines()]
    assert [x["check"] for x in live if "check" in x] == checks  # each as it finished, in order
    assert (tmp_path / "cache" / "inductor").is_dir() and os.environ["TORCHINDUCTOR_CACHE_DIR"].startswith(
        str((tmp_path / "cache").resolve()))
    assert printed.rstrip().splitlines()[-1].startswith("| ")  # the summary prints last


def smoke(tmp_path) -> gpu_smoke.Smoke:
    settings = gpu_smoke.SmokeSettings(dry_run=True, budget_s=60, work_dir=str(tmp_path))
    return gpu_smoke.Smoke(settings, torch.device("cpu"), time.perf_counter())


def test_a_stage_past_its_limit_is_stopped_and_the_next_runs(tmp_path, capsys):
    run, ran = smoke(tmp_path), []
    run.run_stage(gpu_smoke.Stage("slow", 1), lambda: time.sleep(30))
    run.run_stage(gpu_smoke.Stage("next", 5), lambda: ran.append(1))
    assert [(r.name, r.outcome) for r in run.records] == [("slow", "stopped at its limit"), ("next", "done")]
    assert run.records[0].seconds < 10 and ran == [1] and isinstance(run.budget, Budget) and run.budget is run.total
    run.run_stage(gpu_smoke.Stage("broken", 5), lambda: 1 / 0)
    assert run.records[-1].outcome == "error: ZeroDivisionError: division by zero" and run.failed()


def test_a_check_that_raises_fails_and_names_its_error(tmp_path, capsys):
    def broken() -> float:
        raise RuntimeError("CUDA error: an illegal memory access\nmore")

    check = smoke(tmp_path).evaluate("graph vs eager", broken, 0.0)
    assert not check.passed and check.name == "graph vs eager: error RuntimeError: CUDA error: an illegal memory access"


# Our requirements the GPU machines' image does not hold (.library's device notes list its packages): the smoke,
# the report and the commands it starts must import without them (the reference's mup and omegaconf are only for
# the report's upstream rows).
NOT_ON_THE_GPU_IMAGE = ("webdataset", "lpips", "torch_fidelity", "pytorch_fid", "mup", "omegaconf")


def test_the_smoke_and_the_commands_it_runs_import_without_what_the_gpu_image_lacks():
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in NOT_ON_THE_GPU_IMAGE)  # import X: ImportError
    modules = ("bench.gpu_smoke", "bench.smoke_checks", "bench.gpu_report", "train.generator", "train.pretrain",
               "flowmo_fast.tokenize", "flowmo_fast.detokenize")
    script = f"import importlib, sys; {blocked}\nfor m in {modules!r}: importlib.import_module(m)\nprint('ok')"
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
