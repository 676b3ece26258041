"""Dense bf16 tensor-core peaks of GPUs, for MFU (training logs and the GPU report)."""

from __future__ import annotations

from typing import Optional

# TFLOP/s, matched in order against torch.cuda.get_device_name(): specific names before their prefixes.
PEAK_BF16_TFLOPS = (
    ("H200 NVL", 835.0),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
)


def peak_bf16_tflops(device_name: str) -> Optional[float]:
    """Dense bf16 peak of a CUDA device by its name; None when not in the table (no MFU is shown)."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)
