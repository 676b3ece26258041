"""Picture fitting equals upstream's evaluation transform (`flowmo/data.py`): RGB, `T.Resize(size)` then
`T.CenterCrop((size, size))`, then x / 127.5 - 1 in float32; for `fit_square`, the tokenizer's input
(`to_model_input`) and every data set's evaluation items. The sizes put the crop offset on a half pixel that
rounds down (6.5 -> 6) and one that rounds up (7.5 -> 8), on even offsets, portrait and landscape, down- and
up-scaling, and a resized side that torchvision truncates (29.6 -> 29)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from flowmo_fast.formats.data import (
    ImageFolderDataset,
    IndexedTarDataset,
    SamplePhotosDataset,
    bundled_photo_files,
    skimage_data_dir,
)
from flowmo_fast.formats.images import fit_square, to_model_input

SIZE = 16
# (width, height) -> after Resize(16): the longer side and its crop offset (torchvision rounds half to even)
SHAPES = [
    (37, 20),  # 29.6 -> 29 wide, offset 6.5 -> 6
    (31, 16),  # not resized, offset 7.5 -> 8
    (20, 43),  # 34.4 -> 34 high, offset 9
    (16, 33),  # offset 8.5 -> 8
    (70, 32),  # 35 wide, offset 9.5 -> 10
    (11, 9),  # scaled up: 19.6 -> 19 wide, offset 1.5 -> 2
    (40, 40),  # square
]
MODES = ["RGB", "L", "RGBA", "P"]


def upstream(picture: Image.Image, size: int = SIZE) -> torch.Tensor:
    """Upstream's preprocessing of one decoded image -> float32 [3, size, size]."""
    fitted = T.Compose([T.Resize(size), T.CenterCrop((size, size))])(picture.convert("RGB"))
    return torch.from_numpy((np.array(fitted) / 127.5 - 1.0).astype(np.float32)).permute(2, 0, 1)


def picture(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Smooth random content (a crop one pixel off still changes every pixel's value) with noise on top."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(x * 0.7 + c) * np.cos(y * 0.45 + 2 * c) for c in range(3)], -1) * 90 + 128
    pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    return image if mode == "RGB" else image.convert(mode)


def pictures() -> list[Image.Image]:
    return [picture(w, h, i, MODES[i % len(MODES)]) for i, (w, h) in enumerate(SHAPES)]


def as_tensor(fitted: Image.Image) -> torch.Tensor:
    return torch.from_numpy((np.array(fitted) / 127.5 - 1.0).astype(np.float32)).permute(2, 0, 1)


@pytest.mark.parametrize("index", range(len(SHAPES)))
def test_fit_square_equals_resize_then_center_crop(index):
    image = pictures()[index]
    fitted = fit_square(image, SIZE)
    assert fitted.size == (SIZE, SIZE) and fitted.mode == "RGB"
    assert torch.equal(as_tensor(fitted), upstream(image)), SHAPES[index]


def test_tokenizer_input_equals_upstreams_transform():
    """`to_model_input(pictures, size)` is what `Tokenizer.encode` feeds the model."""
    images = pictures()
    got = to_model_input(images, SIZE)
    assert torch.equal(got, torch.stack([upstream(p) for p in images]))
    arrays = [np.asarray(p.convert("RGB")) for p in images]  # numpy pictures take the same path
    assert torch.equal(to_model_input(arrays, SIZE), got)


def save_all(folder: Path) -> dict[str, bytes]:
    """The pictures as PNG files in `folder` -> {name: file bytes}."""
    files = {}
    for i, image in enumerate(pictures()):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        files[f"img_{i}.png"] = buffer.getvalue()
        (folder / f"img_{i}.png").write_bytes(buffer.getvalue())
    return files


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_image_folder_and_tar_evaluation_items_equal_upstreams_transform(tmp_path, make_image_tar):
    (tmp_path / "folder").mkdir()
    files = save_all(tmp_path / "folder")
    folder = ImageFolderDataset(str(tmp_path / "folder"), SIZE, random_crop=False)
    tar = IndexedTarDataset(*make_image_tar(tmp_path, files), SIZE, random_crop=False)
    for dataset in (folder, tar):
        assert len(dataset) == len(files)
        for i in range(len(dataset)):
            item = dataset[i]
            assert item["valid"] and torch.equal(item["image"], upstream(decoded(files[item["name"]]))), item["name"]


def test_sample_photos_evaluation_items_equal_upstreams_transform():
    """The bundled photos are kept shrunk in memory; their items must still equal one Resize + CenterCrop."""
    dataset = SamplePhotosDataset(SIZE, random_crop=False)
    folder = Path(skimage_data_dir())
    assert sorted(dataset.names) == sorted(bundled_photo_files())
    for i, name in enumerate(dataset.names):
        with Image.open(folder / name) as image:
            image.load()
            expected = upstream(image)
        assert torch.equal(dataset[i]["image"], expected), name
