"""Token-shard identity: a rerun of tokenize into a folder that holds tokens written with other settings is
refused, naming the setting; each setting that changes what a row holds is tried in turn (the list is this
test's own, so a key dropped from the library's identity fails here). Settings that do not change the rows
(where the checkpoint file lies, what a finished run added) are accepted."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from PIL import Image

import flowmo_fast
from flowmo_fast import tokenize as tokenize_command
from flowmo_fast.formats.checkpoint import save_checkpoint
from flowmo_fast.formats.token_shards import (
    MANIFEST,
    TokenSpec,
    check_resumable,
    finished_manifest,
    new_manifest,
    to_json,
)

CHECKPOINT = {"path": "/checkpoints/a.pth", "sha256": "a" * 64, "which": "ema"}
CONFIG = {"model": {"context_dim": 18, "codebook_size_for_entropy": 9, "quantization_type": "lfq"},
          "data": {"image_size": 32}}
SPEC = TokenSpec("ids", "uint16", (16,), 512)
DATA = {"source": "7 images under /data", "image_size": 32, "num_images": 7, "names_sha256": "1" * 64}

# (dotted manifest key, another value): each changes what the rows hold or which rows there are
CHANGES = [
    ("version", 2),
    ("checkpoint.sha256", "b" * 64),  # other weights
    ("checkpoint.which", "model"),  # raw weights instead of the EMA
    ("config.model.context_dim", 56),
    ("config.model.quantization_type", "kl"),
    ("tokens.kind", "latents"),
    ("tokens.dtype", "float16"),
    ("tokens.row_shape", [16, 18]),
    ("tokens.vocab_size", 16384),
    ("data.image_size", 64),
    ("data.num_images", 8),
    ("data.names_sha256", "2" * 64),  # other images, or another order
    ("classes", ["cats", "dogs"]),  # labelled rows instead of unconditional ones
    ("flip", True),  # a mirrored row after each image's
    ("shard_size", 4),
]


def planned() -> dict:
    return new_manifest(copy.deepcopy(CHECKPOINT), copy.deepcopy(CONFIG), SPEC, dict(DATA), 3)


def with_value(manifest: dict, key: str, value) -> dict:
    out = copy.deepcopy(manifest)
    *parents, last = key.split(".")
    inner = out
    for part in parents:
        inner = inner[part]
    assert last in inner, key  # the change must be to a key the manifest has
    inner[last] = value
    return out


@pytest.fixture()
def written(tmp_path):
    """A folder holding a finished run of `planned()`."""
    records = [{"shard": k, "items": [3 * k, min(3 * k + 3, 7)], "rows": [{"index": i, "name": f"{i}.png"}
               for i in range(3 * k, min(3 * k + 3, 7))], "failed": []} for k in range(3)]
    (tmp_path / MANIFEST).write_text(to_json(finished_manifest(planned(), records)))
    return tmp_path


@pytest.mark.parametrize("key, value", CHANGES, ids=[key for key, _ in CHANGES])
def test_a_rerun_with_another_setting_is_refused_naming_it(written, key, value):
    with pytest.raises(ValueError, match=re.escape(f"{key}: ")) as refused:
        check_resumable(str(written), with_value(planned(), key, value))
    assert f"{value!r} now" in str(refused.value) and "Use a new output folder" in str(refused.value)


def test_a_rerun_with_the_same_settings_is_accepted(written):
    check_resumable(str(written), planned())
    moved = with_value(planned(), "checkpoint.path", "/elsewhere/a.pth")  # the same file, copied
    check_resumable(str(written), moved)


# ----------------------------------------------------------------------------------- the command, end to end


def photos(folder, names: list[str]):
    folder.mkdir()
    for i, name in enumerate(names):
        pixels = np.random.default_rng(i).integers(0, 256, (36, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
    return folder


def tokenize(ckpt, out, data, *extra):
    tokenize_command.main([str(a) for a in ["--ckpt", ckpt, "--out", out, "--data", data, "--image-size", 32,
                                            "--shard-size", 2, "--num-workers", 0, *extra]])


def test_the_tokenize_command_refuses_a_folder_of_other_settings_naming_them(tiny_checkpoint, tmp_path, capsys):
    torch.manual_seed(1)
    other_weights = tmp_path / "other.pth"
    save_checkpoint(other_weights, flowmo_fast.FlowMo(flowmo_fast.load_config(preset="tiny")))
    data = photos(tmp_path / "data", ["a.png", "b.png", "c.png"])
    out = tmp_path / "tokens"
    tokenize(tiny_checkpoint, out, data)
    reruns = [
        ("checkpoint.which", [tiny_checkpoint, out, data, "--which", "model"]),  # raw weights, same file
        ("checkpoint.sha256", [other_weights, out, data]),
        ("data.image_size", [tiny_checkpoint, out, data, "--image-size", 16]),
        ("shard_size", [tiny_checkpoint, out, data, "--shard-size", 3]),
        ("flip", [tiny_checkpoint, out, data, "--flip"]),
        ("data.names_sha256", [tiny_checkpoint, out, photos(tmp_path / "renamed", ["a.png", "b.png", "d.png"])]),
        ("data.num_images", [tiny_checkpoint, out, photos(tmp_path / "more", ["a.png", "b.png", "c.png", "e.png"])]),
    ]
    for key, args in reruns:
        with pytest.raises(ValueError, match=rf"[(;] ?{re.escape(key)}: "):  # one of the differences named
            tokenize(*args[:3], *args[3:])
    tokenize(tiny_checkpoint, out, data)  # the same settings: accepted, nothing to encode
    assert "nothing to encode" in capsys.readouterr().err
