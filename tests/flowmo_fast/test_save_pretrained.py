"""save_pretrained -> from_pretrained of a FlowMo: the folder's files, outputs equal to the original's, the weights
it holds, its model card, and push_to_hub's upload (captured: nothing goes online)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from safetensors import safe_open
from sharing_helpers import tokenizer_outputs

import flowmo_fast
from flowmo_fast.formats.pretrained import resolve_checkpoint


def test_the_folder_holds_safetensors_json_and_a_card(tokenizer_folder, tokenizer_run_checkpoint):
    assert sorted(p.name for p in tokenizer_folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    stored = torch.load(tokenizer_run_checkpoint, weights_only=True)
    assert json.loads((tokenizer_folder / "config.json").read_text()) == stored["config"]
    with safe_open(tokenizer_folder / "model.safetensors", "pt") as f:
        assert sorted(f.keys()) == sorted(stored["model_ema_state_dict"])  # the published checkpoints' keys
        assert f.metadata()["flowmo_fast.kind"] == "tokenizer" and f.metadata()["flowmo_fast.which"] == "ema"


def test_a_folder_loads_equal_to_the_checkpoints_ema_weights(tokenizer_folder, tokenizer_run_checkpoint):
    loaded = flowmo_fast.from_pretrained(tokenizer_folder)
    ids, images = tokenizer_outputs(loaded)
    want_ids, want_images = tokenizer_outputs(flowmo_fast.load_checkpoint(tokenizer_run_checkpoint, which="ema"))
    raw_ids, _ = tokenizer_outputs(flowmo_fast.load_checkpoint(tokenizer_run_checkpoint, which="model"))
    assert not torch.equal(raw_ids, want_ids)  # the two sets of weights tell apart
    assert torch.equal(ids, want_ids) and torch.equal(images, want_images)
    assert loaded.config == flowmo_fast.load_checkpoint(tokenizer_run_checkpoint).config
    assert torch.equal(flowmo_fast.Tokenizer.from_checkpoint(str(tokenizer_folder)).encode(torch.zeros(1, 3, 32, 32)),
                       flowmo_fast.Tokenizer(loaded).encode(torch.zeros(1, 3, 32, 32)))


def test_a_folder_holds_one_set_of_weights(tokenizer_folder):
    assert flowmo_fast.from_pretrained(tokenizer_folder, which="ema") is not None
    with pytest.raises(flowmo_fast.CheckpointError) as e:
        flowmo_fast.from_pretrained(tokenizer_folder, which="model")
    assert str(e.value) == (f"{tokenizer_folder / 'model.safetensors'} holds the ema weights only (a model folder "
                            "keeps one set), not model: ask for which='ema' (--which ema), or leave which out")


def test_the_raw_weights_save_when_the_card_says_so(tokenizer_run_checkpoint, tmp_path):
    card = flowmo_fast.card_facts(tokenizer_run_checkpoint, which="model")
    flowmo_fast.save_pretrained(tokenizer_run_checkpoint, tmp_path / "raw", card=card)
    ids, _ = tokenizer_outputs(flowmo_fast.from_pretrained(tmp_path / "raw"))
    assert torch.equal(ids, tokenizer_outputs(flowmo_fast.load_checkpoint(tokenizer_run_checkpoint, "model"))[0])
    assert "the raw (non-EMA) weights of `00000007.pth`" in (tmp_path / "raw" / "README.md").read_text()


def test_the_card_says_what_it_is_how_it_was_trained_and_its_metrics(tokenizer_folder):
    card = ModelCard.load(tokenizer_folder / "README.md")  # the Hub's own parser of the front matter
    assert card.data.library_name == "flowmo-fast" and {"image-tokenizer", "flowmo", "lfq"} <= set(card.data.tags)
    text = card.text
    assert "32x32 images to 16 tokens of 18 bits (0.281 bits per pixel)" in text
    assert "the EMA weights of `00000007.pth`" in text and "steps: 7\n" in text
    assert "preset: `tiny` (its model section)" in text and "x opt.n_grad_acc=2 x 2 processes" in text
    assert "| rfid | 1.25 | 50 | 50 images from val.tar | `eval.watch history.jsonl` |" in text
    assert "| psnr | 20.5 |" in text and "9.75" not in text  # the other checkpoint's line is not these weights'
    assert f'from_pretrained("{tokenizer_folder}")' in text


def test_an_evaluation_of_other_weights_is_refused(tokenizer_run_checkpoint, tmp_path):
    other = tmp_path / "metrics.json"
    other.write_text(json.dumps({"metrics": {"rfid": 3.0}, "checkpoint": {"sha256": "f" * 64, "which": "ema"}}))
    with pytest.raises(ValueError, match=r"metrics.json measured other weights than these \(sha256 [0-9a-f]{12}, "
                                         r"ema\)"):
        flowmo_fast.card_facts(tokenizer_run_checkpoint, evaluations=[other])


def test_a_model_in_memory_saves_as_it_is_with_a_card_of_its_config(tiny_model, tmp_path):
    flowmo_fast.save_pretrained(tiny_model, tmp_path / "m")
    loaded = flowmo_fast.from_pretrained(tmp_path / "m", which="model")  # no which recorded: either is accepted
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in tiny_model.state_dict().items())
    text = (tmp_path / "m" / "README.md").read_text()
    assert "weights saved from memory" in text and "steps: not recorded" in text and "Not evaluated" in text


def test_weights_cast_for_inference_are_refused(tiny_model, tmp_path):
    with pytest.raises(ValueError, match=r"weights are torch.bfloat16, not float32 .* load it on the CPU"):
        flowmo_fast.save_pretrained(tiny_model.to(torch.bfloat16), tmp_path / "bf16")
    assert not (tmp_path / "bf16" / "model.safetensors").exists()


def test_commands_take_checkpoint_files_and_say_so_of_a_folder(tokenizer_folder):
    with pytest.raises(flowmo_fast.CheckpointError, match="is a model folder of save_pretrained, not a checkpoint"):
        resolve_checkpoint(tokenizer_folder)
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: me/repo .*loads in Python, with "
                                                r"flowmo_fast.from_pretrained"):
        resolve_checkpoint("me/repo")


def test_push_to_hub_uploads_the_saved_folder(tokenizer_run_checkpoint, tmp_path, monkeypatch):
    """The Hub's client is replaced by a recorder (no network here): the folder it is asked to upload is kept."""
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))

    def upload_folder(self, repo_id, folder_path, **kw):
        shutil.copytree(folder_path, tmp_path / "uploaded")
        calls.append(("upload", repo_id, kw))
        return "https://huggingface.co/me/tiny-flowmo/commit/abc"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    upload = flowmo_fast.HubUpload(private=True, commit_message="first")
    url = flowmo_fast.push_to_hub(tokenizer_run_checkpoint, "me/tiny-flowmo", upload=upload)
    assert url.endswith("/commit/abc")
    assert [c[:2] for c in calls] == [("create", "me/tiny-flowmo"), ("upload", "me/tiny-flowmo")]
    assert calls[0][2]["private"] is True and calls[1][2]["commit_message"] == "first"
    uploaded = tmp_path / "uploaded"
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert 'from_pretrained("me/tiny-flowmo")' in (uploaded / "README.md").read_text()
    ids, _ = tokenizer_outputs(flowmo_fast.from_pretrained(uploaded))
    assert torch.equal(ids, tokenizer_outputs(flowmo_fast.load_checkpoint(tokenizer_run_checkpoint))[0])


def test_saving_again_replaces_every_file(tokenizer_folder, tiny_model, tmp_path):
    folder = Path(shutil.copytree(tokenizer_folder, tmp_path / "again"))
    flowmo_fast.save_pretrained(tiny_model, folder)
    assert torch.equal(flowmo_fast.from_pretrained(folder).state_dict()["decoder.img_in.weight"],
                       tiny_model.state_dict()["decoder.img_in.weight"])
    assert "saved from memory" in (folder / "README.md").read_text() and not list(folder.glob(".tmp-*"))


def test_a_folder_of_the_llm_type_records_its_llm_and_refuses_another(tiny_llm_folder, tmp_path):
    """The frozen LLM is never saved; the folder records it (as checkpoints do) and loading checks it."""
    from llm_helpers import llm_overrides, save_tiny_qwen2

    torch.manual_seed(0)
    model = flowmo_fast.FlowMo(flowmo_fast.load_config(llm_overrides(tiny_llm_folder), preset="tiny")).eval()
    flowmo_fast.save_pretrained(model, tmp_path / "llm")
    with safe_open(tmp_path / "llm" / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(model.state_dict())
        assert json.loads(f.metadata()["flowmo_fast.records"])["llm"]["llm_path"] == str(tiny_llm_folder)
    code = torch.randn(2, 16, model.config.model.context_dim)
    with torch.no_grad():
        want = model.quantize(code, torch.Generator().manual_seed(1)).quantized
        got = flowmo_fast.from_pretrained(tmp_path / "llm").quantize(code, torch.Generator().manual_seed(1)).quantized
    assert torch.equal(got, want)
    other = save_tiny_qwen2(tmp_path / "deeper", num_hidden_layers=3)
    with pytest.raises(flowmo_fast.CheckpointError, match=r"model.safetensors was trained with the LLM .* but "
                                                          r"model.llm_path='.*deeper' is a different architecture"):
        flowmo_fast.from_pretrained(tmp_path / "llm", overrides=[f"model.llm_path={other}"])
