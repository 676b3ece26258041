"""FlowMo with `model.quantization_type=qwen2.5-coder-0.5b[_span_P]` and a tiny random Qwen2 (tests/llm_helpers.py):
shapes, the infilled span, gradients, random streams, checkpoints, config inference and what refuses the type."""

import shutil

import pytest
import torch
from llm_helpers import WIDTH, llm_overrides, save_tiny_qwen2

import flowmo_fast
from flowmo_fast import tokenize
from flowmo_fast.flowmo import flow
from flowmo_fast.flowmo.llm_infill import span_starts
from flowmo_fast.formats.checkpoint import CheckpointError, infer_config, read_checkpoint
from flowmo_fast.noise import SPAN_START, row_generator
from flowmo_fast.sampler_settings import SamplingOptions
from train.step import build_optimizer

pytest.importorskip("transformers")

CODE_LENGTH = 16  # the `tiny` preset's
SPAN = 4  # int(0.3 * 16)
FEW_STEPS = SamplingOptions(steps=2, cfg=1.0, schedule="linear", cfg_interval=None)


def llm_config(folder, quantization_type="qwen2.5-coder-0.5b"):
    return flowmo_fast.load_config(llm_overrides(folder, quantization_type), preset="tiny")


@pytest.fixture(scope="module")
def llm_model(tiny_llm_folder):
    torch.manual_seed(0)
    return flowmo_fast.FlowMo(llm_config(tiny_llm_folder)).eval()


def images(n=3, seed=1):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def changed_positions(before, after):
    """[B, T] bool: the code tokens that differ."""
    return (before != after).any(dim=-1)


def test_forward_shapes_zero_loss_and_an_encoder_as_wide_as_the_llm(llm_model):
    assert llm_model.encoder_context_dim == WIDTH  # no doubling as for KL: the code itself is the LLM's input
    x = images(2)
    llm_model.train()
    try:
        out = llm_model(x, x, torch.rand(2))
    finally:
        llm_model.eval()
    assert out.velocity.shape == x.shape and out.code.shape == (2, CODE_LENGTH, WIDTH)
    q = out.quantizer
    assert q.quantized.shape == (2, CODE_LENGTH, WIDTH) and q.indices is None and q.loss.item() == 0
    assert out.code_with_mask.shape == (2, CODE_LENGTH, WIDTH + 1)
    assert q.per_sample["infill_mse"].shape == (2,) and torch.isfinite(q.breakdown["infill_mse"])


@torch.no_grad()
def test_quantize_replaces_the_span_drawn_from_the_generator_and_nothing_else(llm_model):
    code = torch.randn(5, CODE_LENGTH, WIDTH)
    out = llm_model.quantize(code, torch.Generator().manual_seed(7))
    starts = span_starts(5, CODE_LENGTH, SPAN, torch.Generator().manual_seed(7))
    positions = torch.arange(CODE_LENGTH)
    inside = (positions >= starts[:, None]) & (positions < starts[:, None] + SPAN)  # [B, T]
    assert torch.equal(changed_positions(code, out.quantized), inside)
    infilled = llm_model.quantizer.infiller.infill(code, starts)
    assert torch.equal(out.quantized, infilled.code)
    own = code[inside].view(5, SPAN, WIDTH)
    expected_mse = (infilled.span - own).pow(2).mean(dim=(1, 2))
    torch.testing.assert_close(out.per_sample["infill_mse"], expected_mse, rtol=1e-6, atol=0)
    assert out.loss.item() == 0 and out.breakdown == {}  # eval mode: no loss terms


@torch.no_grad()
def test_the_span_form_sets_how_much_is_infilled(tiny_llm_folder):
    model = flowmo_fast.FlowMo(llm_config(tiny_llm_folder, "qwen2.5-coder-0.5b_span_0.5")).eval()
    code = torch.randn(4, CODE_LENGTH, WIDTH)
    changed = changed_positions(code, model.quantize(code, torch.Generator().manual_seed(0)).quantized)
    assert changed.sum(dim=1).tolist() == [8] * 4  # int(0.5 * 16) consecutive tokens each
    first = changed.int().argmax(dim=1)
    assert all(changed[i, s : s + 8].all() for i, s in enumerate(first.tolist()))


def test_gradients_reach_every_code_token_through_the_llm_and_the_llm_never_changes(llm_model):
    model = llm_model.train()
    llm = model.quantizer.infiller.llm
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    optimizer = build_optimizer(model, model.config)
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not trained & {id(p) for p in llm.parameters()}
    code_grads = []

    def keep_code_grad(module, inputs, code):
        code.register_hook(code_grads.append)

    hook = model.encoder.register_forward_hook(keep_code_grad)
    try:
        loss = flow.rectified_flow_loss(model, images(4), enable_cfg=False).loss
        loss.backward()
        # The span's own code tokens reach the decoder only through the LLM: each token of each sample gets a gradient.
        assert code_grads[0].abs().sum(dim=-1).min() > 0
        assert model.encoder.img_in.weight.grad.abs().sum() > 0
        assert all(not p.requires_grad and p.grad is None for p in llm.parameters())
        optimizer.step()
    finally:
        hook.remove()
        model.zero_grad(set_to_none=True)
        model.eval()
    after = llm.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@torch.no_grad()
def test_reconstruct_rows_take_each_images_span_from_its_own_stream(llm_model):
    x = images(3)
    together = llm_model.reconstruct_rows_with_code(x, [4, 7, 9], 5, FEW_STEPS)
    alone = llm_model.reconstruct_rows_with_code(x[1:2], [7], 5, FEW_STEPS)
    torch.testing.assert_close(together.images[1:2], alone.images, rtol=1e-5, atol=1e-6)
    starts = torch.cat([span_starts(1, CODE_LENGTH, SPAN, row_generator(5, row, SPAN_START)) for row in (4, 7, 9)])
    expected = llm_model.quantizer.infiller.infill(llm_model.encode(x), starts)
    torch.testing.assert_close(together.quantizer.quantized, expected.code, rtol=1e-5, atol=1e-6)
    assert torch.equal(llm_model.reconstruct_rows(x, [4, 7, 9], 5, FEW_STEPS), together.images)


@torch.no_grad()
def test_reconstruct_draws_the_span_then_the_noise_from_the_given_generator(llm_model):
    x = images(3)
    got = llm_model.reconstruct(x, FEW_STEPS, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    quantized = llm_model.quantize(llm_model.encode(x), g).quantized
    expected = llm_model.sample_images(quantized, x.shape[-2:], FEW_STEPS, g)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_checkpoints_hold_no_llm_tensor_and_record_the_llm(llm_model, tiny_llm_folder, tmp_path):
    path = tmp_path / "llm.pth"
    flowmo_fast.save_checkpoint(path, llm_model, total_steps=3)
    ckpt = read_checkpoint(path)
    flowmo_names = set(llm_model.state_dict())
    assert all(k.startswith(("encoder.", "decoder.")) for k in flowmo_names)
    for key in ("model_state_dict", "model_ema_state_dict"):
        assert set(ckpt[key]) == flowmo_names
    assert ckpt["llm"] == {"llm_path": str(tiny_llm_folder), "config_hash": llm_model.quantizer.infiller.config_hash}
    loaded = flowmo_fast.load_checkpoint(path)
    assert loaded.config == llm_model.config
    code = torch.randn(2, CODE_LENGTH, WIDTH)
    with torch.no_grad():
        a = llm_model.quantize(code, torch.Generator().manual_seed(1)).quantized
        b = loaded.quantize(code, torch.Generator().manual_seed(1)).quantized
    assert torch.equal(a, b)


def test_loading_with_another_llm_architecture_names_both(llm_model, tmp_path):
    path = tmp_path / "llm.pth"
    flowmo_fast.save_checkpoint(path, llm_model)
    other = save_tiny_qwen2(tmp_path / "deeper", num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"was trained with the LLM .* but model.llm_path='.*deeper' is a "
                                              r"different architecture .* point model.llm_path"):
        flowmo_fast.load_checkpoint(path, overrides=[f"model.llm_path={other}"])


def test_upstream_weights_of_the_llms_width_are_the_llm_type():
    """A file without config whose code is 896 wide (Qwen2.5-Coder-0.5B's hidden size, not doubled): the seed's
    qwen2.5-coder-0.5b recipe (code_length 128)."""
    shapes = {
        "encoder.txt_in.weight": (768, 896), "decoder.txt_in.weight": (1152, 897), "decoder.img_in.weight": (1152, 48),
        "encoder.double_blocks.0.x": (1,), "decoder.double_blocks.1.x": (1,),
    }
    config = infer_config({k: torch.empty(s) for k, s in shapes.items()})
    m = config.model
    assert (m.quantization_type, m.context_dim, m.code_length) == ("qwen2.5-coder-0.5b", 896, 128)
    assert (m.enc_mup_width, m.mup_width, m.enc_depth, m.dec_depth) == (4, 6, 1, 2)


def test_the_tokenizer_and_tokenize_refuse_the_type_it_has_no_ids(llm_model, tiny_llm_folder, tmp_path):
    with pytest.raises(ValueError, match="needs an LFQ checkpoint; .*='qwen2.5-coder-0.5b', which has no token ids"):
        flowmo_fast.Tokenizer(llm_model)
    gone = shutil.copytree(tiny_llm_folder, tmp_path / "gone")
    config = llm_config(gone)
    flowmo_fast.save_checkpoint(tmp_path / "llm.pth", llm_model, config=config)
    shutil.rmtree(gone)  # refused from its config, before the (now missing) LLM would be loaded
    with pytest.raises(ValueError, match=r"'qwen2.5-coder-0.5b' has no token ids \(its code is continuous"):
        tokenize.main(["--ckpt", str(tmp_path / "llm.pth"), "--out", str(tmp_path / "t"), "--device", "cpu"])
