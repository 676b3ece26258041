"""Image data sets for training and tokenizing: ImageNet tar files with upstream's index, image folders,
WebDataset tar shards (`flowmo_fast.formats.image_shards` indexes them), and the sample photos that ship with
scikit-image (the default when no data is given).

Every data set yields dicts {"image": float32 [3, size, size] in [-1, 1], "index": row, "name": str,
"label": int (-1 if unknown), "valid": bool}. An image that fails to decode gives `valid=False` and a zero
image instead of an exception; `collate_images` drops such items and counts them in the batch's "skipped".

Rows are in a fixed order (sorted names), so a row index names the same image in every process and run.
`ShardedBatchSampler` turns that into an endless, resumable, per-rank stream of batches (one shuffled
permutation per epoch from `seed + epoch`, as `DistributedSampler`), and gives each train item its own crop
seed, so random crops do not depend on workers, prefetching or restarts.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from flowmo_fast.config import DataConfig
from flowmo_fast.formats.data_errors import DataError, nothing_decodes  # noqa: F401 (imported from here as well)
from flowmo_fast.formats.image_shards import ShardIndex, index_shards, names_shards
from flowmo_fast.formats.images import fit_square, shrink_to, uint8_to_model_range

# Colour photographs shipped inside the scikit-image wheel (skimage/data), used when no data is given.
SAMPLE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "rocket.jpg",
)
SYNSET = re.compile(r"n\d{8}")

Key = Union[int, tuple]  # a row, or (row, crop seed) as yielded by ShardedBatchSampler


class ImageDataset(Dataset):
    """Rows of named images; subclasses say how to read a row's bytes (`read_bytes`).

    `size`: output side; `random_crop`: train crops (random) rather than val crops (centre).
    `class_names`: the name of each label, when every row has one (a class-labelled data set); else None.
    """

    def __init__(
        self, names: Sequence[str], labels: Sequence[int], size: int, random_crop: bool,
        class_names: Optional[Sequence[str]] = None,
    ):
        if size < 1:
            raise ValueError(f"image size must be a positive integer, got {size}")
        self.names = list(names)
        self.labels = list(labels)
        self.class_names = list(class_names) if class_names is not None else None
        self.size = size
        self.random_crop = random_crop

    def __len__(self) -> int:
        return len(self.names)

    def read_bytes(self, i: int) -> bytes:
        raise NotImplementedError

    def load_image(self, i: int) -> Image.Image:
        """Row i decoded (any mode: `fit_square` converts it)."""
        image = Image.open(io.BytesIO(self.read_bytes(i)))
        image.load()
        return image

    def __getitem__(self, key: Key) -> dict:
        i, crop_seed = key if isinstance(key, tuple) else (key, None)
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for a data set of {len(self)} images")
        item = {"index": i, "name": self.names[i], "label": self.labels[i]}
        rng = None
        if self.random_crop:
            rng = random.Random(crop_seed) if crop_seed is not None else random.Random(torch.randint(2**62, ()).item())
        try:
            pixels = np.asarray(fit_square(self.load_image(i), self.size, rng))
        except Exception:  # PIL raises many types for bad files (OSError, SyntaxError, zlib.error, ...)
            return {**item, "image": torch.zeros(3, self.size, self.size), "valid": False}
        return {**item, "image": uint8_to_model_range(pixels), "valid": True}

    def describe(self) -> str:
        return f"{len(self)} images"

    def centre_cropped(self) -> "ImageDataset":
        """The same rows with centre crops (a train set's grid images), without listing or indexing them again."""
        twin = copy.copy(self)
        twin.random_crop = False
        return twin


def classes_of(keys: Sequence[Optional[str]]) -> tuple[list[int], Optional[list[str]]]:
    """Per-row class keys (None: unknown) -> (label = rank of the key among the sorted keys, -1 where None;
    the sorted keys as class names, or None unless every row has a key)."""
    names = sorted({k for k in keys if k is not None})
    rank = {k: i for i, k in enumerate(names)}
    labels = [rank[k] if k is not None else -1 for k in keys]
    return labels, (names if names and None not in keys else None)


def _synset_labels(names: Sequence[str]) -> tuple[list[int], Optional[list[str]]]:
    """Labels and class names from the ImageNet synset (nXXXXXXXX) found in each name (`classes_of`)."""
    return classes_of([m.group(0) if (m := SYNSET.search(n)) else None for n in names])


def numbered_classes(labels: Sequence[Optional[int]], where: str) -> tuple[list[int], Optional[list[str]]]:
    """Class numbers the data gives (an index's "label", a shard sample's .cls; None: none given) -> (labels, -1
    where none is given; the class names "0", "1", ... up to the largest, or None unless every row has one)."""
    given = [label for label in labels if label is not None]
    if min(given, default=0) < 0:
        raise DataError(f"{where} gives negative labels (smallest {min(given)}); labels are 0, 1, ... per class")
    names = [str(k) for k in range(max(given) + 1)] if given and len(given) == len(labels) else None
    return [-1 if label is None else label for label in labels], names


def _index_labels(index: Sequence[dict]) -> tuple[list[int], Optional[list[str]]]:
    """The index's own integer "label" of every entry (class names: the numbers, as text), else synsets."""
    if not all("label" in e for e in index):
        return _synset_labels([e["name"] for e in index])
    return numbered_classes([int(e["label"]) for e in index], "the index")


class IndexedTarDataset(ImageDataset):
    """Images read straight out of an (uncompressed) tar file through upstream's index JSON: a list of
    {"name", "offset", "size"} (byte offset and length of each image file inside the tar). Rows are sorted
    by the name's last path component, as upstream."""

    def __init__(self, tar_path: str, index_path: str, size: int, random_crop: bool = False):
        for what, path in (("tar file", tar_path), ("index file", index_path)):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"ImageNet {what} not found: {path}")
        with open(index_path) as f:
            try:
                index = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{index_path} is not valid JSON ({e}); expected upstream's tar index") from e
        if not isinstance(index, list) or not all(
            isinstance(e, dict) and {"name", "offset", "size"} <= e.keys() for e in index
        ):
            raise DataError(f"{index_path}: expected a JSON list of {{'name', 'offset', 'size'}} entries (upstream's tar index)")
        index = sorted(index, key=lambda e: e["name"].split("/")[-1])
        labels, class_names = _index_labels(index)
        super().__init__([e["name"] for e in index], labels, size, random_crop, class_names)
        self.tar_path = tar_path
        self.spans = [(int(e["offset"]), int(e["size"])) for e in index]
        self._fd: Optional[int] = None
        self._fd_pid: Optional[int] = None

    def read_bytes(self, i: int) -> bytes:
        if self._fd is None or self._fd_pid != os.getpid():  # one descriptor per process (workers fork)
            self._fd, self._fd_pid = os.open(self.tar_path, os.O_RDONLY), os.getpid()
        offset, size = self.spans[i]
        return os.pread(self._fd, size, offset)

    def __getstate__(self):
        return {**self.__dict__, "_fd": None, "_fd_pid": None}

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._fd_pid == os.getpid():
            os.close(self._fd)

    def describe(self) -> str:
        return f"{len(self)} images from {self.tar_path}"


def image_extensions() -> set[str]:
    """File extensions PIL can open (lower case, with the dot)."""
    return {ext.lower() for ext in Image.registered_extensions()}


class ImageFolderDataset(ImageDataset):
    """Every PIL-readable file under `root` (recursively, by extension), sorted by relative path.

    Label: rank of the top-level sub-folder among the sorted sub-folder names (as torchvision's ImageFolder);
    -1 for files directly in root. The data set has classes (`class_names`: those sub-folder names) when every
    image lies in a sub-folder. `files` limits the rows to the given relative paths.
    """

    def __init__(self, root: str, size: int, random_crop: bool = False, files: Optional[Sequence[str]] = None):
        if not os.path.isdir(root):
            what = "is a file, not a folder" if os.path.exists(root) else "not found"
            raise FileNotFoundError(f"image folder {what}: {root}; give the folder that holds the images")
        if files is None:
            extensions = image_extensions()
            files = [
                os.path.relpath(os.path.join(folder, f), root)
                for folder, _, names in os.walk(root, followlinks=True)
                for f in names
                if os.path.splitext(f)[1].lower() in extensions and not f.startswith(".")
            ]
        files = sorted(files)
        if not files:
            raise DataError(
                f"no image files under {root} (searched its sub-folders for {', '.join(sorted(image_extensions())[:12])}, "
                "...): give a folder that holds images"
            )
        labels, class_names = classes_of([f.split(os.sep)[0] if os.sep in f else None for f in files])
        super().__init__(files, labels, size, random_crop, class_names)
        self.root = root

    def read_bytes(self, i: int) -> bytes:
        with open(os.path.join(self.root, self.names[i]), "rb") as f:
            return f.read()

    def describe(self) -> str:
        return f"{len(self)} images under {self.root}"


class ImageShardsDataset(ImageDataset):
    """WebDataset tar shards (a brace pattern, a .tar file or a folder of them): one row per sample with an
    image, in shard order then member order (`flowmo_fast.formats.image_shards`). Label: the sample's .cls; the
    data set has classes ("0", "1", ... up to the largest) when every sample has one."""

    def __init__(self, shards: str, size: int, random_crop: bool = False):
        extensions = image_extensions()
        self.index: ShardIndex = index_shards(shards, lambda suffix: f".{suffix}" in extensions)
        labels, class_names = numbered_classes(self.index.labels, f"the .cls entries of {shards}")
        super().__init__(self.index.names, labels, size, random_crop, class_names)
        self.shards = shards

    def read_bytes(self, i: int) -> bytes:
        return self.index.read(i)

    def describe(self) -> str:
        index, notes = self.index, []
        if index.without_image:
            notes.append(f"{index.without_image} samples without an image left out")
        if index.truncated:
            notes.append(f"{len(index.truncated)} truncated shard(s), e.g. {index.truncated[0]}")
        notes = f" ({'; '.join(notes)})" if notes else ""
        return f"{len(self)} images in {len(index.paths)} WebDataset shard(s) {self.shards}{notes}"


def skimage_data_dir() -> str:
    try:
        import skimage.data
    except ImportError as e:
        raise ImportError("the bundled sample photos come with scikit-image: pip install scikit-image") from e
    return os.path.dirname(skimage.data.__file__)


def bundled_photo_files() -> list[str]:
    """Names (inside `skimage_data_dir()`) of the sample colour photos present in this installation."""
    folder = skimage_data_dir()
    files = [f for f in SAMPLE_PHOTOS if os.path.isfile(os.path.join(folder, f))]
    if not files:
        raise FileNotFoundError(f"none of the scikit-image sample photos ({', '.join(SAMPLE_PHOTOS)}) are in {folder}")
    return files


class SamplePhotosDataset(ImageFolderDataset):
    """The colour photos shipped with scikit-image (astronaut, chelsea, coffee, rocket, ...); no download.

    They are few and large, so each process keeps them in memory already shrunk to the shorter side `size`
    (which `fit_square` leaves as they are; crops stay random)."""

    def __init__(self, size: int, random_crop: bool = False):
        super().__init__(skimage_data_dir(), size, random_crop, files=bundled_photo_files())
        self._shrunk: dict[int, Image.Image] = {}

    def load_image(self, i: int) -> Image.Image:
        if i not in self._shrunk:
            self._shrunk[i] = shrink_to(super().load_image(i), self.size)
        return self._shrunk[i]

    def describe(self) -> str:
        return f"{len(self)} scikit-image sample photos ({', '.join(os.path.splitext(n)[0] for n in self.names)})"


def bundled_photos_dir(cache_dir: Optional[str] = None) -> str:
    """A folder holding only the sample photos (copied once from scikit-image), for commands that take a folder.

    Default location: $XDG_CACHE_HOME/flowmo_fast/sample_photos (~/.cache/...)."""
    if cache_dir is None:
        cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        cache_dir = os.path.join(cache_home, "flowmo_fast", "sample_photos")
    os.makedirs(cache_dir, exist_ok=True)
    source = skimage_data_dir()
    for name in bundled_photo_files():
        target = os.path.join(cache_dir, name)
        if not os.path.isfile(target):  # copy then rename: concurrent processes never see half a file
            fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".tmp-")
            os.close(fd)
            shutil.copyfile(os.path.join(source, name), tmp)
            os.replace(tmp, target)
    return cache_dir


def open_dataset(
    size: int, random_crop: bool = False, folder: Optional[str] = None, tar: Optional[str] = None,
    index: Optional[str] = None, shards: Optional[str] = None,
) -> ImageDataset:
    """An image folder, WebDataset shards, an ImageNet tar with upstream's JSON index of it, or (none) the bundled
    sample photos."""
    if folder:
        return ImageFolderDataset(folder, size, random_crop)
    if shards:
        return ImageShardsDataset(shards, size, random_crop)
    if tar or index:
        return IndexedTarDataset(tar, index, size, random_crop)
    return SamplePhotosDataset(size, random_crop)


@dataclass(frozen=True)
class ImageSource:
    """The images a command reads (its --data / --imagenet-tar + --imagenet-index flags): an image folder,
    WebDataset shards, an ImageNet tar with upstream's JSON index of it, or (none) the bundled sample photos."""

    folder: Optional[str] = None
    tar: Optional[str] = None
    index: Optional[str] = None
    shards: Optional[str] = None  # a brace pattern, a .tar file or a folder of .tar files

    @classmethod
    def from_data(cls, data: Optional[str], tar: Optional[str] = None, index: Optional[str] = None) -> "ImageSource":
        """--data / data.data_dir (WebDataset shards when it names them, else an image folder) and the ImageNet tar."""
        if data and names_shards(data):
            return cls(tar=tar, index=index, shards=data)
        return cls(folder=data or None, tar=tar, index=index)

    def open(self, size: int, random_crop: bool = False) -> ImageDataset:
        return open_dataset(size, random_crop, folder=self.folder, tar=self.tar, index=self.index, shards=self.shards)


def build_dataset(data_config, split: str) -> ImageDataset:
    """The data set a config names, for split "train" (random crops) or "val" (centre crops):
    `data.data_dir` if set (an image folder or WebDataset shards); else the ImageNet tar + index of the split if
    both exist; else, when the tar paths are left at their defaults, the bundled sample photos."""
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}; allowed: train, val")
    size, random_crop = data_config.image_size, split == "train"
    tar_key, index_key = f"imagenet_{split}_tar", f"imagenet_{split}_index"
    tar, index = getattr(data_config, tar_key), getattr(data_config, index_key)
    if data_config.data_dir:
        return ImageSource.from_data(data_config.data_dir).open(size, random_crop)
    if os.path.isfile(tar) and os.path.isfile(index):
        return open_dataset(size, random_crop, tar=tar, index=index)
    defaults = DataConfig()
    if tar == getattr(defaults, tar_key) and index == getattr(defaults, index_key):
        return open_dataset(size, random_crop)
    missing = tar if not os.path.isfile(tar) else index
    raise FileNotFoundError(
        f"data.{tar_key}={tar!r} / data.{index_key}={index!r}: {missing} not found. Give existing paths, "
        "an image folder with data.data_dir=PATH, or leave both at their defaults for the bundled sample photos."
    )


@dataclass
class ImageBatch:
    """A loader's batch (`collate_images`): the images that decode, and the names of those that do not."""

    images: torch.Tensor  # [B, 3, H, W] in [-1, 1]
    rows: torch.Tensor  # [B] long: each image's row in the data set
    labels: torch.Tensor  # [B] long: each image's class, -1 where it has none
    names: list[str]  # [B]
    skipped_names: list[str]  # the images of the batch that did not decode

    @property
    def skipped(self) -> int:
        return len(self.skipped_names)

    def pin_memory(self) -> "ImageBatch":
        """The tensors in pinned memory (the DataLoader's pin_memory=True calls this)."""
        return dataclasses.replace(
            self, images=self.images.pin_memory(), rows=self.rows.pin_memory(), labels=self.labels.pin_memory()
        )


def collate_images(items: Sequence[dict]) -> ImageBatch:
    """Stack the valid items; drop invalid ones and name them."""
    valid = [it for it in items if it["valid"]]
    if valid:
        images = torch.stack([it["image"] for it in valid])
    else:
        images = torch.zeros((0, *items[0]["image"].shape)) if items else torch.zeros((0, 3, 0, 0))
    return ImageBatch(
        images=images,
        rows=torch.tensor([it["index"] for it in valid], dtype=torch.long),
        labels=torch.tensor([it["label"] for it in valid], dtype=torch.long),
        names=[it["name"] for it in valid],
        skipped_names=[it["name"] for it in items if not it["valid"]],
    )


class ShardedBatchSampler:
    """Endless batches of keys for one rank: epoch e is `DistributedSampler(seed, epoch=e)`'s share of the
    rows (shuffled, padded to a multiple of world_size); epochs follow each other without a gap, so any
    data-set size and batch size work. `start` = samples of this rank's stream already consumed (resume).

    Train keys are (row, crop seed) with the seed fixed by (seed, epoch, position); val keys are rows."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        start: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if len(dataset) == 0:
            raise ValueError("the data set is empty")
        self.shards = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.start = start

    def keys(self) -> Iterator[Key]:
        per_epoch = len(self.shards)
        epoch, offset = divmod(self.start, per_epoch)
        while True:
            self.shards.set_epoch(epoch)
            rows = list(self.shards)
            for position in range(offset, per_epoch):
                if self.shuffle:
                    seed = int(np.random.SeedSequence([self.seed, epoch, position]).generate_state(1)[0])
                    yield (rows[position], seed)
                else:
                    yield rows[position]
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[list]:
        keys = self.keys()
        while True:
            yield [next(keys) for _ in range(self.batch_size)]


def make_loader(
    dataset: Dataset,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    start: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """An endless DataLoader over `ShardedBatchSampler` with `collate_images`; workers stay alive.

    It has its own generator, so starting it never draws from the global RNG (exact resume)."""
    sampler = ShardedBatchSampler(dataset, batch_size, rank, world_size, seed, shuffle, start)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=collate_images,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed * 1_000_003 + rank),
    )


def first_valid_images(dataset: ImageDataset, count: int) -> torch.Tensor:
    """The first `count` decodable images in row order, [N, 3, H, W] (N < count if the data set is smaller)."""
    images = []
    for i in range(len(dataset)):
        item = dataset[i]
        if item["valid"]:
            images.append(item["image"])
        if len(images) == count:
            break
    if not images:
        return torch.zeros((0, 3, dataset.size, dataset.size))
    return torch.stack(images)
