"""train.generator end to end on the CPU, the `tiny` preset with the paper presets' dropout and clipping, on token
rows whose answer is known (each class one fixed pattern): the masked-token loss falls, checkpoints load with
`load_generator` and record the tokens' tokenizer, a run stopped by SIGTERM and resumed equals the straight run bit
for bit (dropout's draws included), FSDP2 trains, and mistakes end in one line."""

from __future__ import annotations

import contextlib
import io
import socket

import numpy as np
import pytest
import torch
from generator_helpers import TOKENIZER_SHA, pattern_rows, write_token_folder
from train_helpers import assert_same_training_state, check, log_lines, run_command, stop_with_sigterm

from flowmo_fast.formats.checkpoint import read_checkpoint
from flowmo_fast.formats.token_shards import TokenSpec
from flowmo_fast.maskgit.model import GeneratorConfig, TokenGenerator, load_generator
from train import generator, train_state
from train.generator_config import make_config
from train.generator_data import TokenBatch, TokenLayout

TINY = ["--preset", "tiny", "data.batch_size=8", "trainer.log_every=5",
        "model.dropout=0.1", "model.attention_dropout=0.1"]  # B and L's dropout (and every preset's clipping)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    rows, labels = pattern_rows(64, classes=2)
    return write_token_folder(tmp_path_factory.mktemp("tokens"), rows, labels)


def train(argv: list, capsys) -> tuple[int, str]:
    code = generator.main([str(a) for a in argv])
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def straight(tokens, tmp_path_factory):
    """One process, 40 steps, checkpoints every 10 (all kept); run inside the test process (a group of one)."""
    results = tmp_path_factory.mktemp("results")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MASTER_PORT", str(port))
        for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
            env.setenv(key, value)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = generator.main([str(a) for a in [
                "--tokens", tokens, *TINY, "--results-dir", results, "--experiment-name", "a", "trainer.max_steps=40",
                "trainer.checkpoint_every=10", "trainer.keep_every=10"]])
        torch.set_num_threads(threads)
    assert code == 0, out.getvalue()[-3000:]
    return results / "a", out.getvalue()


def test_masked_token_loss_falls_and_checkpoints_load(straight, tokens):
    log_dir, stdout = straight
    logs = log_lines(stdout)
    assert sorted(logs) == list(range(5, 41, 5))
    first, last = logs[5], logs[40]
    # 40 steps take the loss from ln(512) ~ 6.2 to ~4.7 and the accuracy from chance to the class patterns' ~0.5
    assert np.isfinite(first["total_loss"]) and last["total_loss"] < 0.85 * first["total_loss"], (first, last)
    assert last["masked_token_accuracy"] > 0.4 and first["masked_token_accuracy"] < 0.1, (first, last)
    assert last["images_per_sec"] > 0 and "lr" in last and "skipped_images" not in last  # rows never fail
    assert [train_state.step_of(p) for p in train_state.list_checkpoints(str(log_dir))] == [10, 20, 30, 40]
    loaded = load_generator(log_dir / "checkpoints" / "00000040.pth")
    assert loaded.total_steps == 40 and not loaded.model.training
    assert loaded.model.config.num_classes == 2 and loaded.model.config.code_length == 16
    assert loaded.source.checkpoint["sha256"] == TOKENIZER_SHA and loaded.source.tokenizer_config["model"]["context_dim"] == 18
    ckpt = read_checkpoint(log_dir / "checkpoints" / "00000040.pth")
    assert ckpt["data_position"] == 40 * 8 and ckpt["world_size"] == 1
    assert ckpt["config"]["opt"]["lr"] == 1e-3 and ckpt["config"]["trainer"]["ema_decay"] == 0.99
    assert (log_dir / "config.json").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert {"total_loss", "masked_token_accuracy", "images_per_sec", "lr"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("masked_token_accuracy")] == list(range(5, 41, 5))


def test_a_stopped_and_resumed_run_equals_the_straight_run(straight, tokens, tmp_path, lone_process, capsys):
    """SIGTERM part way (the run saves where it stopped), then the same command again: the straight run's
    step-40 weights, EMA, optimizer state and data position, bit for bit."""
    reference_dir, _ = straight
    args = ["train.generator", "--tokens", tokens, *TINY, "--results-dir", tmp_path, "--experiment-name", "b",
            "trainer.max_steps=40", "trainer.log_every=1", "trainer.checkpoint_every=1000"]
    step = stop_with_sigterm(args)
    assert 3 <= step < 40 and [train_state.step_of(p) for p in train_state.list_checkpoints(str(tmp_path / "b"))] == [step]

    code, stdout = train(args[1:], capsys)
    assert code == 0, stdout[-3000:]
    assert f"resuming from {tmp_path / 'b' / 'checkpoints' / ('%08d.pth' % step)} (step {step})" in stdout
    assert_same_training_state(tmp_path / "b" / "checkpoints" / "00000040.pth", reference_dir / "checkpoints" / "00000040.pth")


def test_the_objective_gives_the_labels_to_a_class_conditional_generator_only():
    """A class-conditional generator (no label dropout) sees each row's class; one trained without classes on
    labelled shards sees the null class. Loss and accuracy would fall without the labels too (visible groups give
    the class away), so this is checked where the classes enter the network."""
    ids, labels = torch.randint(0, 512, (6, 8)), torch.tensor([0, 1, 2, 2, 1, 0])
    for num_classes, expected in ((3, labels), (0, torch.zeros(6, dtype=torch.long))):
        torch.manual_seed(0)
        model = TokenGenerator(GeneratorConfig(4, 2, 9, num_classes=num_classes, class_dropout=0.0))
        seen = []
        model.register_forward_pre_hook(lambda module, args, seen=seen: seen.append(args[1]))  # the classes [B]
        loss, logged = generator.GeneratorObjective(model)(TokenBatch(ids, labels))
        assert torch.equal(seen[0], expected), (num_classes, seen[0])
        assert loss.isfinite() and set(logged) == {"total_loss", "masked_token_accuracy"}


def one_line_error(argv: list) -> str:
    with pytest.raises(SystemExit) as stop:
        generator.main([str(a) for a in argv])
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def test_shards_it_cannot_use_end_in_one_line(tmp_path):
    common = ["--results-dir", tmp_path, "--experiment-name", "x", "trainer.max_steps=0"]  # missed: no training
    (tmp_path / "photos").mkdir()
    assert "no manifest.json" in one_line_error(["--tokens", tmp_path / "photos", *common])
    kl = write_token_folder(tmp_path / "kl", np.zeros((4, 16, 36)), spec=TokenSpec("latents", "float16", (16, 36)))
    assert "holds latents" in one_line_error(["--tokens", kl, *common])
    rows, _ = pattern_rows(8)
    unlabelled = write_token_folder(tmp_path / "unlabelled", rows)
    message = one_line_error(["--tokens", unlabelled, "--preset", "B", *common])
    assert "no class labels, but preset B is class-conditional" in message and "model.num_classes=0" in message
    assert "model.num_classes=3" in one_line_error(["--tokens", unlabelled, *TINY, "model.num_classes=3", *common])
    assert "model.code_length=8" in one_line_error(["--tokens", unlabelled, *TINY, "model.code_length=8", *common])
    rows, labels = pattern_rows(8, classes=2)
    labelled = write_token_folder(tmp_path / "labelled", rows, labels)
    message = one_line_error(["--tokens", labelled, *TINY, "model.num_classes=3", *common])
    assert "model.num_classes=3, but the token shards have 2 classes" in message


def test_a_run_resumed_on_tokens_of_another_tokenizer_ends_in_one_line(tmp_path, lone_process, capsys):
    rows, labels = pattern_rows(8, classes=2)
    first = write_token_folder(tmp_path / "first", rows, labels)
    other = write_token_folder(tmp_path / "other", rows, labels, sha256="0f" * 32)
    common = [*TINY, "--results-dir", tmp_path, "--experiment-name", "r", "trainer.max_steps=1"]
    code, _ = train(["--tokens", first, *common], capsys)
    assert code == 0
    code, stdout = train(["--tokens", other, *common, "trainer.max_steps=2"], capsys)
    errors = [line for line in stdout.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "sha256 5e5e5e5e5e5e), but --tokens" in errors[0], stdout[-2000:]
    assert train_state.list_checkpoints(str(tmp_path / "r"))[-1].endswith("00000001.pth")
    start = ["--resume-from-ckpt", tmp_path / "r" / "checkpoints" / "00000001.pth"]  # its weights, other tokens
    code, stdout = train(["--tokens", other, *common, "--experiment-name", "s", *start, "trainer.max_steps=2"], capsys)
    errors = [line for line in stdout.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "or start without --resume-from-ckpt" in errors[0], stdout[-2000:]
    code, _ = train(["--tokens", first, *common, "--experiment-name", "s", *start, "trainer.max_steps=2"], capsys)
    assert code == 0


@pytest.mark.distributed
def test_two_processes_under_fsdp_train_and_write_whole_tensors(straight, tokens, tmp_path):
    """torchrun, 2 processes, FSDP2 over the generator's blocks: the checkpoint holds whole tensors (the one-process
    run's names and shapes), both ranks' RNG states and each rank's data position; it loads with load_generator."""
    reference_dir, _ = straight
    stdout = check(run_command([
        "train.generator", "--tokens", tokens, *TINY, "--results-dir", tmp_path, "--experiment-name", "fsdp",
        "trainer.fsdp=true", "trainer.max_steps=10", "trainer.checkpoint_every=10",
    ], nproc=2))
    assert "TokenGenerator: 0.17M parameters; FSDP2" in stdout
    logs = log_lines(stdout)
    assert np.isfinite(logs[10]["total_loss"]) and logs[10]["total_loss"] < logs[5]["total_loss"]
    ckpt = read_checkpoint(tmp_path / "fsdp" / "checkpoints" / "00000010.pth")
    reference = read_checkpoint(reference_dir / "checkpoints" / "00000010.pth")
    for key in ("model_state_dict", "model_ema_state_dict"):
        assert {k: v.shape for k, v in ckpt[key].items()} == {k: v.shape for k, v in reference[key].items()}
    assert ckpt["world_size"] == 2 and len(ckpt["rng_state_per_rank"]) == 2 and ckpt["data_position"] == 10 * 8
    assert ckpt["optimizer_state_dict"]["state"].keys() == reference["optimizer_state_dict"]["state"].keys()
    assert load_generator(tmp_path / "fsdp" / "checkpoints" / "00000010.pth").total_steps == 10


def test_presets_and_overrides_build_the_generator_for_the_shards():
    lo_imagenet = TokenLayout(code_length=256, context_dim=18, bits=9, num_classes=1000)  # FlowMo-Lo ImageNet tokens
    config = make_config("L", lo_imagenet, ["opt.lr=2e-4", "model.depth=12", "trainer.max_steps=1000"])
    model = config.model
    assert (model.code_length, model.groups, model.bits, model.num_classes) == (256, 2, 9, 1000)
    assert (model.width, model.depth, model.heads) == (1024, 12, 16)  # L's width, the override's depth
    assert config.opt.lr == 2e-4 and config.trainer.max_steps == 1000 and config.data.batch_size == 32
    assert (config.opt.warmup_steps, config.opt.lr_decay, config.opt.weight_decay) == (5000, "cosine", 0.045)
    for preset in ("B", "L"):  # MaskBit's dropout and clipping; tiny (tests, the CPU demo) trains without dropout
        recipe = make_config(preset, lo_imagenet, [])
        assert (recipe.model.dropout, recipe.model.attention_dropout, recipe.trainer.max_grad_norm) == (0.1, 0.1, 1.0)
    tiny = make_config("tiny", lo_imagenet, []).model
    assert (tiny.dropout, tiny.attention_dropout) == (0.0, 0.0)
    unlabelled = TokenLayout(code_length=256, context_dim=56, bits=14, num_classes=0)  # FlowMo-Hi, no classes
    assert make_config("B", unlabelled, ["model.num_classes=0"]).model.groups == 4  # unconditional on request
    with pytest.raises(ValueError, match="preset B is class-conditional"):
        make_config("B", unlabelled, [])
    assert make_config("tiny", unlabelled, []).model.num_classes == 0  # tiny follows the shards
