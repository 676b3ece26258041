"""Model folders by Hugging Face repository id, through huggingface_hub's own download code reading a seeded cache
offline (nothing downloads): the tokenizer and the token generator load equal to the checkpoints they were saved
from; a repository not in the cache fails in one line with the command that fetches it."""

from __future__ import annotations

import json

import pytest
from sharing_helpers import run_offline_user

from flowmo_fast.formats.hub import is_hub_id

REVISION = "89abcdef0123456789abcdef0123456789abcdef"

# Run as a user would: a fresh process whose only Hugging Face settings are HF_HOME and HF_HUB_OFFLINE=1. Each
# model's outputs are compared in that process with those of the checkpoint it was saved from (one thread count).
SCRIPT = """
import json, sys
import torch, flowmo_fast
from flowmo_fast.maskgit import from_pretrained as generator_from_pretrained
from flowmo_fast.maskgit.model import load_generator
from eval import generate
sys.path.insert(0, "tests")
from sharing_helpers import generator_logits, tokenizer_outputs

tokenizer_ckpt, generator_ckpt, out_dir = sys.argv[1:]
out = {}
got, want = (tokenizer_outputs(m) for m in (flowmo_fast.from_pretrained("me/tiny-flowmo"),
                                             flowmo_fast.load_checkpoint(tokenizer_ckpt, which="ema")))
out["tokenizer_equal"] = torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
loaded = generator_from_pretrained("me/tiny-maskgit")
out["generator_path"] = loaded.path
want = generator_logits(load_generator(generator_ckpt).model)
out["generator_equal"] = torch.equal(generator_logits(loaded.model), want)
generate.main(["--generator", "me/tiny-maskgit", "--out", out_dir, "--per-class", "1", "--steps", "2",
               "--device", "cpu"])
try:
    flowmo_fast.from_pretrained("me/not-cached")
except FileNotFoundError as e:
    out["miss"] = str(e)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def offline_user(tokenizer_folder, generator_folder, tokenizer_run_checkpoint, generator_run_checkpoint,
                 tmp_path_factory, seed_hub) -> dict:
    home = tmp_path_factory.mktemp("hf-home-shared")
    for repo_id, folder in (("me/tiny-flowmo", tokenizer_folder), ("me/tiny-maskgit", generator_folder)):
        seed_hub(home / "hub", {p.name: p for p in folder.iterdir()}, REVISION, repo_id)
    out = tmp_path_factory.mktemp("generated") / "gen"
    result = run_offline_user(SCRIPT, home, str(tokenizer_run_checkpoint), str(generator_run_checkpoint), str(out))
    return {**result, "home": home, "out": out}


def test_a_tokenizer_loads_by_repo_id_from_the_cache(offline_user):
    assert offline_user["tokenizer_equal"] is True


def test_a_generator_loads_by_repo_id_from_the_cache_and_eval_generate_takes_it(offline_user):
    snapshot = offline_user["home"] / "hub" / "models--me--tiny-maskgit" / "snapshots" / REVISION
    assert offline_user["generator_path"] == str(snapshot / "model.safetensors")
    assert offline_user["generator_equal"] is True
    manifest = json.loads((offline_user["out"] / "manifest.json").read_text())
    assert manifest["complete"] and manifest["generation"]["generator"]["path"] == str(snapshot / "model.safetensors")


def test_a_repo_not_in_the_cache_offline_fails_naming_it_and_the_fetch_command(offline_user):
    assert offline_user["miss"] == (
        f"config.json (from me/not-cached) is not in the Hugging Face cache {offline_user['home'] / 'hub'} and "
        "HF_HUB_OFFLINE is set: fetch it with `hf download me/not-cached` where the Hub is reachable (into the same "
        "cache), or pass the path of a downloaded copy")


@pytest.mark.parametrize("name, hub", [("me/repo", True), ("org-x/model.v2_1", True), ("flowmo_lo", False),
                                       ("/abs/path", False), ("a/b/c", False), ("results/../x", False),
                                       ("./x", False), ("me/", False), ("me/re..po", False)])
def test_what_reads_as_a_repo_id(name, hub):
    assert is_hub_id(name) is hub
