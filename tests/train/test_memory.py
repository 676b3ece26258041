"""train.memory: the constants of the estimate are the bytes autograd keeps (measured again here, as the module
docstring derives them), the estimate of a micro-batch's activations is the peak memory the CPU allocator reports
over a training forward + backward (torch.profiler), the parameter counts are the model's, and opt.n_grad_acc is
fitted to a memory limit: the trainer says so in one line, trains with it, and refuses in one line when not even
one image fits. bf16 autocast is measured under the CPU's autocast (the same casts as CUDA's for this network)."""

from __future__ import annotations

import contextlib
import dataclasses
import json

import pytest
import torch

import flowmo_fast
from flowmo_fast.distributed import Processes
from flowmo_fast.flowmo import flow
from flowmo_fast.flowmo.mmdit import position_ids
from flowmo_fast.formats.checkpoint import read_checkpoint
from flowmo_kernels.rope import rope_tables
from train import memory, pretrain
from train.tokenizer import fit_memory, memory_limit
from train.train_state import Progress

ONE = Processes(0, 1, 0, torch.device("cpu"))
PRECISIONS = {False: memory.FLOAT32, True: memory.BF16_AUTOCAST}  # bf16 autocast on?


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False) if bf16 else contextlib.nullcontext()


def saved_bytes(fn, parameters) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn()` runs, parameters left out."""
    skip = {p.untyped_storage().data_ptr() for p in parameters}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def per_image(measure) -> float:
    """measure(batch) at batch 2 minus batch 1: what one more image costs (the batch-independent part cancels)."""
    return measure(2) - measure(1)


def tiny(*overrides: str) -> flowmo_fast.FlowMo:
    torch.manual_seed(0)
    return flowmo_fast.FlowMo(flowmo_fast.load_config(preset="tiny", overrides=["model.kernels=torch", *overrides]))


def block_bytes(model, tower: str, keep: str, bf16: bool) -> float:
    """Bytes per token x channel one image keeps in one of `tower`'s blocks (16 code + 64 image tokens)."""
    mmdit = getattr(model, tower)
    block, width, dtype = mmdit.double_blocks[0], mmdit.params.hidden_size, torch.bfloat16 if bf16 else torch.float32
    rope = rope_tables(position_ids(16, 8, 8, "cpu"), mmdit.params.axes_dim, mmdit.params.theta)

    def measure(b: int) -> int:
        img, txt = (torch.randn(b, n, width, dtype=dtype, requires_grad=True) for n in (64, 16))
        vec = torch.randn(b, width, dtype=dtype, requires_grad=True) if tower == "decoder" else None
        with autocast(bf16):
            return saved_bytes(lambda: block(img, txt, vec, rope, model.ops(img.device), model.attention, keep=keep),
                               model.parameters())

    return per_image(measure) / (80 * width)


@pytest.mark.parametrize("bf16", [False, True])
def test_block_constants_are_the_bytes_autograd_keeps(bf16):
    model, constants = tiny(), PRECISIONS[bf16]
    for tower, kept, per in (("encoder", "txt", constants.encoder), ("decoder", "img", constants.decoder)):
        both, one = block_bytes(model, tower, "both", bf16), block_bytes(model, tower, kept, bf16)
        assert both == pytest.approx(per.attention + per.tail, rel=0.01), tower
        tokens = 16 if kept == "txt" else 64
        assert one == pytest.approx(per.block(80, tokens, 1) / 80, rel=0.01), (tower, kept)


@pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")  # lpips's torchvision call
def test_perceptual_constants_are_the_bytes_autograd_keeps():
    lpips = pytest.importorskip("lpips")
    import torchvision

    with torch.device("meta"):  # built without initializing VGG-16's classifier (unused by LPIPS): values do not matter
        net = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    net = net.to_empty(device="cpu").eval().requires_grad_(False)
    for tensor in (*net.parameters(), *net.buffers()):
        tensor.data.fill_(0.01)
    assert sum(p.numel() for p in net.parameters()) == memory.VGG16_PARAMETERS
    with torch.device("meta"):
        assert sum(p.numel() for p in torchvision.models.resnet50().parameters()) == memory.RESNET50_PARAMETERS
    for bf16, constants in PRECISIONS.items():
        def measure(b: int) -> int:
            x = torch.rand(b, 3, 32, 32, requires_grad=True)
            with autocast(bf16):
                return saved_bytes(lambda: net(x, torch.rand(b, 3, 32, 32)).mean(), net.parameters())

        assert per_image(measure) / 32**2 == pytest.approx(constants.lpips, rel=0.01)


def peak_bytes(step) -> int:
    """The peak of live CPU allocations over `step()` (the profiler's allocation and free events, in order)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def peak_per_image(model, bf16: bool) -> float:
    """The peak of a training forward + backward of 2 images minus that of 1 (the gradients already there, as in
    training after its first step)."""
    def step(batch: int):
        images = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch)) * 2 - 1
        with autocast(bf16):  # backward too: the CPU autocasts the LFQ's matmul, not its hand-written backward's
            flow.rectified_flow_loss(model, images).loss.backward()

    step(1)
    return per_image(lambda batch: peak_bytes(lambda: step(batch)))


@pytest.mark.parametrize("bf16", [False, True])
def test_activation_estimate_is_the_peak_memory_of_a_training_step(bf16):
    """Eager: the estimate within 5% of the measured peak per image; checkpointed, an upper bound within 20% (it
    counts every block input as alive while the largest block is recomputed; backward has freed some by then) and
    a third or less of eager."""
    placement, measured = memory.Placement(bf16=bf16), {}
    for checkpointed in (False, True):
        model = tiny("model.dec_depth=3", f"trainer.activation_checkpointing={checkpointed}")
        model.activation_checkpointing = checkpointed
        measured[checkpointed] = peak_per_image(model, bf16)
        estimate = memory.activations_per_image(model.config, placement)
        low, high = (0.95, 1.05) if not checkpointed else (1.0, 1.2)
        assert low <= estimate / measured[checkpointed] <= high, (checkpointed, estimate, measured[checkpointed])
    assert measured[True] < measured[False] / 3


def test_parameter_counts_are_the_models():
    model = tiny("model.dec_depth=3")
    counts = memory.parameter_counts(model.config)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.trained == sum(p.numel() for p in model.parameters() if p.requires_grad) < counts.total
    assert counts.block_matrices == max(sum(p.numel() for p in b.parameters() if p.requires_grad and p.ndim == 2)
                                        for b in (*model.encoder.double_blocks, *model.decoder.double_blocks))
    frozen = memory.parameter_counts(model.config, encoder_trained=False)
    assert frozen.trained == sum(p.numel() for p in model.decoder.parameters() if p.requires_grad)
    state = memory.estimate_memory(model.config, 1, memory.Placement(bf16=False))
    assert (state.weights, state.gradients, state.optimizer, state.ema) == (
        4 * counts.total, 4 * counts.trained, 8 * counts.trained, 4 * counts.total)


def test_fsdp_shards_the_state_and_checkpointing_keeps_one_blocks_weight_copies():
    config = flowmo_fast.load_config(preset="flowmo_lo")
    fsdp = flowmo_fast.load_config(preset="flowmo_lo", overrides=["trainer.fsdp=true"])
    whole, sharded = (memory.estimate_memory(c, 4, memory.Placement(processes=8)) for c in (config, fsdp))
    assert sharded.optimizer == whole.optimizer // 8 and sharded.activations == whole.activations
    assert whole.weights // 8 < sharded.weights < whole.weights // 2  # a shard + the units being gathered
    counts = memory.parameter_counts(config)
    copies = memory.memory_model(config).weight_copies
    assert copies == 2 * counts.trained_matrices + 2 * memory.VGG16_PARAMETERS  # flowmo_lo trains with LPIPS
    checkpointed = flowmo_fast.load_config(preset="flowmo_lo", overrides=["trainer.activation_checkpointing=true"])
    assert memory.memory_model(checkpointed).weight_copies == 2 * counts.block_matrices + 2 * memory.VGG16_PARAMETERS


def test_fit_takes_the_least_n_grad_acc_from_the_configured_one_that_fits():
    config = flowmo_fast.load_config(preset="flowmo_lo", overrides=["data.batch_size=16", "opt.n_grad_acc=2"])
    model = memory.memory_model(config)
    for gib in (24, 40, 48, 80, 200):
        limit = gib * memory.GIB
        largest = model.largest_fitting(limit)
        assert largest == 0 or memory.fits(model.at(largest), limit)
        assert not memory.fits(model.at(largest + 1), limit)
        if largest == 0:
            with pytest.raises(memory.DoesNotFit) as refused:
                memory.fit_grad_acc(config, limit)
            assert "\n" not in str(refused.value) and "trainer.activation_checkpointing=true" in str(refused.value)
            continue
        n = memory.fit_grad_acc(config, limit).n_grad_acc
        assert 16 % n == 0 and 16 // n <= largest and n >= 2  # never below the configured 2
        assert all(16 % k or 16 // k > largest for k in range(2, n))  # no smaller one fits
    assert memory.fit_grad_acc(config, 200 * memory.GIB).n_grad_acc == 2


def test_no_limit_on_the_cpu_prints_the_estimate_and_keeps_the_config(capsys):
    config = flowmo_fast.load_config(preset="tiny")
    assert fit_memory(config, ONE, Progress()) is config
    out = capsys.readouterr().out.strip()
    assert "\n" not in out and out.startswith("memory per process, estimated (float32): ")
    assert "for a micro-batch of 4 = weights" in out and "no limit given" in out


def limit_between(config, small: int, large: int) -> float:
    """A trainer.memory_gib in which a micro-batch of `small` fits and one of `large` does not."""
    model = memory.memory_model(config, memory.Placement(bf16=False))
    return (model.at(small).total + model.at(large).total) / 2 / memory.FIT_FRACTION / memory.GIB


def test_trainer_fits_n_grad_acc_to_the_memory_limit_and_refuses_when_one_image_does_not_fit(
        lone_process, tmp_path, capsys):
    common = ["--preset", "tiny", "--results-dir", str(tmp_path), "data.batch_size=8", "opt.n_grad_acc=1",
              "trainer.max_steps=1", "trainer.sample_every=1000"]
    gib = limit_between(flowmo_fast.load_config(preset="tiny", overrides=common[4:]), 4, 8)
    assert pretrain.main([*common, "--experiment-name", "fit", f"trainer.memory_gib={gib}"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("memory per process")]
    assert len(lines) == 1 and "for a micro-batch of 4 = " in lines[0] and "opt.n_grad_acc 1 -> 2" in lines[0]
    assert json.loads((tmp_path / "fit" / "config.json").read_text())["opt"]["n_grad_acc"] == 2
    assert read_checkpoint(tmp_path / "fit" / "checkpoints" / "00000001.pth")["config"]["opt"]["n_grad_acc"] == 2
    assert pretrain.main([*common, "--experiment-name", "no", "trainer.memory_gib=0.01"]) == 2
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not even a micro-batch of 1 fits in 0.01 GiB per process" in errors[0]
    assert not (tmp_path / "no" / "checkpoints").exists()


def test_frozen_encoder_needs_less():
    config = flowmo_fast.load_config(preset="flowmo_lo")
    trained, frozen = (memory.estimate_memory(config, 4, memory.Placement(encoder_trained=e)) for e in (True, False))
    assert frozen.activations < trained.activations and frozen.optimizer < trained.optimizer
    assert dataclasses.replace(frozen, activations=0).total < dataclasses.replace(trained, activations=0).total


def test_memory_limit_key_is_checked():
    for value in ("0", "-2"):
        with pytest.raises(ValueError, match=f"trainer.memory_gib={float(value)}: must be a positive number of GiB"):
            flowmo_fast.load_config(["trainer.memory_gib=" + value])
    assert flowmo_fast.load_config(["trainer.memory_gib=24"]).trainer.memory_gib == 24.0


def test_the_limit_is_the_key_else_what_the_gpu_has_free(monkeypatch):
    """On CUDA (faked: no GPU here) the limit is the free memory plus what this process already holds."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (20 * memory.GIB, 24 * memory.GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: memory.GIB)
    gpu = Processes(0, 1, 0, torch.device("cuda", 0))
    assert memory_limit(flowmo_fast.load_config(), gpu) == (21 * memory.GIB, "free on cuda:0")
    given = flowmo_fast.load_config(["trainer.memory_gib=8"])
    assert memory_limit(given, gpu) == (8 * memory.GIB, "trainer.memory_gib")
    assert memory_limit(flowmo_fast.load_config(), ONE) == (None, "")


def test_post_training_chain_counts_only_where_it_runs():
    """The chain feeds the perceptual loss alone (FlowMoObjective.prediction): with opt.lpips_weight=0 it never
    runs; with it, one more decoder pass is recomputed in backward (eager: more than the training pass's decoder)."""
    def per_image(*overrides: str) -> float:
        config = flowmo_fast.load_config(preset="flowmo_lo", overrides=["opt.lpips_mode=resnet", *overrides])
        return memory.activations_per_image(config, memory.Placement())

    assert per_image("model.posttrain_sample=true", "opt.lpips_weight=0") == per_image("opt.lpips_weight=0")
    extra = per_image("model.posttrain_sample=true", "opt.lpips_weight=0.01") - per_image("opt.lpips_weight=0.01")
    assert 0.5 * per_image("opt.lpips_weight=0") < extra < per_image("opt.lpips_weight=0")
