"""A model folder with a missing, truncated or wrong file is refused in one line naming the file, what is wrong
and what to do; nothing is unpickled (a pickle under the weights' name is no safetensors file)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import flowmo_fast
from flowmo_fast.maskgit import from_pretrained as generator_from_pretrained

AGAIN = "download or copy it again, or save it again with save_pretrained"


@pytest.fixture()
def folder(tokenizer_folder, tmp_path) -> Path:
    return Path(shutil.copytree(tokenizer_folder, tmp_path / "copy"))


def refusal(load, folder: Path) -> str:
    with pytest.raises((flowmo_fast.CheckpointError, FileNotFoundError)) as e:
        load(folder)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_a_truncated_weights_file(folder):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert refusal(flowmo_fast.from_pretrained, folder) == (
        f"{path} is truncated: {len(data) // 2} bytes of the {len(data)} its header announces; {AGAIN}")
    path.write_bytes(data[:100])  # cut inside the header
    assert refusal(flowmo_fast.from_pretrained, folder) == (
        f"{path} is truncated: 100 bytes, shorter than its own header says; {AGAIN}")


def test_a_pickle_under_the_weights_name(folder, tiny_checkpoint):
    path = folder / "model.safetensors"
    shutil.copyfile(tiny_checkpoint, path)  # a torch.save zip: never unpickled
    size = path.stat().st_size
    assert refusal(flowmo_fast.from_pretrained, folder) == (
        f"{path} is not a safetensors file ({size} bytes, no safetensors header): {AGAIN}")


def test_a_truncated_or_missing_config(folder):
    path = folder / "config.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    message = refusal(flowmo_fast.from_pretrained, folder)
    assert message.startswith(f"{path} is not valid JSON (")
    assert message.endswith(f"a truncated or damaged file; {AGAIN}")
    path.unlink()
    assert refusal(flowmo_fast.from_pretrained, folder) == (
        f"{path} is missing: a model folder of save_pretrained holds config.json, model.safetensors, README.md; "
        + AGAIN)


def test_a_config_of_something_else(folder):
    path = folder / "config.json"
    path.write_text(json.dumps({"model": {"width": 64}, "colour": "red"}))
    assert refusal(flowmo_fast.from_pretrained, folder).startswith(f"{path} is not a FlowMo config (unknown")


def test_a_config_that_does_not_fit_the_weights(folder):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["model"]["enc_depth"] = 3
    path.write_text(json.dumps(config))
    assert refusal(flowmo_fast.from_pretrained, folder).startswith(
        f"{folder / 'model.safetensors'} does not match the model: 24 missing keys (first: encoder.double_blocks.2.")


def test_each_model_loader_refuses_the_others_folder(tokenizer_folder, generator_folder):
    assert refusal(generator_from_pretrained, tokenizer_folder) == (
        f"{tokenizer_folder / 'model.safetensors'} holds a tokenizer, not a generator: load {tokenizer_folder} "
        "with flowmo_fast.from_pretrained")
    assert refusal(flowmo_fast.from_pretrained, generator_folder) == (
        f"{generator_folder / 'model.safetensors'} holds a generator, not a tokenizer: load {generator_folder} "
        "with flowmo_fast.maskgit.from_pretrained")


def test_a_generator_config_without_its_token_record(generator_folder, tmp_path):
    folder = Path(shutil.copytree(generator_folder, tmp_path / "g"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({"model": config["model"]}))
    assert refusal(generator_from_pretrained, folder).startswith(
        f"{folder / 'config.json'} is not a token generator's config (no model.groups and tokens record)")


def test_weights_saved_by_other_means_load_by_their_keys(tiny_model, tokenizer_folder, tmp_path):
    """A state dict in safetensors without our metadata (a hand conversion) loads when its keys and shapes fit."""
    from safetensors.torch import save_file

    folder = tmp_path / "converted"
    folder.mkdir()
    shutil.copyfile(tokenizer_folder / "config.json", folder / "config.json")
    save_file(tiny_model.state_dict(), folder / "model.safetensors")
    loaded = flowmo_fast.from_pretrained(folder)
    assert torch.equal(loaded.state_dict()["encoder.txt_in.weight"], tiny_model.state_dict()["encoder.txt_in.weight"])
