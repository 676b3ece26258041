"""eval.sweep end to end on the CPU at tiny sizes: a (cfg, temperature) grid sampled by an untrained tiny generator,
decoded by the tiny FlowMo, scored against a folder with a random-weight Inception; the table, the plot and the
best setting; a rerun samples nothing, more values run only the new settings, other shared settings are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from generation_helpers import save_generator, tiny_generator
from PIL import Image

from eval import generate, gfid, sweep
from flowmo_fast.formats.token_shards import TokenShards


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Five smooth random 32x32 pictures in a folder."""
    root = tmp_path_factory.mktemp("reference")
    coarse = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3)).astype(np.uint8)
    for i, c in enumerate(coarse):
        Image.fromarray(c).resize((32, 32), Image.BILINEAR).save(root / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def argv(tiny_checkpoint, reference, inception_weights, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    ckpt = save_generator(tiny_generator(), tiny_checkpoint, folder / "00000000.pth")
    return ["--generator", ckpt, "--tokenizer", tiny_checkpoint, "--out", folder / "out", "--per-class", "2",
            "--reference", reference, "--inception-weights", inception_weights, "--cache-dir", folder / "cache",
            "--device", "cpu", "--decode-steps", "2", "--num-workers", "0", "--batch-size", "4",
            "--decode-batch-size", "4"]


def run(argv, *extra) -> dict:
    return sweep.main([str(a) for a in [*argv, *extra]])


def counting(monkeypatch) -> list:
    """Records every setting eval.generate is run for."""
    runs, real = [], generate.run
    monkeypatch.setattr(generate, "run", lambda s: (runs.append((s.options.cfg, s.options.temperature)), real(s)))
    return runs


def test_the_sweep_scores_every_setting_and_names_the_best(argv, capsys, monkeypatch):
    runs = counting(monkeypatch)
    best = run(argv, "--cfg", "1,3", "--temperature", "0,4.5")
    out = argv[argv.index("--out") + 1]
    assert runs == [(1.0, 0.0), (3.0, 0.0), (1.0, 4.5), (3.0, 4.5)]
    rows = sweep.read_table(str(out / sweep.TABLE))
    assert [(r["cfg"], r["temperature"]) for r in rows] == runs
    for r in rows:
        assert r["num_samples"] == 4 and all(np.isfinite(r[k]) for k in sweep.METRICS), r
        options = TokenShards(r["folder"]).manifest["generation"]["options"]
        assert (options["cfg"], options["temperature"], options["steps"]) == (r["cfg"], r["temperature"], 4)
        assert json.loads((out / f"cfg_{r['cfg']:g}_temperature_{r['temperature']:g}" / "gfid.json").read_text())[
            "metrics"]["fid"] == r["fid"]
    assert len({r["fid"] for r in rows}) == 4  # the settings make different samples
    assert best == min(rows, key=lambda r: r["fid"]) == json.loads((out / sweep.BEST).read_text())
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"best of 4 settings: --cfg {best['cfg']:g} --temperature {best['temperature']:g}  gFID")
    with Image.open(out / sweep.PLOT) as picture:
        assert picture.format == "PNG" and picture.width > picture.height

    monkeypatch.setattr(gfid, "measure", lambda s: pytest.fail(f"{s.samples} scored again"))
    assert run(argv, "--cfg", "1,3", "--temperature", "0,4.5") == best  # a rerun: nothing sampled or scored
    assert len(runs) == 4


def test_more_values_run_only_the_new_settings_and_other_shared_settings_are_refused(argv, monkeypatch):
    run(argv, "--cfg", "1,3", "--temperature", "0,4.5")  # the module's first sweep (done already when run together)
    runs = counting(monkeypatch)
    run(argv, "--cfg", "1,3,5", "--temperature", "0,4.5")
    assert runs == [(5.0, 0.0), (5.0, 4.5)]
    assert len(sweep.read_table(str(argv[argv.index("--out") + 1] / sweep.TABLE))) == 6
    with pytest.raises(SystemExit) as stop:
        run(argv, "--cfg", "1,3", "--temperature", "0,4.5", "--cfg-power", "3")
    assert str(stop.value.code).startswith("eval.sweep: error: ") and "other shared settings" in str(stop.value.code)
    assert runs == [(5.0, 0.0), (5.0, 4.5)]
