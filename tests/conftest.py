"""Shared fixtures: the upstream parity fixture, tiny models and a tiny checkpoint file."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from parity_helpers import FIXTURES, fixture_state_dict  # noqa: F401  (re-exported for the fixtures below)

import flowmo_fast

# Tests stay offline: anything that would download weights must find a local file instead.
os.environ.setdefault("TORCH_HOME", str(Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / "flowmo-test-torch-home"))


@pytest.fixture(scope="session")
def parity():
    return torch.load(FIXTURES / "parity_lo_tiny.pt", weights_only=True)


@pytest.fixture(scope="session")
def parity_model(parity):
    """FlowMo with the fixture's config and weights, eval mode."""
    model = flowmo_fast.FlowMo(flowmo_fast.load_config(parity["overrides"]))
    model.load_state_dict(fixture_state_dict(parity["manifest"], parity["seed"]))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_llm_folder(tmp_path_factory) -> Path:
    """A tiny random Qwen2 saved as the hub has it, for quantization_type qwen2.5-coder-0.5b (tests/llm_helpers.py)."""
    pytest.importorskip("transformers")
    from llm_helpers import save_tiny_qwen2

    return save_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture()
def tiny_model():
    torch.manual_seed(0)
    return flowmo_fast.FlowMo(flowmo_fast.load_config(preset="tiny")).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, parity):
    """A flowmo-fast checkpoint file of the `tiny` preset (fixture weights, so not trivially random)."""
    model = flowmo_fast.FlowMo(flowmo_fast.load_config(preset="tiny"))
    model.load_state_dict(fixture_state_dict(parity["manifest"], parity["seed"]))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    flowmo_fast.save_checkpoint(path, model, total_steps=7)
    return path


def write_image_tar(folder: Path, members: dict) -> tuple[str, str]:
    """An uncompressed tar of {member name: file bytes} plus upstream's index JSON [{name, offset, size}]
    (written in reverse: the file's order must not matter) -> (tar path, index path)."""
    tar_path, index_path = Path(folder) / "images.tar", Path(folder) / "index.json"
    with tarfile.open(tar_path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(tar_path) as tar:
        index = [{"name": m.name, "offset": m.offset_data, "size": m.size} for m in tar.getmembers()]
    index_path.write_text(json.dumps(index[::-1]))
    return str(tar_path), str(index_path)


@pytest.fixture()
def make_image_tar():
    """Factory fixture: make_image_tar(folder, {name: bytes}) -> (tar path, index path)."""
    return write_image_tar


def seed_hf_cache(cache: Path, files: dict, revision: str = "0123456789abcdef0123456789abcdef01234567") -> None:
    """Put {file name: local file} into a Hugging Face hub cache as the files of ksarge/FlowMo at `revision`
    (main), in huggingface_hub's documented layout: blobs/<sha256>, snapshots/<revision>/<name> -> blob,
    refs/main = revision."""
    repo = Path(cache) / "models--ksarge--FlowMo"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    for name, source in files.items():
        blob = repo / "blobs" / hashlib.sha256(Path(source).read_bytes()).hexdigest()
        shutil.copyfile(source, blob)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs" / "main").write_text(revision)


@pytest.fixture(scope="session")
def seeded_hf_home(tmp_path_factory, tiny_checkpoint) -> Path:
    """A Hugging Face home (HF_HOME) whose hub cache holds the tiny checkpoint as ksarge/FlowMo's flowmo_lo.pth;
    flowmo_hi.pth is missing."""
    home = tmp_path_factory.mktemp("hf-home")
    seed_hf_cache(home / "hub", {"flowmo_lo.pth": tiny_checkpoint})
    return home


@pytest.fixture()
def published_cache(seeded_hf_home, monkeypatch) -> Path:
    """`seeded_hf_home`'s cache, with huggingface_hub pointed at it in offline mode, here and in subprocesses:
    nothing downloads."""
    from huggingface_hub import constants

    cache = seeded_hf_home / "hub"
    for key, value in {"HF_HOME": str(cache.parent), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read at import: this process's copy
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture()
def undecodable_folder(tmp_path):
    """A folder of image files none of which decode."""
    folder = tmp_path / "undecodable"
    folder.mkdir()
    for name in ("a.png", "b.jpg", "c.png"):
        (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n not an image at all")
    return folder
