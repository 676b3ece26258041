"""The evaluations on WebDataset shards: eval.rfid gives the metrics of the same images in a folder, with the
shards' names and a sample that does not decode skipped and named; an eval.gfid reference of shards reads the
folder's images, its content hash following the shards' bytes."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from shard_helpers import folder_as_shards

from eval import rfid
from eval.image_sets import Reference


def rfid_of(data: str, tiny_checkpoint, inception_weights, out) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same thread count for both runs: bitwise the same arithmetic
    try:
        return rfid.main([
            "--ckpt", str(tiny_checkpoint), "--out", str(out), "--data", data, "--steps", "1", "--batch-size", "2",
            "--workers", "0", "--device", "cpu", "--no-lpips", "--inception-weights", str(inception_weights),
            "--save-reconstructions",
        ])  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def image_folder(folder):
    """Three photos of random pixels (of different sizes) and a file that does not decode."""
    folder.mkdir()
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (36 + 4 * i, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    (folder / "img3.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    return folder


def test_shards_give_the_metrics_of_the_same_folder(tiny_checkpoint, inception_weights, tmp_path):
    folder = image_folder(tmp_path / "images")
    shards = folder_as_shards(folder, tmp_path / "shards", per_shard=2)
    from_folder = rfid_of(str(folder), tiny_checkpoint, inception_weights, tmp_path / "folder")
    from_shards = rfid_of(shards, tiny_checkpoint, inception_weights, tmp_path / "shards-out")
    assert from_shards["num_images"] == from_folder["num_images"] == 3
    assert from_shards["metrics"] == from_folder["metrics"] and from_shards["metrics"]["rfid"] is not None
    assert from_shards["skipped_images"] == {"count": 1, "names": ["train-000001.tar/000003_img3.png"]}
    assert "4 images in 2 WebDataset shard(s)" in from_shards["data"]["dataset"]
    saved = sorted(p.name for p in (tmp_path / "shards-out" / "reconstructions").iterdir())
    assert saved == ["000000_000000_img0.png", "000001_000001_img1.png", "000002_000002_img2.png"]


def test_a_gfid_reference_of_shards_reads_the_folders_images(tmp_path):
    folder = image_folder(tmp_path / "images")
    shards = folder_as_shards(folder, tmp_path / "shards", per_shard=2)
    reference = Reference.from_path(shards)
    assert reference.kind == "shards" and Reference.from_path(str(tmp_path / "shards")).kind == "shards"
    from_shards = reference.images(24)
    from_folder = Reference.from_path(str(folder)).images(24)
    for a, b in zip(from_shards.batches(2), from_folder.batches(2), strict=True):
        assert torch.equal(a, b)
    braced = folder.rename(tmp_path / "images{1}")  # an image folder is what it holds, braces in its name or not
    assert Reference.from_path(str(braced)).kind == "folder"
    assert from_shards.skipped == ["train-000001.tar/000003_img3.png"]
    before = reference.content_sha256()
    last = tmp_path / "shards" / "train-000001.tar"
    last.write_bytes(last.read_bytes().replace(b"not a png", b"not a PNG"))
    assert reference.content_sha256() != before
