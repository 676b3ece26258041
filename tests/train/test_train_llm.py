"""train.pretrain with `model.quantization_type=qwen2.5-coder-0.5b` and a tiny random Qwen2 (tests/llm_helpers.py),
in this process (one-process group): a run stopped and resumed equals a straight run, checkpoints hold no LLM
tensor, and a missing or different LLM ends the command with one line."""

from __future__ import annotations

import pytest
import torch
from llm_helpers import llm_overrides, save_tiny_qwen2
from test_train_runs import log_lines, run_in_process

from flowmo_fast.formats.checkpoint import read_checkpoint
from train import pretrain

pytest.importorskip("transformers")

TINY = ["--preset", "tiny", "data.image_size=16", "data.batch_size=2", "trainer.log_every=1",
        "trainer.checkpoint_every=2", "trainer.sample_every=1000"]


def train(folder, results, name: str, steps: int, capsys) -> str:
    code, stdout = run_in_process(pretrain.main, [
        *TINY, *llm_overrides(folder), "--results-dir", results, "--experiment-name", name,
        f"trainer.max_steps={steps}",
    ], capsys)
    assert code == 0, stdout[-3000:]
    return stdout


@pytest.fixture(scope="module")
def llm_flowmo_names():
    import flowmo_fast

    with torch.device("meta"):  # the parameters of the same FlowMo without the LLM type: the encoder, the decoder
        model = flowmo_fast.FlowMo(flowmo_fast.load_config(["model.quantization_type=noop", "model.context_dim=16"],
                                                           preset="tiny"))
    return set(model.state_dict())


def test_stop_and_resume_equals_a_straight_run_and_checkpoints_hold_no_llm(
    tiny_llm_folder, llm_flowmo_names, lone_process, tmp_path, capsys
):
    straight = train(tiny_llm_folder, tmp_path, "straight", 4, capsys)
    train(tiny_llm_folder, tmp_path, "resumed", 2, capsys)  # stops after step 2 with its checkpoint
    resumed = train(tiny_llm_folder, tmp_path, "resumed", 4, capsys)
    assert f"resuming from {tmp_path / 'resumed' / 'checkpoints' / '00000002.pth'}" in resumed
    a = read_checkpoint(tmp_path / "straight" / "checkpoints" / "00000004.pth")
    b = read_checkpoint(tmp_path / "resumed" / "checkpoints" / "00000004.pth")
    for key in ("model_state_dict", "model_ema_state_dict"):
        assert set(a[key]) == llm_flowmo_names  # no LLM tensor, nothing beside the encoder and the decoder
        for name, value in a[key].items():
            assert torch.equal(b[key][name], value), (key, name)
    for pid, state in a["optimizer_state_dict"]["state"].items():
        for k, v in state.items():
            assert torch.equal(b["optimizer_state_dict"]["state"][pid][k], v), (pid, k)
    assert a["llm"]["llm_path"] == str(tiny_llm_folder) and len(a["llm"]["config_hash"]) == 64
    logs = log_lines(straight)
    assert sorted(logs) == [1, 2, 3, 4] and all(logs[s]["quantizer_loss"] == 0 for s in logs)
    assert all(0 < logs[s]["quantizer/infill_mse"] < float("inf") for s in logs)
    terms = ("diffusion_loss", "quantizer_loss", "quantizer/infill_mse", "total_loss")
    assert [log_lines(resumed)[4][t] for t in terms] == [logs[4][t] for t in terms]

    other = save_tiny_qwen2(tmp_path / "deeper", num_hidden_layers=3)  # same width, another architecture
    code, stdout = run_in_process(pretrain.main, [
        *TINY, *llm_overrides(other), "--results-dir", tmp_path, "--experiment-name", "resumed", "trainer.max_steps=6",
    ], capsys)
    assert code == 2 and f"but model.llm_path='{other}' is a different architecture" in stdout


def test_a_missing_llm_ends_the_command_with_one_line_before_anything_starts(tmp_path, capsys):
    missing = tmp_path / "no_such_llm"
    with pytest.raises(SystemExit) as stopped:
        pretrain.main([*TINY, *llm_overrides(missing), "--results-dir", str(tmp_path), "--experiment-name", "x"])
    message = str(stopped.value.code)
    assert message.startswith(f"error: model.llm_path='{missing}': no such folder") and "\n" not in message
    assert "hf download Qwen/Qwen2.5-Coder-0.5B" in message
    assert not (tmp_path / "x").exists()  # no experiment folder: nothing started


def test_an_llm_that_does_not_fit_names_the_key_to_change(tiny_llm_folder, tmp_path):
    with pytest.raises(SystemExit, match=r"model.context_dim=18 but .* hidden size 16: set model.context_dim=16"):
        pretrain.main([*TINY, *llm_overrides(tiny_llm_folder), "model.context_dim=18", "--results-dir", str(tmp_path)])
