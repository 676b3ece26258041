"""Data sets: decoding and mode conversion, crops, stable order, corrupt files, the resumable sampler."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data._utils.pin_memory import pin_memory

from flowmo_fast.config import load_config
from flowmo_fast.formats.data import (
    ImageBatch,
    ImageFolderDataset,
    IndexedTarDataset,
    SamplePhotosDataset,
    ShardedBatchSampler,
    build_dataset,
    bundled_photos_dir,
    collate_images,
    make_loader,
)


def gradient_image(w: int, h: int, mode: str = "RGB") -> Image.Image:
    """A smooth RGB image w x h (distinct values, so crops at different offsets differ), in `mode`."""
    x = np.linspace(0, 255, w)[None, :, None]
    y = np.linspace(0, 255, h)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)), np.full((h, w, 1), 77.0)], -1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB").convert(mode)


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture()
def folder(tmp_path):
    """b/two.png, a/one.jpg, a/deep/three.png, top.png, broken.png (garbage), notes.txt (not an image)."""
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    gradient_image(40, 20).save(tmp_path / "b" / "two.png")
    gradient_image(20, 40).save(tmp_path / "a" / "one.jpg")
    gradient_image(32, 32).save(tmp_path / "a" / "deep" / "three.png")
    gradient_image(16, 16).save(tmp_path / "top.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_folder_is_recursive_sorted_and_labelled(folder):
    ds = ImageFolderDataset(str(folder), size=16)
    assert ds.names == ["a/deep/three.png", "a/one.jpg", "b/two.png", "broken.png", "top.png"]
    assert ds.labels == [0, 0, 1, -1, -1]
    item = ds[2]
    assert item["valid"] and item["index"] == 2 and item["name"] == "b/two.png" and item["label"] == 1
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0


def test_loader_pinning_pins_every_tensor_of_a_batch(folder, monkeypatch):
    """DataLoader(pin_memory=True) pins an ImageBatch through its pin_memory(); pinning itself needs CUDA, so
    here it is a copy that records what it was called on."""
    batch = collate_images([ImageFolderDataset(str(folder), size=16)[i] for i in range(3)])
    pinned_tensors = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: pinned_tensors.append(t) or t.clone())
    pinned = pin_memory(batch)
    assert type(pinned) is ImageBatch and pinned.names == batch.names and pinned.skipped_names == batch.skipped_names
    assert [t.data_ptr() for t in pinned_tensors] == [t.data_ptr() for t in (batch.images, batch.rows, batch.labels)]
    assert torch.equal(pinned.images, batch.images) and torch.equal(pinned.rows, batch.rows)


def test_corrupt_file_in_folder_is_marked_and_dropped(folder):
    ds = ImageFolderDataset(str(folder), size=16)
    bad = ds[3]
    assert bad["valid"] is False and bad["name"] == "broken.png" and bad["image"].abs().sum() == 0
    batch = collate_images([ds[i] for i in range(len(ds))])
    assert batch.images.shape == (4, 3, 16, 16)
    assert batch.skipped == 1 and batch.skipped_names == ["broken.png"]
    assert batch.rows.tolist() == [0, 1, 2, 4] and batch.names == ["a/deep/three.png", "a/one.jpg", "b/two.png", "top.png"]
    assert batch.labels.tolist() == [0, 0, 1, -1]
    empty = collate_images([bad])
    assert empty.images.shape == (0, 3, 16, 16) and empty.skipped == 1


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "P", "I;16"])
def test_modes_convert_to_rgb(tmp_path, mode):
    if mode == "I;16":  # 16-bit grayscale: the high byte is what an 8-bit reader sees
        gray = np.asarray(gradient_image(24, 24, "L"), dtype=np.uint16) * 257
        image = Image.fromarray(gray)
        assert image.mode == "I;16"
    else:
        image = gradient_image(24, 24, mode)
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode == "I;16" else "PNG"
    (tmp_path / f"x.{fmt.lower()}").write_bytes(encode(image, fmt))
    item = ImageFolderDataset(str(tmp_path), size=24)[0]
    assert item["valid"] and item["image"].shape == (3, 24, 24)
    expected = np.asarray(image.convert("RGB") if mode != "I;16" else gradient_image(24, 24, "L").convert("RGB"))
    got = ((item["image"].permute(1, 2, 0).numpy() + 1) * 127.5).round()
    tolerance = 12 if fmt == "JPEG" else 0.5  # JPEG: lossy
    assert np.abs(got - expected).max() <= tolerance


def test_resize_shorter_side_then_center_crop(tmp_path):
    gradient_image(64, 32).save(tmp_path / "wide.png")
    item = ImageFolderDataset(str(tmp_path), size=16)[0]
    pixels = ((item["image"] + 1) * 127.5).round()
    # Shorter side 32 -> 16: x runs over the full width 64 -> 32, the centre crop keeps columns 8..23.
    red = pixels[0, 0]
    assert 255 * 8 / 32 - 12 < red[0] < 255 * 8 / 32 + 12 and 255 * 23 / 32 - 12 < red[-1] < 255 * 23 / 32 + 12
    green = pixels[1, :, 0]
    assert green[0] < 15 and green[-1] > 240  # the full height survives


def test_random_crops_vary_and_follow_their_seed(tmp_path):
    gradient_image(96, 16).save(tmp_path / "wide.png")
    ds = ImageFolderDataset(str(tmp_path), size=16, random_crop=True)
    crops = [ds[(0, seed)]["image"] for seed in range(20)]
    assert len({c[0, 0, 0].item() for c in crops}) > 5  # different offsets
    assert torch.equal(ds[(0, 7)]["image"], crops[7])  # same seed, same crop
    val = ImageFolderDataset(str(tmp_path), size=16, random_crop=False)
    assert torch.equal(val[0]["image"], val[0]["image"])


def test_indexed_tar_reads_labels_and_skips_corrupt(tmp_path, make_image_tar):
    members = {
        "n01440764/n01440764_2.JPEG": encode(gradient_image(30, 20), "JPEG"),
        "n01443537/n01443537_1.JPEG": encode(gradient_image(20, 30, "L"), "JPEG"),
        "n01440764/n01440764_1.JPEG": encode(gradient_image(24, 24), "PNG"),
        "n01443537/n01443537_9.JPEG": encode(gradient_image(24, 24), "JPEG")[:60],  # truncated
    }
    tar, index = make_image_tar(tmp_path, members)
    ds = IndexedTarDataset(tar, index, size=16, random_crop=True)
    assert [n.split("/")[-1] for n in ds.names] == [
        "n01440764_1.JPEG", "n01440764_2.JPEG", "n01443537_1.JPEG", "n01443537_9.JPEG",
    ]
    assert ds.labels == [0, 0, 1, 1]
    items = [ds[(i, 3)] for i in range(4)]
    assert [it["valid"] for it in items] == [True, True, True, False]
    for it in items[:3]:
        assert it["image"].shape == (3, 16, 16)
    # The same bytes through a folder give the same image (reads come from the right offsets).
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "x.png").write_bytes(members["n01440764/n01440764_1.JPEG"])
    assert torch.equal(ImageFolderDataset(str(tmp_path / "f"), 16)[0]["image"], IndexedTarDataset(tar, index, 16)[0]["image"])
    # Workers (each its own file handle) drop the corrupt image and keep going.
    loader = make_loader(ds, batch_size=4, num_workers=2, seed=1)
    batch = next(iter(loader))
    assert batch.skipped == 1 and batch.images.shape == (3, 3, 16, 16)


def test_tar_index_errors_name_the_problem(tmp_path, make_image_tar):
    tar, index = make_image_tar(tmp_path, {"a.png": encode(gradient_image(8, 8), "PNG")})
    with pytest.raises(FileNotFoundError, match="tar file not found"):
        IndexedTarDataset(str(tmp_path / "missing.tar"), index, 8)
    (tmp_path / "bad.json").write_text('{"name": 1}')
    with pytest.raises(ValueError, match="name.*offset.*size"):
        IndexedTarDataset(tar, str(tmp_path / "bad.json"), 8)


def test_sample_photos_and_bundled_dir(tmp_path):
    ds = SamplePhotosDataset(size=32)
    assert len(ds) >= 5 and "astronaut.png" in ds.names
    assert all(ds[i]["valid"] for i in range(len(ds)))
    folder = bundled_photos_dir(str(tmp_path / "photos"))
    assert sorted(os.listdir(folder)) == ds.names
    assert torch.equal(ImageFolderDataset(folder, 32)[0]["image"], ds[0]["image"])
    kept, plain = SamplePhotosDataset(32, random_crop=True), ImageFolderDataset(folder, 32, random_crop=True)
    for _ in range(2):  # decoded, then from the kept (shrunk) copy: the same random crop as a plain folder's
        assert torch.equal(kept[(1, 5)]["image"], plain[(1, 5)]["image"])


def test_build_dataset_chooses_the_source(tmp_path, folder, make_image_tar):
    assert isinstance(build_dataset(load_config(["data.image_size=16"]).data, "train"), SamplePhotosDataset)
    ds = build_dataset(load_config([f"data.data_dir={folder}", "data.image_size=16"]).data, "val")
    assert isinstance(ds, ImageFolderDataset) and not ds.random_crop and len(ds) == 5
    tar, index = make_image_tar(tmp_path, {"n01440764/x.JPEG": encode(gradient_image(16, 16), "PNG")})
    config = load_config([f"data.imagenet_train_tar={tar}", f"data.imagenet_train_index={index}"])
    assert isinstance(build_dataset(config.data, "train"), IndexedTarDataset)
    with pytest.raises(FileNotFoundError, match="imagenet_val_tar"):
        build_dataset(load_config([f"data.imagenet_val_tar={tmp_path / 'nope.tar'}"]).data, "val")


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_shards_epochs_and_resumes():
    data = list(range(10))
    ranks = [ShardedBatchSampler(data, batch_size=2, rank=r, world_size=2, seed=5) for r in range(2)]
    # One epoch = 5 rows per rank; together the ranks cover every row once.
    per_rank = [[k[0] for b in take(r, 5) for k in b] for r in ranks]
    assert sorted(per_rank[0][:5] + per_rank[1][:5]) == data
    assert sorted(per_rank[0][5:] + per_rank[1][5:]) == data  # the next epoch
    assert per_rank[0][:5] != per_rank[0][5:]  # reshuffled
    # Same seed, same stream; a sampler started at sample 3 continues exactly there.
    again = ShardedBatchSampler(data, batch_size=2, rank=0, world_size=2, seed=5)
    assert take(again, 5) == take(ranks[0], 5)
    resumed = ShardedBatchSampler(data, batch_size=2, rank=0, world_size=2, seed=5, start=3)
    flat = [k for b in take(ranks[0], 5) for k in b]
    assert [k for b in take(resumed, 3) for k in b] == flat[3:9]
    other_seed = ShardedBatchSampler(data, batch_size=2, rank=0, world_size=2, seed=6)
    assert take(other_seed, 5) != take(ranks[0], 5)


def test_val_sampler_is_in_order():
    sampler = ShardedBatchSampler(list(range(5)), batch_size=2, shuffle=False)
    assert take(sampler, 3) == [[0, 1], [2, 3], [4, 0]]
