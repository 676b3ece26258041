"""GPU peaks by device name: the most specific name wins."""

import pytest

from flowmo_fast.hardware import peak_bf16_tflops


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.4),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA L40S", 362.1),
        ("NVIDIA L4", 121.0),
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_peak_bf16_tflops_by_device_name(name, peak):
    assert peak_bf16_tflops(name) == peak
