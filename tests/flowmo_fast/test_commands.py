"""flowmo_fast.distributed and flowmo_fast.flags: device choice (an explicit cuda:N made current, checked with torch.cuda faked), the data
flags, loader workers, argument types and one-line errors."""

import argparse
import os

import pytest
import torch

from flowmo_fast import distributed, flags
from flowmo_fast.formats.data import ImageFolderDataset, SamplePhotosDataset


@pytest.fixture
def two_fake_gpus(monkeypatch):
    """torch.cuda as a machine with two GPUs would show it; records what is made current."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    return current


def test_explicit_gpu_is_made_current(two_fake_gpus):
    assert distributed.pick_device("cuda:1") == torch.device("cuda", 1)
    assert two_fake_gpus == [torch.device("cuda", 1)]
    assert distributed.pick_device("cuda", local_rank=3) == torch.device("cuda", 1)  # rank 3 of 2 GPUs per node
    assert distributed.pick_device("auto", local_rank=0) == torch.device("cuda", 0)
    assert two_fake_gpus[1:] == [torch.device("cuda", 1), torch.device("cuda", 0)]
    assert distributed.pick_device("cpu") == torch.device("cpu") and len(two_fake_gpus) == 3


def test_impossible_devices_name_the_choices(two_fake_gpus):
    with pytest.raises(ValueError, match="2 CUDA device"):
        distributed.pick_device("cuda:2")
    with pytest.raises(ValueError, match="allowed: auto, cpu, cuda, cuda:N"):
        distributed.pick_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_a_gpu_says_use_cpu():
    with pytest.raises(ValueError, match="use --device cpu"):
        distributed.pick_device("cuda")
    assert distributed.pick_device("auto") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu_is_current_on_real_hardware():
    torch.cuda.set_device(0)
    assert distributed.pick_device("cuda:1") == torch.device("cuda", 1) and torch.cuda.current_device() == 1
    torch.cuda.set_device(0)


def test_one_process_without_torchrun_has_no_group(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    procs = distributed.start_processes("cpu")
    assert (procs.rank, procs.world_size, procs.is_main, procs.grouped) == (0, 1, True, False)
    assert distributed.gather_objects("x", procs) == ["x"] and distributed.on_rank0(lambda: 7, procs) == 7
    assert distributed.min_across_ranks(5, procs) == 5


def test_data_flags_pick_the_data_set(tmp_path):
    parser = argparse.ArgumentParser()
    flags.add_data_flags(parser)
    assert isinstance(flags.image_source(parser.parse_args([])).open(32), SamplePhotosDataset)
    from PIL import Image

    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    folder = flags.image_source(parser.parse_args(["--data", str(tmp_path)])).open(32)
    assert type(folder) is ImageFolderDataset and len(folder) == 1
    for bad in (["--data", "x", "--imagenet-tar", "t", "--imagenet-index", "i"], ["--imagenet-tar", "t"]):
        with pytest.raises(SystemExit):
            flags.check_data_flags(parser, parser.parse_args(bad))


def test_workers_never_outnumber_the_cpus(monkeypatch):
    for cpus, expected in ((1, 0), (2, 1), (16, 8)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        assert flags.default_workers() == expected


def test_integer_flags_say_what_is_wrong():
    assert flags.positive_int("3") == 3 and flags.non_negative_int("0") == 0
    for text, fn, message in (("0", flags.positive_int, "positive"), ("-1", flags.non_negative_int, "0 or more"),
                              ("x", flags.positive_int, "not an integer")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            fn(text)


def test_user_mistakes_end_in_one_line():
    with pytest.raises(SystemExit) as stop:
        with flags.one_line_errors("tokenize"):
            raise FileNotFoundError("no such folder: x")
    assert str(stop.value.code) == "tokenize: error: no such folder: x"
    with pytest.raises(KeyError):  # a bug is not a user's mistake: its traceback stays
        with flags.one_line_errors("tokenize"):
            raise KeyError("bug")
    for mistake in (FileExistsError("out is a file"), PermissionError("cannot write out"), TimeoutError("slow")):
        with pytest.raises(SystemExit, match=f"^tokenize: error: {mistake}$"):
            with flags.one_line_errors("tokenize", also=(TimeoutError,)):  # TimeoutError: the command's own type
                raise mistake
