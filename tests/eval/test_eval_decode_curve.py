"""The eval.decode_curve command end to end on the tiny checkpoint (2 photos, 1- and 2-step points): records,
table, plot, the reference solution from the same noise, resuming, refusing other settings; its numbers against
eval.rfid's; and the verdict read from the records (eval/curve_report.py)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import flowmo_fast
from eval import curve_report, decode_curve, rfid, weights
from eval.curve_report import PointRecord
from eval.curve_report import SolverSteps
from flowmo_fast.flowmo import decoder_passes
from flowmo_fast.formats.data import SamplePhotosDataset

CURVE = ["--step-counts", "1,2", "--solvers", "euler,ab2", "--baseline", "euler:2", "--reference", "heun:3",
         "--noise-seeds", "2", "--max-images", "2", "--batch-size", "2", "--workers", "0", "--device", "cpu"]


def run_curve(checkpoint, out, *extra) -> tuple[dict, str]:
    stdout = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(stdout):
            records = decode_curve.main(["--ckpt", str(checkpoint), "--out", str(out), *CURVE, *extra])
    finally:
        torch.set_num_threads(threads)
    return records, stdout.getvalue()


@pytest.fixture(scope="module")
def curve(tiny_checkpoint, tmp_path_factory):
    """One run without metric networks: (records, output folder, stdout)."""
    out = tmp_path_factory.mktemp("curve")
    records, stdout = run_curve(tiny_checkpoint, out, "--no-lpips", "--no-rfid")
    return records, out, stdout


def lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]


def test_every_point_once_with_its_passes_table_and_plot(curve, tiny_checkpoint):
    records, out, stdout = curve
    got = [(r["solver"], r["steps"], r["seed"]) for r in lines(out)]
    assert got == [("heun", 3, 0), ("euler", 2, 0), ("euler", 2, 1), ("euler", 1, 0), ("ab2", 1, 0), ("ab2", 2, 0)]
    base = flowmo_fast.load_checkpoint(tiny_checkpoint).sampling()
    for r in lines(out):
        assert r["passes"] == decoder_passes(base.replace(solver=r["solver"], steps=r["steps"]))
        distance = {"ref_rmse"} if r["seed"] == 0 and r["solver"] != "heun" else set()  # not the reference's
        assert r["num_images"] == 2 and set(r["metrics"]) == {"psnr", "ssim", *distance}
    table = (out / "curve.md").read_text()
    assert "| noise (std over 2 seeds) |" in table and "| ab2 | 2 | 2 |" in table
    assert "| heun (reference) | 3 |" in table
    assert table.count("- euler: ") == 1 and table.count("- ab2: ") == 1 and "euler: matches euler:2" in stdout
    with Image.open(out / "curve.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 2 * plot.size[1]  # psnr, ssim, ref_rmse side by side
    assert json.loads((out / "settings.json").read_text())["metrics"] == ["psnr", "ssim"]


def test_the_reference_is_the_same_ode_from_the_same_noise(curve, tiny_checkpoint):
    """reference-rank0-of-1.pt holds heun:3 from each image's own (seed, row) noise, as eval.rfid reconstructs;
    a point's ref_rmse is its reconstructions' distance to it."""
    _, out, _ = curve
    model = flowmo_fast.load_checkpoint(tiny_checkpoint)
    images = torch.stack([SamplePhotosDataset(32)[r]["image"] for r in (0, 1)])
    saved = torch.load(out / "reference-rank0-of-1.pt", weights_only=True)
    assert saved["rows"].tolist() == [0, 1]
    heun = model.reconstruct_rows(images, [0, 1], 0, model.sampling().replace(solver="heun", steps=3))
    torch.testing.assert_close(saved["images"], heun, rtol=0, atol=1e-6)
    euler = model.reconstruct_rows(images, [0, 1], 0, model.sampling().replace(steps=1))
    want = (euler.double() - heun.double()).pow(2).flatten(1).mean(1).sqrt().mean()
    recorded = next(r for r in lines(out) if (r["solver"], r["steps"]) == ("euler", 1))["metrics"]["ref_rmse"]
    assert recorded == pytest.approx(float(want), rel=1e-5) and recorded > 0.01


def test_a_rerun_measures_only_the_points_missing(curve, tiny_checkpoint, tmp_path):
    _, done, _ = curve
    out = tmp_path / "again"
    out.mkdir()
    for name in ("curve.jsonl", "settings.json", "reference-rank0-of-1.pt"):
        (out / name).write_bytes((done / name).read_bytes())
    before = (out / "curve.jsonl").read_text()
    _, stdout = run_curve(tiny_checkpoint, out, "--no-lpips", "--no-rfid")
    assert "5 point(s) in" in stdout and "0 to measure" in stdout and "reference:" not in stdout
    assert (out / "curve.jsonl").read_text() == before
    _, stdout = run_curve(tiny_checkpoint, out, "--no-lpips", "--no-rfid", "--solvers", "euler,ab2,midpoint")
    assert "2 to measure" in stdout
    assert [(r["solver"], r["steps"]) for r in lines(out)[6:]] == [("midpoint", 1), ("midpoint", 2)]


@pytest.mark.parametrize("changed", ["sampler", "metrics"])
def test_other_settings_are_refused_in_one_line(curve, tiny_checkpoint, inception_weights, tmp_path, changed):
    """Another noise seed, or rFID added (its weights given now), is another curve: refused before measuring."""
    _, done, _ = curve
    out = tmp_path / "other"
    out.mkdir()
    (out / "settings.json").write_bytes((done / "settings.json").read_bytes())
    extra = ["--no-rfid", "--seed", "1"] if changed == "sampler" else ["--inception-weights", str(inception_weights)]
    with pytest.raises(SystemExit) as info:
        run_curve(tiny_checkpoint, out, "--no-lpips", *extra)
    message = str(info.value.code)
    assert message.startswith("eval.decode_curve: error:") and f"({changed}:" in message and "\n" not in message
    assert not (out / "curve.jsonl").exists()


def test_a_point_measures_as_eval_rfid_does(tiny_checkpoint, inception_weights, tmp_path):
    """With the Inception weights the curve has rFID too; the baseline's numbers are eval.rfid's."""
    weights_flags = ["--no-lpips", "--inception-weights", str(inception_weights)]
    _, stdout = run_curve(tiny_checkpoint, tmp_path / "curve", *weights_flags, "--solvers", "euler",
                          "--step-counts", "2", "--reference", "euler:3")
    point = next(r for r in lines(tmp_path / "curve") if (r["solver"], r["steps"], r["seed"]) == ("euler", 2, 0))
    one = rfid.main(["--ckpt", str(tiny_checkpoint), "--out", str(tmp_path / "rfid"), "--steps", "2",
                     "--max-images", "2", "--batch-size", "2", "--workers", "0", "--device", "cpu", *weights_flags])
    # equal to float rounding: rFID's Inception features of the same images come in other batches (2e-6 apart
    # with 2 threads; a metric of other images or other noise is off by far more)
    assert {k: v for k, v in point["metrics"].items() if k != "ref_rmse"} == pytest.approx(one["metrics"], rel=1e-5)
    assert set(one["metrics"]) == {"rfid", "psnr", "ssim"}


@pytest.mark.parametrize("argv, message", [
    (["--steps", "4"], "--steps, --solver and --sampler set what the curve sweeps"),
    (["--sampler", "fast"], "give --step-counts and --solvers"),
    (["--noise-seeds", "1"], "at least 2"),
    (["--baseline", "euler"], "SOLVER:STEPS"),
    (["--solvers", "euler,rk4"], "allowed are euler"),
])
def test_bad_flags_are_refused(tiny_checkpoint, capsys, argv, message):
    with pytest.raises(SystemExit):
        decode_curve.parse_args(["--ckpt", str(tiny_checkpoint), *argv])
    assert message in capsys.readouterr().err


def test_weights_not_had_are_left_out_unless_named(monkeypatch, tmp_path):
    def unavailable(spec, explicit=None, progress=True):
        raise weights.WeightsUnavailable(f"{spec.filename} missing")

    monkeypatch.setattr(weights, "locate", unavailable)
    for spec in (weights.INCEPTION, weights.LPIPS_ALEX, weights.LPIPS_VGG):
        monkeypatch.delenv(spec.env, raising=False)
    notes = []
    assert decode_curve.available_weights(rfid.MetricWeights(), True, notes.append) == {}
    assert len(notes) == 3 and "rFID is left out; --inception-weights PATH adds it" in notes[0]
    with pytest.raises(weights.WeightsUnavailable):
        decode_curve.available_weights(rfid.MetricWeights(inception=str(tmp_path / "x.pth")), True, notes.append)


# ---- the verdict, from records ----------------------------------------------------------------------------


def record(solver, steps, psnr, seed=0, passes=None) -> PointRecord:
    return PointRecord(solver, steps, seed, passes or steps, {"psnr": psnr, "ssim": 0.5})


def test_noise_is_the_baselines_spread_over_seeds():
    records = [record("euler", 25, 20.0), record("euler", 25, 20.2, seed=1), record("euler", 25, 20.4, seed=2)]
    noise = curve_report.noise_of(records, SolverSteps("euler", 25), 0, 3)
    assert noise == {"psnr": pytest.approx(0.2), "ssim": 0.0}
    assert curve_report.noise_of(records[:1], SolverSteps("euler", 25), 0, 3) == {}


def test_a_solver_matches_from_the_fewest_passes_whose_every_larger_count_matches():
    """Within the noise either way (a blurrier coarse solution scores a higher PSNR: not a match); a point
    that matches below one that does not is listed, but is no "from ... on"."""
    base = record("euler", 25, 20.0, passes=31)
    noise = {"psnr": 0.1}
    line = [record("ab2", 2, 20.05), record("ab2", 4, 19.5), record("ab2", 8, 20.08), record("ab2", 12, 19.95)]
    blurry = [record("heun", 4, 20.5, passes=8), record("heun", 8, 20.02, passes=16)]
    found = curve_report.verdicts([base, *line, *blurry, record("euler", 4, 18.0)], ("ab2", "heun", "euler"),
                                  (2, 4, 8, 12, 25), SolverSteps("euler", 25), 0, noise)
    assert [r.steps for r in found["ab2"].matching] == [2, 8, 12] and found["ab2"].stays.steps == 8
    assert "from 8 steps (8 passes, 26% of the baseline's) on" in found["ab2"].sentence
    assert [r.steps for r in found["heun"].matching] == [8] and found["heun"].stays.steps == 8
    assert found["euler"].stays.steps == 25  # the baseline itself
    worse = curve_report.verdicts([base, record("ab2", 4, 19.0)], ("ab2",), (4,), SolverSteps("euler", 25), 0, noise)
    assert worse["ab2"].stays is None and "no step count measured" in worse["ab2"].sentence


def test_as_accurate_from_the_fewest_passes_no_farther_from_the_reference():
    base = PointRecord("euler", 25, 0, 31, {"psnr": 20.0, "ref_rmse": 0.01})
    ab2 = [PointRecord("ab2", n, 0, n, {"psnr": 20.0, "ref_rmse": d}) for n, d in ((8, 0.009), (12, 0.02),
                                                                                  (16, 0.008), (25, 0.004))]
    found = curve_report.verdicts([base, *ab2], ("ab2",), (8, 12, 16, 25), SolverSteps("euler", 25), 0,
                                  {"psnr": 0.1})
    assert found["ab2"].accurate.steps == 16 and "as accurate (ref_rmse) from 16 steps" in found["ab2"].sentence
