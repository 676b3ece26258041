"""Random-weight files for the metric networks (FID Inception, LPIPS backbones), so eval tests never download."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision


def random_inception_state_dict(seed: int = 0) -> dict:
    """The FID Inception's keys and shapes (torchvision's InceptionV3 with 1008 classes, no aux head), random
    weights: He-normal convolutions and identity batch norms, so activations keep their scale through depth."""
    template = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in template.state_dict().items():
        if value.ndim == 4:
            out[key] = torch.randn(value.shape, generator=g) * math.sqrt(2.0 / value[0].numel())
        elif key == "fc.weight":
            out[key] = torch.randn(value.shape, generator=g) / math.sqrt(value.shape[1])
        elif key.endswith(("running_var", "bn.weight")):
            out[key] = torch.ones_like(value)
        elif key.endswith("num_batches_tracked"):
            out[key] = value.clone()
        else:  # biases and running means
            out[key] = 0.1 * torch.randn(value.shape, generator=g)
    return out


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """A random-weight file in the layout of pytorch-fid's pt_inception-2015-12-05-6726825d.pth."""
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(random_inception_state_dict(), path)
    return path


@pytest.fixture(scope="session")
def lpips_backbones(tmp_path_factory):
    """{"alex", "vgg"} -> random-weight files holding the `features.*` tensors of torchvision's checkpoints."""
    folder = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    features = {
        "alex": torchvision.models.AlexNet().features,
        "vgg": torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"]),
    }
    paths = {}
    for name, module in features.items():
        paths[name] = folder / f"{name}-features.pth"
        torch.save({f"features.{k}": v for k, v in module.state_dict().items()}, paths[name])
    return paths


@pytest.fixture()
def metric_weights_env(inception_weights, lpips_backbones, monkeypatch):
    """Environment variables pointing the eval command at the random-weight files."""
    env = {
        "FLOWMO_INCEPTION_WEIGHTS": str(inception_weights),
        "FLOWMO_LPIPS_ALEX_WEIGHTS": str(lpips_backbones["alex"]),
        "FLOWMO_LPIPS_VGG_WEIGHTS": str(lpips_backbones["vgg"]),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env
