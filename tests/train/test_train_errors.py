"""train.pretrain / train.posttrain: a user's mistake (unusable data, a missing or uncached checkpoint) ends in
one line and a non-zero exit; --resume-from-ckpt takes the published names; loader workers fit the machine."""

from __future__ import annotations

import os

import torch

from flowmo_fast.config import load_config
from flowmo_fast.distributed import Processes
from train import posttrain, pretrain
from train.tokenizer import build_data, loader_workers
from train.train_state import Progress

TINY = ["--preset", "tiny", "data.image_size=16", "data.batch_size=8", "trainer.sample_every=1000"]
ONE = Processes(0, 1, 0, torch.device("cpu"))


def run(main, argv: list, capsys) -> tuple[int, list[str]]:
    """A command's main() in this process: (exit code, the lines that start with "error:")."""
    code = main([str(a) for a in argv])
    out = capsys.readouterr().out
    return code, [line for line in out.splitlines() if line.startswith("error:")]


def test_pretrain_data_mistakes_end_in_one_line(lone_process, undecodable_folder, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    common = [*TINY, "--results-dir", tmp_path, "trainer.max_steps=2"]
    code, errors = run(pretrain.main, [*common, "--experiment-name", "e", f"data.data_dir={tmp_path / 'empty'}"], capsys)
    assert code == 2 and len(errors) == 1 and f"no image files under {tmp_path / 'empty'}" in errors[0]
    code, errors = run(pretrain.main, [*common, "--experiment-name", "u", f"data.data_dir={undecodable_folder}"], capsys)
    assert code == 2 and len(errors) == 1
    assert f"images drawn from 3 images under {undecodable_folder} without a batch of 2 that decode" in errors[0]


def test_pretrain_resumes_from_published_names(lone_process, published_cache, tmp_path, capsys):
    common = [*TINY, "--results-dir", tmp_path, "trainer.max_steps=7"]  # the tiny checkpoint is at step 7
    code, errors = run(pretrain.main, [*common, "--experiment-name", "hi", "--resume-from-ckpt", "flowmo_hi"], capsys)
    assert code == 2 and len(errors) == 1 and "hf download ksarge/FlowMo flowmo_hi.pth" in errors[0]
    assert pretrain.main([*map(str, common), "--experiment-name", "lo", "--resume-from-ckpt", "flowmo_lo"]) == 0
    out = capsys.readouterr().out
    assert f"starting from the weights of {published_cache}" in out and "flowmo_lo.pth (step 7)" in out


def test_posttrain_mistakes_end_in_one_line(lone_process, published_cache, tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, errors = run(posttrain.main, [
        "--resume-from-ckpt", tiny_checkpoint, "--results-dir", tmp_path, "--experiment-name", "p",
        f"data.data_dir={tmp_path / 'empty'}", "trainer.max_steps=9",
    ], capsys)
    assert code == 2 and len(errors) == 1 and f"no image files under {tmp_path / 'empty'}" in errors[0]
    try:
        posttrain.main(["--resume-from-ckpt", "flowmo_hi", "--results-dir", str(tmp_path), "--experiment-name", "q"])
    except SystemExit as stop:
        assert "\n" not in str(stop.code) and "hf download ksarge/FlowMo flowmo_hi.pth" in str(stop.code)
    else:
        raise AssertionError("posttrain started without its checkpoint")
    config = posttrain.config_from_checkpoint("flowmo_lo", [])
    assert config.model.mup_width == 2 and config.model.posttrain_sample  # the tiny checkpoint's, + POSTTRAIN


def test_train_loader_workers_never_outnumber_the_cpus(monkeypatch, capsys):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # a 2-CPU machine
    assert loader_workers(8, ONE) == 1
    assert capsys.readouterr().out.strip() == "data.num_workers=8, but this machine has 2 CPU(s): using 1 loader worker(s)"
    assert loader_workers(1, ONE) == 1 and loader_workers(0, ONE) == 0 and capsys.readouterr().out == ""
    data = build_data(load_config(["data.image_size=16", "data.batch_size=2"]), ONE, Progress())  # upstream's 8
    assert data.batches._num_workers == 1
    del data
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert loader_workers(8, ONE) == 8 and loader_workers(12, ONE) == 12  # what the machine has: as asked
