"""from_pretrained: published names through a seeded Hugging Face cache (offline: nothing downloads), paths."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from sharing_helpers import run_offline_user

import flowmo_fast
from flowmo_fast.formats.pretrained import resolve_checkpoint

# Run as a user would: a fresh process whose only Hugging Face settings are HF_HOME and HF_HUB_OFFLINE=1.
SCRIPT = """
import hashlib, json, flowmo_fast
from flowmo_fast.formats.pretrained import resolve_checkpoint
out = {"path": resolve_checkpoint("flowmo_lo")}
model = flowmo_fast.from_pretrained("flowmo_lo", which="ema", device="cpu")
out["state"] = {k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in model.state_dict().items()}
try:
    flowmo_fast.from_pretrained("flowmo_hi")
except FileNotFoundError as e:
    out["miss"] = str(e)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def offline_user(seeded_hf_home) -> dict:
    return {**run_offline_user(SCRIPT, seeded_hf_home), "home": seeded_hf_home}


def test_a_published_name_loads_from_the_cache_offline(offline_user, tiny_checkpoint):
    snapshot = offline_user["home"] / "hub" / "models--ksarge--FlowMo" / "snapshots"
    assert Path(offline_user["path"]).parent.parent == snapshot and offline_user["path"].endswith("flowmo_lo.pth")
    want = flowmo_fast.load_checkpoint(tiny_checkpoint, which="ema").state_dict()
    # the bytes of every tensor (a sum would depend on the thread count's summation order)
    assert offline_user["state"] == {k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in want.items()}


def test_an_uncached_name_offline_fails_naming_the_file_and_the_fetch_command(offline_user):
    miss = offline_user["miss"]
    assert "flowmo_hi.pth" in miss and "HF_HUB_OFFLINE is set" in miss
    assert "`hf download ksarge/FlowMo flowmo_hi.pth`" in miss and str(offline_user["home"] / "hub") in miss


def test_a_path_loads_as_load_checkpoint(tmp_path):
    torch.manual_seed(0)
    model, ema = (flowmo_fast.FlowMo(flowmo_fast.load_config(preset="tiny")) for _ in range(2))
    flowmo_fast.save_checkpoint(tmp_path / "two.pth", model, ema_model=ema)
    for which, source in (("ema", ema), ("model", model)):
        got = flowmo_fast.from_pretrained(tmp_path / "two.pth", which=which).state_dict()
        want = source.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), which
    assert resolve_checkpoint(tmp_path / "two.pth") == str(tmp_path / "two.pth")


def test_a_file_named_like_a_published_checkpoint_wins(published_cache, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flowmo_lo").symlink_to(tiny_checkpoint)
    assert resolve_checkpoint("flowmo_lo") == "flowmo_lo"  # never reaches the Hub


def test_a_missing_path_names_the_published_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*flowmo_low.*flowmo_lo, flowmo_hi"):
        flowmo_fast.from_pretrained(tmp_path / "flowmo_low")


def test_tokenizer_from_checkpoint_takes_names(published_cache, tiny_checkpoint):
    tokenizer = flowmo_fast.Tokenizer.from_checkpoint("flowmo_lo")
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(tokenizer.encode(images), flowmo_fast.Tokenizer.from_checkpoint(tiny_checkpoint).encode(images))
