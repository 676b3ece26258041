"""Checkpoint files: upstream layout, preset inference, atomic writes, and errors that name the problem."""

import json
import os
from pathlib import Path

import pytest
import torch

import flowmo_fast
from flowmo_fast import CheckpointError, load_checkpoint, save_checkpoint
from flowmo_fast.formats.checkpoint import infer_config


def test_our_checkpoint_round_trip(tiny_checkpoint, parity_model):
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    assert set(ckpt) == {"total_steps", "model_ema_state_dict", "model_state_dict", "config"}
    assert ckpt["total_steps"] == 7
    model = load_checkpoint(tiny_checkpoint)
    assert model.config == flowmo_fast.load_config(preset="tiny")
    assert not model.training
    for k, v in parity_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # overrides apply on top of the stored config
    assert load_checkpoint(tiny_checkpoint, overrides=["eval.sampling.cfg=2.0"]).config.eval.sampling.cfg == 2.0


def test_ema_and_model_weights_are_selected(tmp_path, tiny_model):
    ema = flowmo_fast.FlowMo(tiny_model.config)
    with torch.no_grad():
        for p in ema.parameters():
            p.fill_(0.5)
    path = tmp_path / "x.pth"
    save_checkpoint(path, tiny_model, ema_model=ema)
    assert load_checkpoint(path, which="ema").decoder.img_in.weight.eq(0.5).all()
    assert torch.equal(load_checkpoint(path, which="model").decoder.img_in.weight, tiny_model.decoder.img_in.weight)
    with pytest.raises(ValueError, match="allowed: ema, model"):
        load_checkpoint(path, which="best")


def test_upstream_layout_without_config_infers_the_preset(tmp_path, parity, parity_model):
    """An upstream file has no config: the preset comes from the shapes, the rest from overrides."""
    sd = parity_model.state_dict()
    path = tmp_path / "upstream.pth"
    torch.save({"total_steps": 3, "model_ema_state_dict": sd, "model_state_dict": sd}, path)
    model = load_checkpoint(path, overrides=parity["overrides"])
    assert model.config == flowmo_fast.load_config(parity["overrides"], preset="flowmo_lo")
    with torch.no_grad():
        assert torch.allclose(model.encode(parity["images"]), parity_model.encode(parity["images"]))


@pytest.mark.parametrize("preset", ["flowmo_lo", "flowmo_hi", "flowmo_hi_kl"])
def test_preset_inferred_from_published_shapes(preset):
    manifests = json.loads((Path(__file__).parents[1] / "fixtures" / "checkpoint_manifests.json").read_text())
    manifest = manifests[preset]["keys"]
    state_dict = {k: torch.empty(shape, device="meta") for k, shape in manifest.items()}
    assert infer_config(state_dict) == flowmo_fast.load_config(preset=preset)


def test_atomic_save_leaves_no_temporary_files(tmp_path, tiny_model):
    path = tmp_path / "sub" / "ckpt.pth"
    save_checkpoint(path, tiny_model)
    save_checkpoint(path, tiny_model, total_steps=2)  # overwrite in place
    assert sorted(os.listdir(path.parent)) == ["ckpt.pth"]
    assert torch.load(path, weights_only=True)["total_steps"] == 2


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_bytes(b"these are not weights" * 10)
    with pytest.raises(CheckpointError, match="notes.pth is not a readable PyTorch checkpoint"):
        load_checkpoint(path)


def test_truncated_and_empty_files(tmp_path, tiny_checkpoint):
    data = tiny_checkpoint.read_bytes()
    path = tmp_path / "half.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="half.pth is not a readable PyTorch checkpoint .*truncated"):
        load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="half.pth is empty"):
        load_checkpoint(path)


class RunsCodeWhenUnpickled:
    """A pickled object whose unpickling calls os.mkdir(marker): what a checkpoint carrying code can do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path, tiny_model):
    """weights_only=True: a file whose unpickling would run code (here: make a folder) is refused, and the code
    never runs, though the file is otherwise a complete checkpoint."""
    sd = tiny_model.state_dict()
    marker = tmp_path / "code-ran"
    path = tmp_path / "payload.pth"
    ckpt = {"model_ema_state_dict": sd, "model_state_dict": sd, "config": tiny_model.config.to_dict()}
    torch.save({**ckpt, "note": RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(CheckpointError, match="payload.pth is not a readable PyTorch checkpoint"):
        load_checkpoint(path)
    assert not marker.exists(), "loading the checkpoint ran the code pickled in it"
    torch.save(ckpt, path)
    load_checkpoint(path)  # the same file without the payload loads


def test_wrong_content(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="holds a list"):
        load_checkpoint(path)
    torch.save({"optimizer": {}}, path)
    with pytest.raises(CheckpointError, match="has no 'model_ema_state_dict'"):
        load_checkpoint(path)


def test_missing_and_unexpected_keys_are_named(tmp_path, tiny_model):
    sd = dict(tiny_model.state_dict())
    sd.pop("decoder.img_in.bias")
    sd["decoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "keys.pth"
    torch.save({"model_ema_state_dict": sd, "model_state_dict": sd, "config": tiny_model.config.to_dict()}, path)
    with pytest.raises(CheckpointError, match=r"1 missing keys \(first: decoder.img_in.bias\).*1 unexpected keys \(first: decoder.extra.weight\)"):
        load_checkpoint(path)


def test_shape_mismatch_names_key_and_both_shapes(tmp_path, tiny_model):
    sd = dict(tiny_model.state_dict())
    sd["decoder.txt_in.weight"] = torch.zeros(384, 57)
    path = tmp_path / "shape.pth"
    torch.save({"model_ema_state_dict": sd, "model_state_dict": sd, "config": tiny_model.config.to_dict()}, path)
    with pytest.raises(CheckpointError, match=r"decoder.txt_in.weight: checkpoint \(384, 57\), model \(384, 19\)"):
        load_checkpoint(path)
