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


def seed_hf_cache(cache: Path, files: dict, revision: str = "0123456789abcdef0123456789abcdef01234567",
                  repo_id: str = "ksarge/FlowMo") -> None:
    """Put {file name: local file} into a Hugging Face hub cache as the files of the model repository `repo_id`
    at `revision` (main), in huggingface_hub's documented layout: models--<user>--<repo>/blobs/<sha256>,
    snapshots/<revision>/<name> -> blob, refs/main = revision."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
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
def seed_hub():
    """`seed_hf_cache(cache, {name: file}, revision, repo_id)`, for tests that seed repositories of their own."""
    return seed_hf_cache


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


@pytest.fixture(scope="session")
def tokenizer_run_checkpoint(tmp_path_factory, parity) -> Path:
    """RUN/checkpoints/00000007.pth of the tiny preset (EMA: the fixture's weights; raw: those perturbed), and
    eval.watch's RUN/eval/history.jsonl with one line for it (rfid 1.25, psnr 20.5), then one for another file."""
    from sharing_helpers import tokenizer_run

    run = tmp_path_factory.mktemp("tokenizer") / "run"
    path = tokenizer_run(run, fixture_state_dict(parity["manifest"], parity["seed"]))
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    lines = [{"step": 7, "sha256": sha256, "status": "ok", "which": "ema", "metrics": {"rfid": 1.25, "psnr": 20.5},
              "num_images": 50, "data": {"dataset": "50 images from val.tar"}},
             {"step": 9, "sha256": "0" * 64, "status": "ok", "which": "ema", "metrics": {"rfid": 9.75},
              "num_images": 50, "data": {"dataset": "50 images"}}]  # a later evaluation, of another file
    (run / "eval").mkdir()
    (run / "eval" / "history.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="session")
def tokenizer_folder(tokenizer_run_checkpoint, tmp_path_factory) -> Path:
    """save_pretrained of `tokenizer_run_checkpoint` (its EMA weights, its card from the checkpoint and history)."""
    folder = tmp_path_factory.mktemp("shared") / "tiny-flowmo"
    flowmo_fast.save_pretrained(tokenizer_run_checkpoint, folder)
    return folder


@pytest.fixture(scope="session")
def generator_run_checkpoint(tmp_path_factory, tiny_checkpoint) -> Path:
    """RUN/checkpoints/00000150.pth of a tiny random token generator (EMA and raw weights differ) for the tiny
    FlowMo's tokens, in train.generator's layout."""
    from sharing_helpers import generator_run

    return generator_run(tmp_path_factory.mktemp("generator") / "run", tiny_checkpoint)


@pytest.fixture(scope="session")
def generator_folder(generator_run_checkpoint, tmp_path_factory) -> Path:
    from flowmo_fast.maskgit import save_pretrained

    folder = tmp_path_factory.mktemp("shared") / "tiny-maskgit"
    save_pretrained(generator_run_checkpoint, folder)
    return folder


@pytest.fixture()
def undecodable_folder(tmp_path):
    """A folder of image files none of which decode."""
    folder = tmp_path / "undecodable"
    folder.mkdir()
    for name in ("a.png", "b.jpg", "c.png"):
        (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n not an image at all")
    return folder
