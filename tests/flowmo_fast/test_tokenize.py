"""Tokenizing a data set into shards: the shard format, ids equal to Tokenizer.encode, one process or two,
resuming, failed images, KL latents, and detokenizing back to PNG files."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shard_helpers import folder_as_shards

import flowmo_fast
from flowmo_fast import Tokenizer, detokenize, tokenize
from flowmo_fast.formats.checkpoint import file_sha256
from flowmo_fast.formats.data import ImageFolderDataset, IndexedTarDataset, SamplePhotosDataset
from flowmo_fast.formats.token_shards import (
    INDEX,
    MANIFEST,
    TokenShards,
    TokenSpec,
    check_resumable,
    finished_manifest,
    index_text,
    new_manifest,
    shard_is_done,
    shard_ranges,
    smallest_uint_dtype,
    to_json,
    write_shard,
)

REPO = Path(__file__).resolve().parents[2]
SPEC = TokenSpec("ids", "uint16", (4,), 512)


def run_tokenize(ckpt, out, *extra):
    tokenize.main(["--ckpt", str(ckpt), "--out", str(out), "--image-size", "32", "--num-workers", "0", *map(str, extra)])


def stored_ids(out) -> np.ndarray:
    return TokenShards(str(out)).read()


def mtimes(folder) -> dict:
    return {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Seven small random photos in two class folders (so labels exist), of mixed sizes and modes."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(7):
        folder = root / ("cats" if i % 2 else "dogs")
        folder.mkdir(exist_ok=True)
        array = rng.integers(0, 256, (40 + 4 * i, 36, 3), dtype=np.uint8)
        Image.fromarray(array).convert("L" if i == 3 else "RGB").save(folder / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def folder_tokens(tiny_checkpoint, image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("folder_tokens")
    run_tokenize(tiny_checkpoint, out, "--data", image_folder, "--shard-size", 3, "--batch-size", 2)
    return out


@pytest.fixture(scope="module")
def photo_tokens(tiny_checkpoint, tmp_path_factory) -> Path:
    """The bundled sample photos (no --data), 2 per shard, so two processes both get work."""
    out = tmp_path_factory.mktemp("photo_tokens")
    run_tokenize(tiny_checkpoint, out, "--shard-size", 2, "--batch-size", 2)
    return out


# ----------------------------------------------------------------------------------------------- the format


@pytest.mark.parametrize(
    "vocab, dtype", [(2, "uint8"), (256, "uint8"), (257, "uint16"), (2**9, "uint16"), (2**14, "uint16"),
                     (2**16, "uint16"), (2**16 + 1, "uint32")]
)
def test_ids_use_the_smallest_unsigned_dtype(vocab, dtype):
    assert smallest_uint_dtype(vocab) == np.dtype(dtype)


def test_shard_ranges_cover_every_row_once():
    ranges = shard_ranges(10, 4)
    assert [(r.start, r.stop) for r in ranges] == [(0, 4), (4, 8), (8, 10)]
    assert shard_ranges(0, 4) == []
    with pytest.raises(ValueError, match="shard size must be a positive integer"):
        shard_ranges(10, 0)


def test_a_shard_is_done_only_when_record_and_rows_agree(tmp_path):
    rows = np.arange(8, dtype=np.uint16).reshape(2, 4)
    sources = [{"index": 0, "name": "a.png"}, {"index": 2, "name": "c.png"}]
    write_shard(str(tmp_path), 0, range(0, 3), rows, sources, [{"index": 1, "name": "b.png"}])
    assert sorted(os.listdir(tmp_path)) == ["shard-00000.json", "shard-00000.npy"]  # no temporary files left
    assert shard_is_done(str(tmp_path), 0, range(0, 3), SPEC)
    assert not shard_is_done(str(tmp_path), 0, range(0, 4), SPEC)  # another shard size
    assert not shard_is_done(str(tmp_path), 0, range(0, 3), TokenSpec("ids", "uint8", (4,), 256))
    np.save(tmp_path / "shard-00000.npy", rows[:1])  # rows lost after the record was written
    assert not shard_is_done(str(tmp_path), 0, range(0, 3), SPEC)
    (tmp_path / "shard-00000.json").write_text('{"shard": 0, "ite')  # torn record
    assert not shard_is_done(str(tmp_path), 0, range(0, 3), SPEC)
    assert not shard_is_done(str(tmp_path), 1, range(3, 6), SPEC)  # never written


def test_a_folder_of_another_run_is_refused_with_the_difference_named(tmp_path):
    data = {"source": "x", "image_size": 32, "num_images": 3, "names_sha256": "abc"}
    planned = new_manifest({"path": "a.pth", "sha256": "111", "which": "ema"}, {"model": {"x": 1}}, SPEC, data, 2)
    check_resumable(str(tmp_path / "new"), planned)  # a missing folder is fine
    (tmp_path / MANIFEST).write_text(to_json(planned))
    check_resumable(str(tmp_path), planned)
    moved = {**planned, "checkpoint": {**planned["checkpoint"], "path": "elsewhere/a.pth"}}
    check_resumable(str(tmp_path), moved)  # paths are informative only
    other = {**planned, "checkpoint": {**planned["checkpoint"], "sha256": "222"}, "shard_size": 5}
    with pytest.raises(ValueError, match=r"checkpoint.sha256: '111' there, '222' now; shard_size: 2 there, 5 now"):
        check_resumable(str(tmp_path), other)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "shard-00000.npy").write_bytes(b"")
    with pytest.raises(ValueError, match="shard files .* but no manifest.json"):
        check_resumable(str(stray), planned)


def test_reader_reads_rows_across_shards(tmp_path):
    a, b = np.arange(8, dtype=np.uint16).reshape(2, 4), np.arange(8, 20, dtype=np.uint16).reshape(3, 4)
    write_shard(str(tmp_path), 0, range(0, 2), a, [{"index": 0, "name": "a"}, {"index": 1, "name": "b"}], [])
    write_shard(str(tmp_path), 1, range(2, 4), b[:2], [{"index": 2, "name": "c"}, {"index": 3, "name": "d"}], [])
    records = [json.loads((tmp_path / f"shard-0000{k}.json").read_text()) for k in range(2)]
    data = {"source": "x", "image_size": 32, "num_images": 4, "names_sha256": "abc"}
    planned = new_manifest({"sha256": "1", "which": "ema"}, {}, SPEC, data, 2)
    (tmp_path / MANIFEST).write_text(to_json(planned))
    with pytest.raises(ValueError, match="unfinished .* run the same tokenize command again"):
        TokenShards(str(tmp_path))
    (tmp_path / MANIFEST).write_text(to_json(finished_manifest(planned, records)))
    (tmp_path / INDEX).write_text(index_text(records))
    shards = TokenShards(str(tmp_path))
    expected = np.concatenate([a, b[:2]])
    assert len(shards) == 4 and np.array_equal(shards.read(), expected)
    assert np.array_equal(shards.read(1, 3), expected[1:3]) and np.array_equal(shards[2], expected[2])
    assert [s["row"] for s in shards.sources()] == [0, 1, 2, 3]
    assert shards.sources()[2] == {"row": 2, "shard": "shard-00001.npy", "index": 2, "name": "c"}


# ------------------------------------------------------------------------------------------- the command


def test_photo_ids_equal_tokenizer_encode(photo_tokens, tiny_checkpoint):
    photos = SamplePhotosDataset(32)
    images = torch.stack([photos[i]["image"] for i in range(len(photos))])
    expected = Tokenizer.from_checkpoint(tiny_checkpoint).encode(images).numpy()
    ids = stored_ids(photo_tokens)
    assert ids.dtype == np.uint16 and ids.shape == (len(photos), 32)
    assert np.array_equal(ids, expected)
    manifest = json.loads((photo_tokens / MANIFEST).read_text())
    assert manifest["tokens"] == {"kind": "ids", "dtype": "uint16", "row_shape": [32], "vocab_size": 512}
    assert manifest["counts"] == {"images": len(photos), "rows": len(photos), "failed": 0, "shards": 5}
    assert manifest["checkpoint"]["sha256"] == file_sha256(tiny_checkpoint)
    assert manifest["config"]["model"]["code_length"] == 16
    lines = [json.loads(line) for line in (photo_tokens / INDEX).read_text().splitlines()]
    assert [(x["row"], x["index"], x["name"]) for x in lines] == [(i, i, n) for i, n in enumerate(photos.names)]


@pytest.mark.distributed
def test_two_processes_write_the_same_bytes_as_one(photo_tokens, tiny_checkpoint, tmp_path):
    out = tmp_path / "two"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
        "flowmo_fast.tokenize", "--ckpt", str(tiny_checkpoint), "--out", str(out), "--image-size", "32",
        "--num-workers", "0", "--shard-size", "2", "--batch-size", "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "5 to encode on 2 process(es)" in result.stderr
    assert "rank 1: 4 images in 2 shards" in result.stderr  # rank 1 did its share: shards 1 and 3
    one = sorted(os.listdir(photo_tokens))
    assert sorted(os.listdir(out)) == one
    for name in one:
        assert (out / name).read_bytes() == (photo_tokens / name).read_bytes(), name


def test_a_rerun_writes_nothing(folder_tokens, tiny_checkpoint, image_folder, capsys):
    before = mtimes(folder_tokens)
    run_tokenize(tiny_checkpoint, folder_tokens, "--data", image_folder, "--shard-size", 3, "--batch-size", 2)
    assert mtimes(folder_tokens) == before
    err = capsys.readouterr().err
    assert "3 already done, 0 to encode" in err and "nothing to encode" in err
    assert "index.jsonl and manifest.json unchanged" in err


def test_an_interrupted_run_redoes_only_unfinished_shards(folder_tokens, tiny_checkpoint, image_folder, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(folder_tokens, out)
    (out / "shard-00001.json").unlink()  # killed between the rows and the record of shard 1
    (out / "shard-00002.npy").unlink()  # ... or before shard 2's rows
    (out / ".tmp-abc.npy").write_bytes(b"half a shard")  # ... or in the middle of writing them
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(to_json({k: manifest[k] for k in manifest if k not in ("counts", "shards", "failed")}
                                        | {"complete": False}))
    before = mtimes(out)
    run_tokenize(tiny_checkpoint, out, "--data", image_folder, "--shard-size", 3, "--batch-size", 2)
    after = mtimes(out)
    assert after["shard-00000.npy"] == before["shard-00000.npy"]
    assert after["shard-00001.npy"] != before["shard-00001.npy"]
    assert sorted(os.listdir(out)) == sorted(os.listdir(folder_tokens))
    for name in os.listdir(folder_tokens):
        assert (out / name).read_bytes() == (folder_tokens / name).read_bytes(), name


def test_folder_ids_labels_and_order(folder_tokens, tiny_checkpoint, image_folder):
    dataset = ImageFolderDataset(str(image_folder), 32)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    expected = Tokenizer.from_checkpoint(tiny_checkpoint).encode(images).numpy()
    assert np.array_equal(stored_ids(folder_tokens), expected)
    lines = [json.loads(line) for line in (folder_tokens / INDEX).read_text().splitlines()]
    assert [x["name"] for x in lines] == sorted(str(p.relative_to(image_folder)) for p in image_folder.rglob("*.png"))
    assert {x["name"].split("/")[0]: x["label"] for x in lines} == {"cats": 0, "dogs": 1}


def test_imagenet_tar_with_upstreams_index(tiny_checkpoint, image_folder, tmp_path, make_image_tar):
    members = {
        f"n0144000{path.stem[-1]}/{path.parent.name}_{path.name}": path.read_bytes()
        for path in sorted(image_folder.rglob("*.png"))[:3]
    }
    tar_path, index_path = make_image_tar(tmp_path, members)
    out = tmp_path / "tokens"
    run_tokenize(tiny_checkpoint, out, "--imagenet-tar", tar_path, "--imagenet-index", index_path)
    dataset = IndexedTarDataset(str(tar_path), str(index_path), 32)
    images = torch.stack([dataset[i]["image"] for i in range(3)])
    assert np.array_equal(stored_ids(out), Tokenizer.from_checkpoint(tiny_checkpoint).encode(images).numpy())
    sources = TokenShards(str(out)).sources()
    assert [(s["name"], s["label"]) for s in sources] == list(zip(dataset.names, dataset.labels))
    assert sorted(dataset.labels) == [0, 1, 2]  # one synset per image


def test_shards_give_the_ids_and_labels_of_the_same_images_in_a_folder(folder_tokens, tiny_checkpoint, image_folder,
                                                                      tmp_path):
    """The folder's images as WebDataset shards (4 a shard, a .cls each): the same rows, bit for bit, and each
    row's class, named by number."""
    pattern = folder_as_shards(image_folder, tmp_path / "shards", per_shard=4)
    out = tmp_path / "tokens"
    run_tokenize(tiny_checkpoint, out, "--data", pattern, "--shard-size", 3, "--batch-size", 2)
    tokens, folder = TokenShards(str(out)), TokenShards(str(folder_tokens))
    assert np.array_equal(tokens.read(), folder.read())
    assert np.array_equal(tokens.labels, folder.labels) and sorted(set(tokens.labels)) == [0, 1]
    assert tokens.class_names == ["0", "1"] and folder.class_names == ["cats", "dogs"]
    assert [s["name"].split("/")[0] for s in tokens.sources()] == ["train-000000.tar"] * 4 + ["train-000001.tar"] * 3


def test_an_undecodable_image_is_listed_not_fatal(tiny_checkpoint, image_folder, folder_tokens, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    (data / "dogs" / "img2.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    out = tmp_path / "tokens"
    run_tokenize(tiny_checkpoint, out, "--data", data, "--shard-size", 3, "--batch-size", 2)
    manifest = json.loads((out / MANIFEST).read_text())
    names = ImageFolderDataset(str(data), 32).names
    bad = names.index("dogs/img2.png")
    assert manifest["failed"] == [{"index": bad, "name": "dogs/img2.png"}]
    assert manifest["counts"] == {"images": 7, "rows": 6, "failed": 1, "shards": 3}
    tokens = TokenShards(str(out))
    assert len(tokens) == 6 and "dogs/img2.png" not in [s["name"] for s in tokens.sources()]
    assert np.array_equal(tokens.read(), np.delete(stored_ids(folder_tokens), bad, axis=0))


def test_kl_checkpoints_write_float16_posterior_means(image_folder, tmp_path):
    torch.manual_seed(0)
    model = flowmo_fast.FlowMo(flowmo_fast.load_config(["model.quantization_type=kl"], preset="tiny"))
    ckpt = tmp_path / "kl.pth"
    flowmo_fast.save_checkpoint(ckpt, model)
    out = tmp_path / "latents"
    run_tokenize(ckpt, out, "--data", image_folder, "--shard-size", 4, "--batch-size", 4)
    latents = TokenShards(str(out)).read()
    assert latents.dtype == np.float16 and latents.shape == (7, 16, 18)
    dataset = ImageFolderDataset(str(image_folder), 32)
    with torch.no_grad():
        code = model.eval().encode(torch.stack([dataset[i]["image"] for i in range(7)]))
    mean = code[..., :18]
    assert not torch.allclose(mean, code[..., 18:])  # mean and logvar really are different halves
    np.testing.assert_allclose(latents.astype(np.float32), mean.numpy(), rtol=1e-3, atol=1e-3)
    pngs = tmp_path / "kl_png"
    detokenize.main(["--ckpt", str(ckpt), "--tokens", str(out), "--out", str(pngs), "--steps", "2", "--limit", "2"])
    assert sorted(os.listdir(pngs)) == ["00000000.png", "00000001.png"]


def test_detokenize_writes_one_png_per_row(folder_tokens, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "png"
    args = ["--ckpt", str(tiny_checkpoint), "--tokens", str(folder_tokens), "--out", str(out), "--steps", "2",
            "--batch-size", "4"]
    detokenize.main(args)
    rows = len(TokenShards(str(folder_tokens)))
    assert sorted(os.listdir(out)) == [f"{r:08d}.png" for r in range(rows)]
    with Image.open(out / "00000003.png") as image:
        assert image.size == (32, 32) and image.mode == "RGB"
        first = np.asarray(image)
    assert first.std() > 0
    (out / "00000003.png").unlink()
    detokenize.main(args + ["--batch-size", "3"])  # redoes only the missing row, with that row's own noise
    assert "6 PNGs already" in capsys.readouterr().err
    with Image.open(out / "00000003.png") as image:
        assert np.array_equal(np.asarray(image), first)


def test_clear_errors(tiny_checkpoint, folder_tokens, image_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        run_tokenize(tiny_checkpoint, tmp_path / "t", "--data", tmp_path / "missing")
    with pytest.raises(ValueError, match=r"\(shard_size: 3 there, 4 now\)\. Use a new output folder"):
        run_tokenize(tiny_checkpoint, folder_tokens, "--data", image_folder, "--shard-size", 4)
    with pytest.raises(ValueError, match="multiple of the patch size 4"):  # cli(): one line, as the others
        tokenize.main(["--ckpt", str(tiny_checkpoint), "--out", str(tmp_path / "t"), "--image-size", "30"])
    with pytest.raises(FileNotFoundError, match="is it the --out folder of flowmo_fast.tokenize"):
        detokenize.main(["--ckpt", str(tiny_checkpoint), "--tokens", str(tmp_path), "--out", str(tmp_path / "p")])


def one_line_exit(cli, argv: list) -> str:
    """A command's cli(argv) on a user's mistake: its one-line exit message (non-zero status)."""
    with pytest.raises(SystemExit) as stop:
        cli([str(a) for a in argv])
    message = str(stop.value.code)
    assert stop.value.code not in (0, None) and "\n" not in message
    return message


def test_tokenize_mistakes_end_in_one_line(tiny_checkpoint, undecodable_folder, published_cache, tmp_path):
    common = ["--out", tmp_path / "t", "--num-workers", 0]
    message = one_line_exit(tokenize.cli, ["--ckpt", tiny_checkpoint, *common, "--data", undecodable_folder])
    assert message.startswith(f"tokenize: error: none of the 3 images tried of 3 images under {undecodable_folder}")
    (tmp_path / "empty").mkdir()
    message = one_line_exit(tokenize.cli, ["--ckpt", tiny_checkpoint, *common, "--data", tmp_path / "empty"])
    assert f"no image files under {tmp_path / 'empty'}" in message
    missing = tmp_path / "shards" / "train-{000000..000009}.tar"
    message = one_line_exit(tokenize.cli, ["--ckpt", tiny_checkpoint, *common, "--data", missing])
    assert message.startswith(f"tokenize: error: 10 of the 10 shards of {missing} not found")
    message = one_line_exit(tokenize.cli, ["--ckpt", "flowmo_hi", *common])
    assert "hf download ksarge/FlowMo flowmo_hi.pth" in message


def test_tokenize_and_detokenize_take_published_names(published_cache, folder_tokens, image_folder, tiny_checkpoint, tmp_path):
    run_tokenize("flowmo_lo", tmp_path / "named", "--data", image_folder, "--shard-size", 3, "--batch-size", 2)
    assert np.array_equal(stored_ids(tmp_path / "named"), stored_ids(folder_tokens))
    manifest = json.loads((tmp_path / "named" / MANIFEST).read_text())
    assert manifest["checkpoint"]["path"].startswith(str(published_cache))
    for ckpt, out in (("flowmo_lo", tmp_path / "by-name"), (tiny_checkpoint, tmp_path / "by-path")):
        detokenize.main(["--ckpt", str(ckpt), "--tokens", str(folder_tokens), "--out", str(out), "--steps", "2", "--limit", "1"])
    assert (tmp_path / "by-name" / "00000000.png").read_bytes() == (tmp_path / "by-path" / "00000000.png").read_bytes()


def test_detokenize_mistakes_end_in_one_line(tiny_checkpoint, folder_tokens, published_cache, tmp_path):
    (tmp_path / "a-file").write_text("")
    common = ["--tokens", folder_tokens, "--steps", 2, "--limit", 1]
    message = one_line_exit(detokenize.cli, ["--ckpt", tiny_checkpoint, *common, "--out", tmp_path / "a-file"])
    assert message.startswith("detokenize: error: ") and "a-file" in message
    message = one_line_exit(detokenize.cli, ["--ckpt", "flowmo_hi", *common, "--out", tmp_path / "png"])
    assert "hf download ksarge/FlowMo flowmo_hi.pth" in message
