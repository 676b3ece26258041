"""flowmo_fast.maskgit's save_pretrained -> from_pretrained: logits equal to the checkpoint's EMA weights, the token
record kept, its card (with eval.gfid's metrics when they measured it), and eval.generate --generator FOLDER
making the rows the checkpoint makes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from sharing_helpers import generator_logits

from eval import generate
from flowmo_fast.formats.checkpoint import file_sha256
from flowmo_fast.formats.token_shards import TokenShards
from flowmo_fast.maskgit import card_facts, from_pretrained, save_pretrained
from flowmo_fast.maskgit.model import load_generator


def test_a_folder_loads_equal_to_the_checkpoints_ema_weights(generator_folder, generator_run_checkpoint):
    loaded = from_pretrained(generator_folder)
    ema = load_generator(generator_run_checkpoint, "ema")
    raw = load_generator(generator_run_checkpoint, "model")
    want = generator_logits(ema.model)
    assert not torch.equal(generator_logits(raw.model), want)  # the two sets of weights tell apart
    assert torch.equal(generator_logits(loaded.model), want)
    assert loaded.model.config == ema.model.config and loaded.source == ema.source and loaded.total_steps == 150
    assert loaded.path == str(generator_folder / "model.safetensors")
    assert from_pretrained(generator_run_checkpoint.parent.parent).path == str(generator_run_checkpoint)  # a run


def test_the_card_says_what_it_is_and_how_it_was_trained(generator_folder):
    card = ModelCard.load(generator_folder / "README.md")
    assert card.data.library_name == "flowmo-fast" and {"maskgit", "token-generator"} <= set(card.data.tags)
    text = card.text
    assert "A class-conditional (2 classes) token generator" in text and "16 positions x 2 groups of 9 bits" in text
    assert "the EMA weights of `00000150.pth`" in text and "steps: 150\n" in text
    assert "data: token shards of the tokenizer `tiny.pth`" in text and "2 classes" in text
    assert "batch: 32 rows per process x opt.n_grad_acc=1 x 8 processes" in text
    assert f"python -m eval.generate --generator {generator_folder} " in text and "Not evaluated" in text


def test_gfid_of_samples_it_made_goes_on_the_card(generator_run_checkpoint, tmp_path):
    samples = tmp_path / "gen"
    samples.mkdir()
    made_by = {"generator": {"path": str(generator_run_checkpoint), "sha256": file_sha256(generator_run_checkpoint),
                             "which": "ema"}}
    (samples / "manifest.json").write_text(json.dumps({"generation": made_by}))
    gfid = {"metrics": {"fid": 4.3, "inception_score": 274.0}, "num_samples": 50000,
            "samples": {"path": str(samples / "samples.npz")},
            "reference": {"kind": "adm", "path": "/data/VIRTUAL_imagenet256_labeled.npz", "num_images": 10000}}
    (samples / "gfid.json").write_text(json.dumps(gfid))
    facts = card_facts(generator_run_checkpoint, evaluations=[samples / "gfid.json"])
    got = [(m.name, m.value, m.images) for m in facts.metrics]
    assert got == [("fid", 4.3, 50000), ("inception_score", 274.0, 50000)]
    save_pretrained(generator_run_checkpoint, tmp_path / "folder", card=facts)
    text = (tmp_path / "folder" / "README.md").read_text()
    assert "| fid | 4.3 | 50000 | adm VIRTUAL_imagenet256_labeled.npz (10000 images) | `eval.gfid gfid.json` |" in text
    made_by["generator"]["which"] = "model"  # samples of the raw weights: not these
    (samples / "manifest.json").write_text(json.dumps({"generation": made_by}))
    with pytest.raises(ValueError, match="gfid.json measured other weights than these"):
        card_facts(generator_run_checkpoint, evaluations=[samples / "gfid.json"])


def rows(out: Path) -> np.ndarray:
    shards = TokenShards(str(out))
    return np.stack([shards[r] for r in range(len(shards))])


def test_eval_generate_takes_a_folder_and_makes_the_checkpoints_rows(generator_folder, generator_run_checkpoint,
                                                                       tmp_path):
    args = ["--per-class", "2", "--steps", "4", "--batch-size", "4", "--device", "cpu"]
    generate.main(["--generator", str(generator_folder), "--out", str(tmp_path / "a"), *args])
    generate.main(["--generator", str(generator_run_checkpoint), "--out", str(tmp_path / "b"), *args])
    assert np.array_equal(rows(tmp_path / "a"), rows(tmp_path / "b"))
    made_by = TokenShards(str(tmp_path / "a")).manifest["generation"]["generator"]
    assert made_by["path"] == str(generator_folder / "model.safetensors") and made_by["total_steps"] == 150
