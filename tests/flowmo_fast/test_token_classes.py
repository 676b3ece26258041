"""Token shards with classes: `TokenShards.labels` / `.class_names` (what the generator's trainer reads), the
class listing of image folders (torchvision's ImageFolder layout) and ImageNet indexes."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from flowmo_fast import Tokenizer, tokenize
from flowmo_fast.formats.data import ImageFolderDataset, IndexedTarDataset
from flowmo_fast.formats.token_shards import (
    INDEX,
    LABELS,
    MANIFEST,
    TokenShards,
    TokenSpec,
    finished_manifest,
    index_text,
    new_manifest,
    row_labels,
    to_json,
    write_labels_if_changed,
    write_shard,
)

SPEC = TokenSpec("ids", "uint16", (4,), 512)
DATA = {"source": "x", "image_size": 32, "num_images": 5, "names_sha256": "abc"}


def write_folder(folder, labels, classes):
    """Two shards of token rows (5 images, shard size 3) whose sources carry `labels` (None: no label)."""
    rows = np.arange(20, dtype=np.uint16).reshape(5, 4)
    for k, items in enumerate((range(0, 3), range(3, 5))):
        sources = [{"index": i, "name": f"img{i}", **({"label": labels[i]} if labels[i] is not None else {})}
                   for i in items]
        write_shard(str(folder), k, items, rows[items.start : items.stop], sources, [])
    records = [json.loads((folder / f"shard-0000{k}.json").read_text()) for k in range(2)]
    planned = new_manifest({"sha256": "1", "which": "ema"}, {}, SPEC, DATA, 3, classes=classes)
    if classes is not None:
        write_labels_if_changed(str(folder), row_labels(records))
    (folder / INDEX).write_text(index_text(records))
    (folder / MANIFEST).write_text(to_json(finished_manifest(planned, records)))
    return TokenShards(str(folder))


def test_labels_and_class_names_of_a_class_labelled_folder(tmp_path):
    shards = write_folder(tmp_path, [1, 0, 2, 2, 1], ["cat", "dog", "owl"])
    assert shards.class_names == ["cat", "dog", "owl"]
    assert shards.labels.dtype == np.int64 and shards.labels.tolist() == [1, 0, 2, 2, 1]
    assert [s["label"] for s in shards.sources()] == shards.labels.tolist()  # the index agrees, row for row
    assert shards.flip is False


def test_a_data_set_without_classes_has_no_labels(tmp_path):
    shards = write_folder(tmp_path, [None, None, 0, None, None], None)
    assert shards.class_names is None and shards.labels is None
    assert not (tmp_path / LABELS).exists()


def test_a_row_without_a_class_is_refused_when_the_data_set_has_classes(tmp_path):
    with pytest.raises(ValueError, match="1 rows have no class .*img3"):
        write_folder(tmp_path, [1, 0, 2, None, 1], ["cat", "dog", "owl"])


def test_a_damaged_labels_file_is_refused_with_the_fix(tmp_path):
    shards = write_folder(tmp_path, [1, 0, 2, 2, 1], ["cat", "dog", "owl"])
    np.save(tmp_path / LABELS, np.array([1, 0, 2], dtype=np.int64))  # rows lost
    with pytest.raises(ValueError, match=r"not 5 int64 classes below 3: run the same tokenize command again"):
        TokenShards(str(tmp_path)).labels
    np.save(tmp_path / LABELS, np.array([1, 0, 3, 2, 1], dtype=np.int64))  # a class that is not listed
    with pytest.raises(ValueError, match="classes below 3"):
        TokenShards(str(tmp_path)).labels
    (tmp_path / LABELS).unlink()
    with pytest.raises(ValueError, match="cannot read .*labels.npy"):
        TokenShards(str(tmp_path)).labels
    assert len(shards) == 5  # the rows themselves still read


def test_labels_are_rewritten_only_when_they_change(tmp_path):
    labels = np.array([2, 0, 1], dtype=np.int64)
    assert write_labels_if_changed(str(tmp_path), labels)
    assert not write_labels_if_changed(str(tmp_path), labels.copy())
    assert write_labels_if_changed(str(tmp_path), labels[::-1].copy())
    assert np.load(tmp_path / LABELS).tolist() == [1, 0, 2]


def test_a_folder_from_before_class_records_says_how_to_get_them(tmp_path):
    shards = write_folder(tmp_path, [None] * 5, None)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    del manifest["classes"]
    (tmp_path / MANIFEST).write_text(to_json(manifest))
    with pytest.raises(ValueError, match="did not record classes: tokenize into a new folder"):
        TokenShards(str(tmp_path)).labels
    assert len(shards) == 5


# ------------------------------------------------------------------------------------------ what tokenize writes


def run_tokenize(ckpt, out, *extra):
    tokenize.main(["--ckpt", str(ckpt), "--out", str(out), "--image-size", "32", "--num-workers", "0",
                   "--shard-size", "3", "--batch-size", "2", *map(str, extra)])


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    """Five small pictures laid out as torchvision's ImageFolder: owl/ (2), cat/ (2), dog/ (1, in a sub-folder)."""
    root = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(0)
    for name in ("owl/a.png", "cat/b.png", "owl/c.png", "cat/d.png", "dog/deep/e.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(root / name)
    return root


def test_an_image_folder_lists_its_sub_folders_as_sorted_classes(class_folder, tmp_path):
    ds = ImageFolderDataset(str(class_folder), 32)
    assert ds.class_names == ["cat", "dog", "owl"]
    assert list(zip(ds.names, ds.labels)) == [("cat/b.png", 0), ("cat/d.png", 0), ("dog/deep/e.png", 1),
                                              ("owl/a.png", 2), ("owl/c.png", 2)]
    loose = tmp_path / "loose"
    loose.mkdir()
    for name in ("x.png", "y.png"):
        (loose / name).write_bytes((class_folder / "owl" / "a.png").read_bytes())
    assert ImageFolderDataset(str(loose), 32).class_names is None  # no sub-folders: no classes
    (loose / "sub").mkdir()
    (loose / "sub" / "z.png").write_bytes((class_folder / "owl" / "a.png").read_bytes())
    mixed = ImageFolderDataset(str(loose), 32)
    assert mixed.class_names is None and mixed.labels == [0, -1, -1]  # not every image has a class


def test_an_imagenet_index_gives_synsets_or_its_own_labels_as_classes(tmp_path, make_image_tar, class_folder):
    png = (class_folder / "owl" / "a.png").read_bytes()
    tar, index = make_image_tar(tmp_path, {"n02123045/n02123045_1.JPEG": png, "n01440764/n01440764_1.JPEG": png,
                                           "n02123045/n02123045_2.JPEG": png})
    ds = IndexedTarDataset(tar, index, 32)
    assert ds.class_names == ["n01440764", "n02123045"] and ds.labels == [0, 1, 1]
    entries = json.loads(open(index).read())
    for e in entries:
        e["label"] = 4 if "n01440764" in e["name"] else 1
    with open(index, "w") as f:
        json.dump(entries, f)
    ds = IndexedTarDataset(tar, index, 32)
    assert ds.labels == [4, 1, 1] and ds.class_names == ["0", "1", "2", "3", "4"]


def test_tokenize_records_the_classes_of_an_image_folder(tiny_checkpoint, class_folder, tmp_path):
    run_tokenize(tiny_checkpoint, tmp_path / "tokens", "--data", class_folder)
    shards = TokenShards(str(tmp_path / "tokens"))
    assert shards.class_names == ["cat", "dog", "owl"]
    assert shards.labels.tolist() == [0, 0, 1, 2, 2] and shards.labels.dtype == np.int64
    assert [s["name"].split("/")[0] for s in shards.sources()] == [shards.class_names[k] for k in shards.labels]


def test_tokenize_of_a_folder_without_classes_has_no_labels(tiny_checkpoint, class_folder, tmp_path):
    run_tokenize(tiny_checkpoint, tmp_path / "tokens", "--data", class_folder / "owl")
    shards = TokenShards(str(tmp_path / "tokens"))
    assert len(shards) == 2 and shards.class_names is None and shards.labels is None


def test_flip_adds_the_mirror_image_row_after_each_image(tiny_checkpoint, class_folder, tmp_path):
    run_tokenize(tiny_checkpoint, tmp_path / "flipped", "--data", class_folder, "--flip")
    shards = TokenShards(str(tmp_path / "flipped"))
    ds = ImageFolderDataset(str(class_folder), 32)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    tokenizer = Tokenizer.from_checkpoint(tiny_checkpoint)
    rows = shards.read()
    assert len(shards) == 10 and shards.flip
    assert np.array_equal(rows[0::2], tokenizer.encode(images).numpy())
    assert np.array_equal(rows[1::2], tokenizer.encode(images.flip(-1)).numpy())
    assert not np.array_equal(rows[0::2], rows[1::2])  # the mirror images do give other tokens
    assert shards.labels.tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    sources = shards.sources()
    assert [s.get("flip", False) for s in sources] == [False, True] * 5
    assert [s["name"] for s in sources[::2]] == [s["name"] for s in sources[1::2]] == ds.names
    manifest = json.loads((tmp_path / "flipped" / MANIFEST).read_text())
    assert manifest["counts"]["rows"] == 10 and manifest["counts"]["images"] == 5
    with pytest.raises(ValueError, match="flip: True there, False now"):  # a rerun with other settings
        run_tokenize(tiny_checkpoint, tmp_path / "flipped", "--data", class_folder)
