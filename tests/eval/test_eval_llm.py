"""eval.rfid on a checkpoint of `model.quantization_type=qwen2.5-coder-0.5b` (a tiny random Qwen2): the usual
metrics plus infill_mse, all finite, infill_mse what the model's own per-image measurement says."""

import json

import pytest
import torch
from llm_helpers import llm_overrides

import flowmo_fast
from eval import rfid
from flowmo_fast.formats.data import first_valid_images, open_dataset

pytest.importorskip("transformers")

NUM_IMAGES = 4


def test_metrics_are_finite_with_the_llms_infill_mse(tiny_llm_folder, inception_weights, tmp_path):
    torch.manual_seed(0)
    model = flowmo_fast.FlowMo(flowmo_fast.load_config(llm_overrides(tiny_llm_folder), preset="tiny")).eval()
    checkpoint = tmp_path / "llm.pth"
    flowmo_fast.save_checkpoint(checkpoint, model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = rfid.main([
            "--ckpt", str(checkpoint), "--out", str(tmp_path / "out"), "--steps", "2", "--batch-size", "3",
            "--max-images", str(NUM_IMAGES), "--workers", "0", "--device", "cpu", "--no-lpips",
            "--inception-weights", str(inception_weights),
        ])
    finally:
        torch.set_num_threads(threads)
    metrics = result["metrics"]
    assert set(metrics) == {"rfid", "psnr", "ssim", "infill_mse"}
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"] == metrics
    images = first_valid_images(open_dataset(32), NUM_IMAGES)  # rows 0..3, what eval.rfid evaluated
    with torch.no_grad():
        own = model.reconstruct_rows_with_code(images, range(NUM_IMAGES), 0, model.sampling().replace(steps=1))
    expected = own.quantizer.per_sample["infill_mse"].double().mean().item()
    assert expected > 0 and metrics["infill_mse"] == pytest.approx(expected, rel=1e-5)
