"""Random draws on the generator's own device: a CPU generator works with a model on another device and gives the
same numbers there as on the CPU (checked on the meta device, which like CUDA is not the generator's)."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

import flowmo_fast
from flowmo_fast import noise


class GeneratorDeviceMustMatch(TorchFunctionMode):
    """Fails a random draw whose generator lives on another device than the one drawn on (what CUDA refuses:
    "Expected a 'cuda' device type for generator"); records every draw's device."""

    DRAWS = (torch.randn, torch.rand, torch.randint, torch.normal)

    def __init__(self):
        super().__init__()
        self.devices = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.DRAWS and kwargs.get("generator") is not None:
            device = torch.device(kwargs.get("device") or "cpu")
            assert kwargs["generator"].device == device, f"{func.__name__} on {device} with a {kwargs['generator'].device} generator"
            self.devices.append(device.type)
        return func(*args, **kwargs)


def test_draws_use_the_generators_device_and_equal_a_direct_draw():
    with GeneratorDeviceMustMatch() as mode:
        x = noise.normal((3, 4), torch.Generator().manual_seed(5), device="meta")
        u = noise.uniform((3,), torch.Generator().manual_seed(5), device="meta", dtype=torch.float64)
    assert x.device.type == "meta" and u.dtype == torch.float64 and mode.devices == ["cpu", "cpu"]
    same = noise.normal((3, 4), torch.Generator().manual_seed(5), device="cpu")
    assert torch.equal(same, torch.randn(3, 4, generator=torch.Generator().manual_seed(5)))


def test_sampling_on_another_device_with_a_cpu_generator():
    """model.sample_images (so reconstruct and Tokenizer.decode) with a CPU generator and the model elsewhere."""
    with torch.device("meta"):
        model = flowmo_fast.FlowMo(flowmo_fast.load_config(preset="tiny")).eval()
        quantized = torch.empty(2, model.code_length, model.config.model.context_dim)
    with torch.no_grad(), GeneratorDeviceMustMatch() as mode:
        out = model.sample_images(quantized, (32, 32), model.sampling().replace(steps=2),
                                  generator=torch.Generator().manual_seed(0))
    assert out.device.type == "meta" and out.shape == (2, 3, 32, 32) and mode.devices == ["cpu"]


def test_training_draws_with_a_cpu_generator_on_another_device():
    with torch.device("meta"):
        model = flowmo_fast.FlowMo(flowmo_fast.load_config(["model.quantization_type=kl"], preset="tiny")).train()
        images = torch.empty(2, 3, 32, 32)
    with GeneratorDeviceMustMatch() as mode:
        out = flowmo_fast.flowmo.flow.rectified_flow_loss(model, images, generator=torch.Generator().manual_seed(0))
        flowmo_fast.flowmo.flow.posttrain_chain(model, out.model.code_with_mask, (32, 32), k=2, enable_cfg=True,
                                         generator=torch.Generator().manual_seed(0))
    assert out.loss.device.type == "meta" and len(mode.devices) >= 8 and set(mode.devices) == {"cpu"}


def test_per_image_streams_are_independent_and_stable():
    assert noise.row_seed(3, 9) == noise.row_seed(3, 9)
    assert len({noise.row_seed(3, 9, s) for s in (noise.IMAGE_NOISE, noise.POSTERIOR_NOISE, noise.SPAN_START)}) == 3
    a = torch.randn(4, generator=noise.row_generator(3, 9))
    assert torch.equal(a, noise.image_noise([1, 9], 3, (4,))[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_generator_gives_the_same_noise_on_cuda():
    cpu = noise.normal((2, 3, 8, 8), torch.Generator().manual_seed(7), device="cpu")
    gpu = noise.normal((2, 3, 8, 8), torch.Generator().manual_seed(7), device="cuda")
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_reconstruct_on_the_second_gpu_with_the_first_current(tmp_path):
    """load_checkpoint(device="cuda:1").reconstruct with device 0 current: kernels and the CUDA-graph capture
    run on the tensors' device, and a new batch gives new images (the replay reads the new inputs)."""
    torch.manual_seed(0)
    config = flowmo_fast.load_config(preset="tiny")
    flowmo_fast.save_checkpoint(tmp_path / "tiny.pth", flowmo_fast.FlowMo(config).state_dict(), config=config)
    torch.cuda.set_device(0)
    model = flowmo_fast.load_checkpoint(tmp_path / "tiny.pth", device="cuda:1")
    images = torch.rand(2, 3, 32, 32, device="cuda:1") * 2 - 1
    a = model.reconstruct(images, generator=torch.Generator().manual_seed(0))
    b = model.reconstruct(images.flip(0), generator=torch.Generator().manual_seed(0))
    assert a.device == torch.device("cuda", 1) and torch.isfinite(a).all() and not torch.equal(a, b)
