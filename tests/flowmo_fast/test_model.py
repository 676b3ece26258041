"""FlowMo model: published layouts, shapes, non-square images, quantizers, and skipped dead compute."""

import json
from pathlib import Path

import pytest
import torch

import flowmo_fast
from flowmo_fast.flowmo.mmdit import patchify, unpatchify
from flowmo_fast.formats.checkpoint import check_state_dict

MANIFESTS = json.loads((Path(__file__).parents[1] / "fixtures" / "checkpoint_manifests.json").read_text())


@pytest.mark.parametrize("preset", ["flowmo_lo", "flowmo_hi", "flowmo_hi_kl"])
def test_published_manifest_loads_strictly_into_meta_model(preset):
    manifest = MANIFESTS[preset]
    config = flowmo_fast.load_config(manifest["overrides"])
    assert config == flowmo_fast.load_config(preset=preset)
    with torch.device("meta"):
        model = flowmo_fast.FlowMo(config)
        state_dict = {k: torch.empty(shape) for k, shape in manifest["keys"].items()}
    check_state_dict(model, state_dict, preset)
    model.load_state_dict(state_dict, strict=True, assign=True)
    assert sum(p.numel() for p in model.parameters()) == manifest["n_params"]


def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 3, 8, 12)
    patches = patchify(x, 4)
    assert patches.shape == (2, 6, 48)
    # patch (row 1, col 2), pixel (ph=3, pw=1), channel 2 sits at feature (3 * 4 + 1) * 3 + 2
    assert patches[0, 1 * 3 + 2, (3 * 4 + 1) * 3 + 2] == x[0, 2, 4 + 3, 8 + 1]
    assert torch.equal(unpatchify(patches, 4, 8, 12), x)


@torch.no_grad()
def test_non_square_images(tiny_model):
    images = torch.rand(2, 3, 16, 40) * 2 - 1
    code = tiny_model.encode(images)
    assert code.shape == (2, 16, 18)
    quantized = tiny_model.quantize(code).quantized
    v = tiny_model.decode(images, tiny_model.with_mask(quantized), torch.rand(2))
    assert v.shape == images.shape
    assert tiny_model.reconstruct(images, tiny_model.sampling().replace(steps=2)).shape == images.shape


def test_bad_inputs_name_the_problem(tiny_model):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tiny_model.encode(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        tiny_model.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="floating point"):
        tiny_model.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"code must be \[B, 16, 18\]"):
        tiny_model.quantize(torch.zeros(1, 16, 19))
    with pytest.raises(ValueError, match="allowed: auto, triton, torch"):
        tiny_model.kernels = "cuda"
    images = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="output='code'; allowed: img, txt"):
        tiny_model.encoder(images, torch.zeros(1, 16, 18), None, tiny_model.ops(images.device), output="code")
    block = tiny_model.decoder.double_blocks[0]
    with pytest.raises(ValueError, match="keep='image'; allowed: both, img, txt"):
        block(None, None, None, None, None, None, keep="image")


@pytest.mark.parametrize("quantization", ["kl", "noop"])
def test_kl_and_noop_quantizers(quantization):
    torch.manual_seed(0)
    model = flowmo_fast.FlowMo(flowmo_fast.load_config([f"model.quantization_type={quantization}"], preset="tiny"))
    code = torch.randn(3, 16, model.encoder_context_dim)
    model.train()
    out = model.quantize(code)
    quantized, indices, loss = out.quantized, out.indices, out.loss
    assert quantized.shape == (3, 16, 18) and indices is None
    if quantization == "kl":
        mean, logvar = code[..., :18], code[..., 18:].clamp(-30, 20)
        ref = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2)).mean()
        assert torch.allclose(loss, ref)
        g = torch.Generator().manual_seed(3)
        noise = torch.randn((3, 18, 16), generator=g).transpose(1, 2)  # upstream's (f t) draw order
        out = model.quantize(code, generator=torch.Generator().manual_seed(3)).quantized
        assert torch.allclose(out, mean + (0.5 * logvar).exp() * noise)
    else:
        assert torch.equal(quantized, code) and loss.item() == 0
    model.eval()
    assert model.quantize(code).loss.item() == 0


def upstream_position_ids(code_length: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Upstream's RoPE ids written out one by one (shared/reference/README.md): code token i -> (i, i, i), then
    the image patches row by row, patch (row r of grid_h, column c of grid_w) -> (0, r, c). [L, 3] float32."""
    ids = [[i, i, i] for i in range(code_length)]
    ids += [[0, r, c] for r in range(grid_h) for c in range(grid_w)]
    return torch.tensor(ids, dtype=torch.float32)


def full_mmdit(mmdit, images, code, timesteps, ops, output, transpose_grid=False):
    """The MMDiT computed in full (every stream of every block), as upstream does, with hand-built position ids
    (`transpose_grid`: the wrong ids, width and height swapped)."""
    from flowmo_fast.flowmo.attention import sdpa
    from flowmo_kernels.rope import rope_tables

    p = mmdit.params.patch_size
    h, w = images.shape[-2:]
    ids = upstream_position_ids(code.shape[1], h // p, w // p)
    if transpose_grid:
        ids = upstream_position_ids(code.shape[1], w // p, h // p)[:, [0, 2, 1]]
    rope = rope_tables(ids, mmdit.params.axes_dim)
    img, txt = mmdit.img_in(patchify(images, p)), mmdit.txt_in(code)
    vec = None if timesteps is None else mmdit.time_in(flowmo_fast.flowmo.layers.timestep_embedding(timesteps))
    for block in mmdit.double_blocks:
        img, txt = block(img, txt, vec, rope, ops, sdpa, keep="both")
    img_out = unpatchify(mmdit.final_layer_img(img, vec, ops), p, h, w)
    txt_out = mmdit.final_layer_txt(txt, vec, ops)
    return img_out if output == "img" else txt_out


def test_skipped_dead_compute_changes_no_output_or_gradient(parity, parity_model):
    model = parity_model
    ops = model.ops(torch.device("cpu"))
    images, zt, code, t = parity["images"], parity["zt"], parity["code_with_mask"], parity["t"]
    empty = torch.zeros(2, 16, 18)
    for fast, full in (
        (lambda: model.encode(images), lambda: full_mmdit(model.encoder, images, empty, None, ops, "txt")),
        (lambda: model.decode(zt, code, t), lambda: full_mmdit(model.decoder, zt, code, t, ops, "img")),
    ):
        live = [p for p in model.parameters() if p.requires_grad]
        out_fast = fast()
        g_fast = torch.autograd.grad(out_fast.square().sum(), live, allow_unused=True)
        out_full = full()
        g_full = torch.autograd.grad(out_full.square().sum(), live, allow_unused=True)
        assert torch.allclose(out_fast, out_full, atol=1e-6)
        for a, b in zip(g_fast, g_full):
            assert (a is None and (b is None or b.abs().max() == 0)) or torch.allclose(a, b, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_non_square_images_take_row_then_column_positions(parity_model):
    """32 x 48 images (8 x 12 patches): encoder and decoder equal the full computation with upstream's ids built
    by hand, and differ clearly from it with height and width swapped (so a swap cannot pass)."""
    model = parity_model
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 48, generator=g) * 2 - 1
    m = model.config.model
    code = torch.randn(2, m.code_length, m.context_dim + 1, generator=g)
    empty = torch.zeros(2, m.code_length, m.context_dim)
    t = torch.rand(2, generator=g)
    ops = model.ops(torch.device("cpu"))
    for ours, tower, args in (
        (model.encode(images), model.encoder, (images, empty, None, ops, "txt")),
        (model.decode(images, code, t), model.decoder, (images, code, t, ops, "img")),
    ):
        torch.testing.assert_close(ours, full_mmdit(tower, *args), rtol=0, atol=1e-5)
        assert (ours - full_mmdit(tower, *args, transpose_grid=True)).abs().max() > 1e-2


def test_dead_parameters_take_no_gradient_but_stay_in_state_dict(tiny_model):
    dead = set(tiny_model.dead_parameter_names())
    assert dead and dead <= set(tiny_model.state_dict())
    tiny_model.train()
    loss = flowmo_fast.flowmo.flow.rectified_flow_loss(tiny_model, torch.rand(2, 3, 32, 32) * 2 - 1).loss
    loss.backward()
    without_grad = {n for n, p in tiny_model.named_parameters() if p.grad is None}
    assert without_grad == dead  # every other parameter is used: DDP can run find_unused_parameters=False
