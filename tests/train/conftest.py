"""Fixtures for the training tests: offline perceptual-net weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def resnet50_weights():
    """A random-weight ResNet-50 where torchvision caches its ImageNet weights, so the real loading code
    (`resnet50(weights=IMAGENET1K_V1)`) runs offline."""
    import torchvision

    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet50().state_dict(), path)
    return path


@pytest.fixture()
def lone_process(monkeypatch):
    """The environment of a one-process group, so a command can run inside the test process; undone after."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess runs (OMP_NUM_THREADS=1): the CPUs are shared
    yield
    torch.set_num_threads(threads)
