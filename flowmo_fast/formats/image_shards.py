"""WebDataset tar shards of images (github.com/webdataset/webdataset), indexed once for reading at random.

A WebDataset is a list of uncompressed tar files, the shards. A sample is a run of consecutive members that share
a key, the member's path up to the first dot of its file name (`n01440764_10026.jpg` and `n01440764_10026.cls`
are one sample); the webdataset library's own `group_by_keys` groups them, with its rules (suffixes lower-cased,
a suffix twice in one sample an error, `__...__` metadata members skipped). A sample's image is its first member
with an image file extension; its class, the integer in its `.cls` member when it has one.

Shards are named by a brace pattern (`shards/train-{000000..000099}.tar`, expanded by webdataset), one `.tar`
file, or a folder of `.tar` files (all of them, sorted by name).

WebDataset streams its shards for speed, which ties the order of the samples to the reader. Here each process
reads every shard's headers once instead (`flowmo_fast.formats.tar_members`: one pread a member, the data skipped;
47 us of CPU a sample with a .cls on a shared 2-core machine, a minute for ImageNet's 1.28M images) and keeps where
each sample's image lies: its shard, byte offset and length. Rows are the samples in shard order, then member
order, so a row names the same image in every process and run, the data sets' samplers (one global shuffle,
disjoint shares per rank and loader worker, exact resume from a position) work as for an image folder, and an
image is read with one pread. The price: shards are local (or mounted) uncompressed files, not URLs, and reading
at random offsets wants a disk that seeks well (SSD, a parallel file system), as an image folder does.
"""

from __future__ import annotations

import os
import re
import tarfile
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from tqdm import tqdm

from flowmo_fast.formats.data_errors import DataError
from flowmo_fast.formats.tar_members import tar_members

# webdataset is imported inside the three functions that read shards, not at the top, so that
# every other command (and a machine image without webdataset, such as the GPU machines') imports this module's
# importers (the data sets, the trainers) without it.
SHARD_SUFFIX = ".tar"
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator skips these (e.g. __meta__/...)
PROGRESS_FROM = 64  # shards: index with a progress bar from this many on


def names_shards(data: str) -> bool:
    """Whether `--data` / `data.data_dir` names WebDataset shards (a brace pattern, a .tar file, or a folder with
    .tar files directly in it) rather than an image folder. An existing folder is what it holds, braces in its
    name or not."""
    suffixes = (SHARD_SUFFIX, *COMPRESSED_SUFFIXES)
    if os.path.isdir(data):
        return any(f.endswith(suffixes) for f in os.listdir(data))
    return "{" in data or data.endswith(suffixes)


def shard_paths(spec: str) -> list[str]:
    """The shard files `spec` names, in order; every one must be an existing uncompressed .tar file."""
    if os.path.isdir(spec):
        paths = sorted(
            os.path.join(spec, f) for f in os.listdir(spec)
            if f.endswith((SHARD_SUFFIX, *COMPRESSED_SUFFIXES)) and not f.startswith(".")
        )
    else:
        from webdataset import shardlists  # imported where shards are read (see the note above SHARD_SUFFIX)

        paths = shardlists.expand_urls(spec)
    for path in paths:
        if path.endswith(COMPRESSED_SUFFIXES):
            raise DataError(f"shard {path} is compressed: images are read at their offsets inside a shard, which "
                            "needs uncompressed .tar files; decompress the shards (e.g. gunzip) and give those")
        if not path.endswith(SHARD_SUFFIX):
            raise DataError(f"{spec} names {path}, not a .tar file: give WebDataset shards as a brace pattern "
                            "(shards/train-{000000..000099}.tar), one .tar file or a folder of them")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(paths)} shards of {spec} not found (the first: "
                                f"{missing[0]}); shards are read from local or mounted files")
    return paths


@dataclass(frozen=True)
class ShardSample:
    """One sample of a shard that has an image."""

    key: str  # webdataset's __key__
    suffix: str  # the image member's suffix ("jpg"): the member is f"{key}.{suffix}"
    offset: int  # the image's first byte in the shard
    size: int  # its length in bytes
    label: Optional[int]  # its .cls, None without one


@dataclass(frozen=True)
class ShardContents:
    samples: list[ShardSample]
    without_image: int  # samples with no image member (left out)
    truncated: bool  # the file ends inside a member: the members up to there are kept


def read_label(fd: int, path: str, key: str, span: tuple[int, int]) -> int:
    from webdataset import autodecode  # imported where shards are read (see the note above SHARD_SUFFIX)

    offset, size = span
    data = os.pread(fd, size, offset)
    try:
        label = autodecode.basichandlers("cls", data)  # webdataset's decoding of a .cls: int(text)
    except ValueError:
        label = None
    if label is None or label < 0:
        raise DataError(f"shard {path}: sample {key} has .cls {data[:20]!r}, not a class number 0, 1, ...; "
                        "write each sample's class as its decimal integer")
    return label


def index_shard(path: str, is_image: Callable[[str], bool]) -> ShardContents:
    """A shard's samples that have an image (`is_image(suffix)`), in member order."""
    try:
        members = tar_members(path)
    except tarfile.ReadError as e:
        raise DataError(f"shard {path} is not an uncompressed tar file ({e}); give .tar shards") from None
    files = [{"fname": name, "data": (offset, size), "__url__": path}
             for name, offset, size in members.regular if not META_MEMBER.match(name)]
    from webdataset import tariterators  # imported where shards are read (see the note above SHARD_SUFFIX)

    try:
        grouped = list(tariterators.group_by_keys(files))
    except ValueError as e:  # a suffix twice in one sample
        raise DataError(f"shard {path}: {e.args[0]}; the members of a sample need distinct suffixes") from None
    samples, without_image = [], 0
    with open(path, "rb") as f:
        for sample in grouped:
            key = sample["__key__"]
            suffix = next((s for s in sample if not s.startswith("__") and is_image(s)), None)
            if suffix is None:
                without_image += 1
                continue
            label = read_label(f.fileno(), path, key, sample["cls"]) if "cls" in sample else None
            samples.append(ShardSample(key, suffix, *sample[suffix], label))
    return ShardContents(samples, without_image, members.truncated)


@dataclass(frozen=True)
class ShardIndex:
    """Every sample with an image of a list of shards, in shard order then member order."""

    paths: tuple[str, ...]
    names: list[str]  # "<shard, relative to the shards' common folder>/<key>.<image suffix>"
    labels: list[Optional[int]]  # .cls; None where a sample has none
    shards: np.ndarray  # int32 [N]: each sample's position in `paths`
    offsets: np.ndarray  # int64 [N]
    sizes: np.ndarray  # int64 [N]
    without_image: int  # samples left out: no image member
    truncated: tuple[str, ...]  # shards that end inside a member

    def read(self, i: int) -> bytes:
        """Sample i's image file bytes (short if its shard is truncated there: it then fails to decode)."""
        fd = os.open(self.paths[self.shards[i]], os.O_RDONLY)
        try:
            return os.pread(fd, int(self.sizes[i]), int(self.offsets[i]))
        finally:
            os.close(fd)


def index_shards(spec: str, is_image: Callable[[str], bool]) -> ShardIndex:
    """Index the shards `spec` names (`shard_paths`); `is_image(suffix)`: which members are images."""
    paths = shard_paths(spec)
    if not paths:
        raise DataError(f"{spec} names no shards: give a brace pattern, a .tar file or a folder of .tar files")
    bar = tqdm(paths, desc="indexing shards", unit="shard", disable=len(paths) < PROGRESS_FROM, leave=False)
    contents = [index_shard(path, is_image) for path in bar]
    without_image = sum(c.without_image for c in contents)
    samples = [s for c in contents for s in c.samples]
    if not samples:
        raise DataError(f"no images in the {len(paths)} shard(s) of {spec}: none of their {without_image} samples has "
                        "a member with an image extension (.jpg, .png, ...); an ImageNet tar goes with --imagenet-tar "
                        "and --imagenet-index")
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    shard_names = [os.path.relpath(os.path.abspath(p), root) for p in paths]
    return ShardIndex(
        paths=tuple(paths),
        names=[f"{name}/{s.key}.{s.suffix}" for name, c in zip(shard_names, contents) for s in c.samples],
        labels=[s.label for s in samples],
        shards=np.repeat(np.arange(len(paths), dtype=np.int32), [len(c.samples) for c in contents]),
        offsets=np.array([s.offset for s in samples], np.int64),
        sizes=np.array([s.size for s in samples], np.int64),
        without_image=without_image,
        truncated=tuple(p for p, c in zip(paths, contents) if c.truncated),
    )
