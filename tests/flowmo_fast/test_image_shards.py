"""WebDataset tar shards as a data set: samples grouped by key in shard then member order, classes from .cls,
brace patterns / a folder / one file, corrupt samples and truncated shards, mistakes named in one line, rows
shared out over ranks and loader workers without overlap, and a loader that resumes at a position exactly."""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shard_helpers import folder_as_shards, write_shards

from flowmo_fast.config import load_config
from flowmo_fast.formats.data import (
    DataError,
    ImageFolderDataset,
    ImageShardsDataset,
    ImageSource,
    ShardedBatchSampler,
    build_dataset,
    collate_images,
    make_loader,
)
from flowmo_fast.formats.image_shards import names_shards


def png(seed: int, w: int = 20, h: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def shards(tmp_path) -> str:
    """Two shards of three samples: png + cls (+ a json beside it), one jpg-only sample (no class)."""
    samples = [
        {"__key__": "s0", "png": png(0), "cls": 2, "json": {"caption": "zero"}},
        {"__key__": "s1", "png": png(1), "cls": 0},
        {"__key__": "sub/s2", "jpg": png(2), "cls": 1},  # PNG bytes under .jpg: PIL reads the content
        {"__key__": "s3", "png": png(3), "cls": 0},
        {"__key__": "s4", "png": png(4), "cls": 1},
        {"__key__": "s5", "jpg": png(5)},
    ]
    return write_shards(tmp_path / "shards", samples, per_shard=3)


def test_rows_are_samples_in_shard_then_member_order_with_their_classes(shards):
    ds = ImageShardsDataset(shards, 16)
    assert ds.names == ["train-000000.tar/s0.png", "train-000000.tar/s1.png", "train-000000.tar/sub/s2.jpg",
                        "train-000001.tar/s3.png", "train-000001.tar/s4.png", "train-000001.tar/s5.jpg"]
    assert ds.labels == [2, 0, 1, 0, 1, -1]
    assert ds.class_names is None  # s5 has no .cls: no classes, as a folder with a loose image
    item = ds[2]
    assert item["valid"] and item["index"] == 2 and item["label"] == 1 and item["image"].shape == (3, 16, 16)
    assert ds.read_bytes(4) == png(4)
    assert "6 images in 2 WebDataset shard(s)" in ds.describe()


def test_every_sample_with_a_cls_gives_numbered_classes(tmp_path):
    samples = [{"__key__": f"k{i}", "png": png(i), "cls": c} for i, c in enumerate([3, 0, 3])]
    pattern = write_shards(tmp_path, samples, 2)
    ds = ImageShardsDataset(pattern, 16)
    assert ds.labels == [3, 0, 3] and ds.class_names == ["0", "1", "2", "3"]


def test_images_equal_those_of_a_folder_of_the_same_files(tmp_path):
    folder = tmp_path / "images"
    for i, cls in enumerate(["cats", "dogs", "cats"]):
        (folder / cls).mkdir(parents=True, exist_ok=True)
        Image.open(io.BytesIO(png(i, 30 + 7 * i, 24))).convert("L" if i == 1 else "RGB").save(folder / cls / f"{i}.jpg")
    pattern = folder_as_shards(folder, tmp_path / "shards", per_shard=2)
    from_folder, from_shards = ImageFolderDataset(str(folder), 16, True), ImageShardsDataset(pattern, 16, True)
    assert from_shards.labels == from_folder.labels and len(from_shards) == 3
    for i in range(3):  # same bytes, same crop seed: the same tensor
        assert torch.equal(from_shards[(i, 7 + i)]["image"], from_folder[(i, 7 + i)]["image"])


def test_a_pattern_a_folder_and_one_file_name_the_same_shards(shards, tmp_path):
    folder = str(Path(shards).parent)
    assert ImageShardsDataset(folder, 16).names == ImageShardsDataset(shards, 16).names
    single = ImageShardsDataset(f"{folder}/train-000001.tar", 16)
    assert single.names == ["train-000001.tar/s3.png", "train-000001.tar/s4.png", "train-000001.tar/s5.jpg"]
    assert all(map(names_shards, [shards, folder, f"{folder}/x.tar", "a/b.tar.gz"]))
    (tmp_path / "photos {2024}").mkdir()  # an existing folder is what it holds, braces in its name or not
    assert not names_shards(str(tmp_path / "photos {2024}")) and not names_shards("some/folder")


def test_metadata_and_image_less_samples_are_left_out(tmp_path):
    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w") as tar:
        add_member(tar, "__meta__/info.json", b"{}")  # metadata, skipped as webdataset does
        add_member(tar, "a.txt", b"a caption without an image")
        add_member(tar, "b.PNG", png(1))  # suffixes are lower-cased, as webdataset does
        add_member(tar, "b.cls", b"4\n")
        add_member(tar, "README", b"no suffix: not a sample member")
    ds = ImageShardsDataset(str(path), 16)
    assert ds.names == ["odd.tar/b.png"] and ds.labels == [4] and ds[0]["valid"]
    assert "1 samples without an image left out" in ds.describe()


def test_a_corrupt_sample_is_skipped_and_named(tmp_path):
    samples = [{"__key__": "good", "png": png(0)}, {"__key__": "bad", "png": b"\x89PNG\r\n\x1a\n not a png"}]
    ds = ImageShardsDataset(write_shards(tmp_path, samples, 2), 16)
    batch = collate_images([ds[0], ds[1]])
    assert batch.names == ["train-000000.tar/good.png"] and batch.skipped_names == ["train-000000.tar/bad.png"]


def test_a_truncated_shard_keeps_its_whole_samples_and_names_the_cut_one(tmp_path):
    write_shards(tmp_path, [{"__key__": f"k{i}", "png": png(i, 64, 64)} for i in range(3)], 3)
    path = tmp_path / "train-000000.tar"
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    path.write_bytes(data[: last.offset_data + last.size // 2])  # a copy cut off inside the last image
    ds = ImageShardsDataset(str(path), 16)
    assert len(ds) == 3 and "1 truncated shard(s)" in ds.describe()
    batch = collate_images([ds[i] for i in range(3)])
    assert batch.skipped_names == ["train-000000.tar/k2.png"] and len(batch.images) == 2


def shard_with(tmp_path: Path, members: list[tuple[str, bytes]]) -> str:
    path = tmp_path / "made.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            add_member(tar, name, data)
    return str(path)


@pytest.mark.parametrize("case, message", [
    ("missing", "1 of the 3 shards of"),
    ("compressed", "is compressed"),
    ("not a tar", "is not an uncompressed tar file"),
    ("suffix twice", "need distinct suffixes"),
    ("bad cls", "has .cls b'cat'"),
    ("no images", "no images in the 1 shard(s)"),
])
def test_shard_mistakes_are_named(tmp_path, case, message):
    if case == "missing":
        write_shards(tmp_path, [{"__key__": f"k{i}", "png": png(i)} for i in range(2)], 1)
        spec = str(tmp_path / "train-{000000..000002}.tar")
    elif case == "compressed":
        (tmp_path / "a.tar.gz").write_bytes(b"\x1f\x8b")
        spec = str(tmp_path)
    elif case == "not a tar":
        (tmp_path / "a.tar").write_bytes(b"hello, not a tar" * 64)
        spec = str(tmp_path / "a.tar")
    else:
        members = {
            "suffix twice": [("k.png", png(0)), ("k.png", png(1))],
            "bad cls": [("k.png", png(0)), ("k.cls", b"cat")],
            "no images": [("k.txt", b"text"), ("k.json", b"{}")],
        }[case]
        spec = shard_with(tmp_path, members)
    with pytest.raises((DataError, FileNotFoundError), match=re.escape(message)) as raised:
        ImageShardsDataset(spec, 16)
    assert "\n" not in str(raised.value) and str(tmp_path) in str(raised.value)


def test_ranks_share_out_the_samples_without_overlap(shards):
    ds = ImageShardsDataset(shards, 16)
    per_rank = [[key[0] for _, key in zip(range(3), ShardedBatchSampler(ds, 1, rank, 2, seed=3).keys())]
                for rank in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == list(range(6))  # one epoch: each row on one rank only


def test_loader_workers_read_every_sample_once(shards):
    """Two worker processes, each opening the shards itself: one epoch of batches holds every row once."""
    loader = make_loader(ImageShardsDataset(shards, 16, True), 2, seed=1, num_workers=2)
    batches = [batch for _, batch in zip(range(3), loader)]
    rows = sorted(r for b in batches for r in b.rows.tolist())
    assert rows == list(range(6)) and all(b.skipped == 0 for b in batches)


def test_a_loader_started_at_a_position_continues_the_stream_exactly(shards):
    """A resumed run opens the shards again: the same rows, so batches and random crops continue exactly."""
    straight = [b for _, b in zip(range(5), make_loader(ImageShardsDataset(shards, 16, True), 2, seed=4))]
    resumed = [b for _, b in zip(range(2), make_loader(ImageShardsDataset(shards, 16, True), 2, seed=4, start=3 * 2))]
    for a, b in zip(straight[3:], resumed):
        assert a.names == b.names and torch.equal(a.images, b.images)


def test_data_dir_and_the_data_flag_take_shards(shards):
    config = load_config(overrides=[f"data.data_dir={shards}", "data.image_size=16"])
    train, val = build_dataset(config.data, "train"), build_dataset(config.data, "val")
    assert isinstance(train, ImageShardsDataset) and train.random_crop and not val.random_crop
    assert ImageSource.from_data(shards) == ImageSource(shards=shards)
    assert ImageSource.from_data(str(Path(shards).parent)).open(16).names == train.names
    grid = train.centre_cropped()
    assert not grid.random_crop and train.random_crop and torch.equal(grid[1]["image"], val[1]["image"])
