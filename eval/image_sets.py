"""The image sets eval.gfid reads, each as uint8 batches [B, 3, H, W]: generated samples (an ADM-style npz whose
`arr_0` holds uint8 [N, H, W, 3], or a folder of images) and references (an ADM reference batch such as
`VIRTUAL_imagenet256_labeled.npz`, an image folder, WebDataset shards, or the ImageNet tar with upstream's index),
with the content hash that names a reference in the statistics cache.

Folders, shards and the tar are read by flowmo_fast's data sets: every image centre-cropped to a square of the given
side (folders of generated samples are read at their own size, so square samples pass through unchanged).
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass, field
from typing import Iterator, Optional, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from flowmo_fast.formats.checkpoint import file_sha256
from flowmo_fast.formats.data import DataError, ImageDataset, ImageFolderDataset, ImageSource, collate_images
from flowmo_fast.formats.image_shards import names_shards, shard_paths

IMAGES_KEY = "arr_0"


class ImageSet(Protocol):
    skipped: list[str]  # names of images that did not decode (filled while reading)

    def __len__(self) -> int: ...

    @property
    def side(self) -> int: ...  # the images' shorter side

    def batches(self, batch_size: int) -> Iterator[Tensor]: ...  # uint8 [B, 3, H, W]

    def describe(self) -> str: ...


class NpzImages:
    """The uint8 images [N, H, W, 3] under `arr_0` of an npz file, read a batch at a time (50,000 samples of 256 px
    are 9.8 GB: never loaded whole); other arrays of the file (`mu`, `sigma`) by `array`."""

    def __init__(self, path: str):
        self.path = path
        self.skipped: list[str] = []
        member = f"{IMAGES_KEY}.npy"
        try:
            with zipfile.ZipFile(path) as z:
                if member not in z.namelist():
                    keys = ", ".join(n[:-4] for n in z.namelist() if n.endswith(".npy")) or "none"
                    raise DataError(f"{path} has no {IMAGES_KEY} (its arrays: {keys}); samples go under {IMAGES_KEY}, "
                                    "uint8 [N, H, W, 3], as np.savez(path, arr_0=images)")
                with z.open(member) as f:
                    shape, fortran, dtype = read_npy_header(f)
        except zipfile.BadZipFile as e:
            raise DataError(f"{path} is not an npz file ({e}); write samples with np.savez(path, arr_0=images)") from e
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
            raise DataError(f"{path}: {IMAGES_KEY} is {dtype} {shape}; expected uint8 [N, H, W, 3] images "
                            "(convert with np.clip(x, 0, 255).astype(np.uint8), channels last)")
        self.shape = tuple(shape)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def side(self) -> int:
        return min(self.shape[1:3])

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        n, h, w, c = self.shape
        with zipfile.ZipFile(self.path) as z, z.open(f"{IMAGES_KEY}.npy") as f:
            read_npy_header(f)
            for start in range(0, n, batch_size):
                count = min(batch_size, n - start)
                data = f.read(count * h * w * c)
                if len(data) != count * h * w * c:
                    raise DataError(f"{self.path} ends inside {IMAGES_KEY} (image {start + len(data) // (h * w * c)} "
                                    f"of {n}): the file is truncated, write it again")
                yield torch.from_numpy(np.frombuffer(data, np.uint8).reshape(count, h, w, c).copy()).permute(0, 3, 1, 2)

    def array(self, key: str) -> Optional[np.ndarray]:
        """Another array of the file (e.g. an ADM reference batch's `mu`, `sigma`), or None if it has none."""
        with np.load(self.path) as z:
            return z[key] if key in z.files else None

    def describe(self) -> str:
        return f"{len(self)} images [{', '.join(map(str, self.shape[1:]))}] in {self.path}"


def read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of the .npy stream `f`, leaving it at the first byte of the data."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)


@dataclass
class DatasetImages:
    """A flowmo_fast image data set as uint8 batches; images that fail to decode are listed in `skipped`."""

    dataset: ImageDataset
    num_workers: int = 0
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def side(self) -> int:
        return self.dataset.size

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        loader = DataLoader(self.dataset, batch_size=batch_size, num_workers=self.num_workers,
                            collate_fn=collate_images)
        for batch in loader:
            self.skipped += batch.skipped_names
            if len(batch.images):  # back to the 8-bit pixels exactly: the data sets give x / 127.5 - 1
                yield ((batch.images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

    def describe(self) -> str:
        return self.dataset.describe()


def open_samples(path: str, num_workers: int = 0) -> ImageSet:
    """Generated samples: an npz (`arr_0` uint8 [N, H, W, 3]) or a folder of images, read at the first one's size."""
    if os.path.isdir(path):
        listed = ImageFolderDataset(path, 1)
        with Image.open(os.path.join(path, listed.names[0])) as first:
            side = min(first.size)
        return DatasetImages(ImageFolderDataset(path, side, files=listed.names), num_workers)
    if path.endswith(".npz") and os.path.isfile(path):
        return NpzImages(path)
    what = "not found" if not os.path.exists(path) else "neither a folder nor an .npz file"
    raise FileNotFoundError(f"--samples {path}: {what}; give the folder of generated images or their .npz "
                            f"(ADM format: {IMAGES_KEY} uint8 [N, H, W, 3])")


@dataclass(frozen=True)
class Reference:
    """What samples are compared with: an ADM reference batch (kind "adm-npz": its `mu` / `sigma` give FID, its
    images precision and recall), an image folder, WebDataset shards (a brace pattern or a folder of .tar files),
    or the ImageNet tar with upstream's index ("imagenet-tar")."""

    kind: str
    path: str
    index: Optional[str] = None

    @classmethod
    def from_path(cls, path: str, index: Optional[str] = None) -> "Reference":
        if index and not (os.path.isfile(path) and path.endswith(".tar")):
            raise ValueError(f"--reference-index goes with an ImageNet .tar as --reference, not {path}")
        if path.endswith(".npz") and os.path.isfile(path):
            return cls("adm-npz", path)
        if (os.path.isdir(path) or "{" in path) and names_shards(path):  # a lone .tar is ImageNet's, with its index
            return cls("shards", path)
        if os.path.isdir(path):
            return cls("folder", path)
        if path.endswith(".tar") and os.path.isfile(path):
            if not index:
                raise ValueError(
                    f"--reference {path} is a tar: give upstream's JSON index of it with --reference-index"
                )
            if not os.path.isfile(index):
                raise FileNotFoundError(f"--reference-index {index} not found")
            return cls("imagenet-tar", path, index)
        what = "not found" if not os.path.exists(path) else "not an .npz, a folder, or a .tar"
        raise FileNotFoundError(
            f"--reference {path}: {what}; give an ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz), a "
            "folder of images, or the ImageNet tar with --reference-index"
        )

    def images(self, side: Optional[int], num_workers: int = 0) -> ImageSet:
        """Its images: the npz's as stored; a folder's or the tar's centre-cropped to `side`."""
        if self.kind == "adm-npz":
            return NpzImages(self.path)
        if self.kind == "folder":
            source = ImageSource(folder=self.path)
        elif self.kind == "shards":
            source = ImageSource(shards=self.path)
        else:
            source = ImageSource(tar=self.path, index=self.index)
        return DatasetImages(source.open(side), num_workers)

    def content_sha256(self) -> str:
        """Hash of what the reference holds: the file; a folder's image names and bytes; the shards' names and
        bytes; the tar and its index."""
        if self.kind == "adm-npz":
            return file_sha256(self.path)
        if self.kind == "shards":
            lines = [f"{os.path.basename(p)}\n{file_sha256(p)}\n" for p in shard_paths(self.path)]
            return hashlib.sha256("".join(lines).encode()).hexdigest()
        if self.kind == "imagenet-tar":
            return hashlib.sha256(f"{file_sha256(self.path)} {file_sha256(self.index)}".encode()).hexdigest()
        digest = hashlib.sha256()
        for name in ImageFolderDataset(self.path, 1).names:
            digest.update(f"{name}\n{file_sha256(os.path.join(self.path, name))}\n".encode())
        return digest.hexdigest()

    def describe(self) -> str:
        return f"{self.kind} {self.path}" + (f" (index {self.index})" if self.index else "")
