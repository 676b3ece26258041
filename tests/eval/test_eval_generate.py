"""eval.generate: token shards in tokenize's format from a generator checkpoint, the same from 1 or 2 processes,
resumable, decoded into PNGs and an ADM-style samples.npz (shuffled, streamed); a flag for every sampler setting
with MaskBit's defaults; one batch size per call; one autocast on every CUDA path; its mistakes end in one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from generation_helpers import save_generator, tiny_generator

import flowmo_fast
from eval import generate
from flowmo_fast import detokenize
from flowmo_fast.formats.checkpoint import file_sha256
from flowmo_fast.formats.token_shards import TokenShards
from flowmo_fast.maskgit.model import GeneratorConfig, TokenGenerator

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def generator_checkpoint(tiny_checkpoint, tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A tiny generator trained until each of two classes is one fixed pattern."""
    model = tiny_generator()
    patterns = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        labels = torch.randint(0, 2, (32,))
        loss = model.loss(patterns[labels], labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_generator(model, tiny_checkpoint, tmp_path_factory.mktemp("generator") / "00000150.pth"), patterns


@pytest.fixture(scope="module")
def random_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """An untrained generator: its samples are near-uniform draws, so every noise stream shows in them."""
    return save_generator(tiny_generator(), tiny_checkpoint, tmp_path_factory.mktemp("random") / "00000000.pth")


ARGS = ["--per-class", "3", "--steps", "8", "--shard-size", "4", "--batch-size", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def generated(generator_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("generated") / "out"
    generate.main(["--generator", str(generator_checkpoint[0]), "--out", str(out), *ARGS])
    return out


@pytest.fixture(scope="module")
def random_rows(random_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("random_rows") / "out"
    generate.main(["--generator", str(random_checkpoint), "--out", str(out), *ARGS])
    return out


def mtimes(folder: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}


def test_rows_are_token_shards_of_each_class(generated, generator_checkpoint):
    patterns = generator_checkpoint[1]
    shards = TokenShards(str(generated))
    assert len(shards) == 6 and shards.spec.dtype == "uint16" and len(shards.shards) == 2
    sources = shards.sources()
    assert [s["label"] for s in sources] == [0, 0, 0, 1, 1, 1]
    assert [s["name"] for s in sources][:2] == ["cat/000000", "cat/000001"]
    rows = torch.from_numpy(shards.read().astype(np.int64))
    labels = torch.tensor([s["label"] for s in sources])
    match = (rows == patterns[labels]).float().mean(1)
    assert match.min() >= 0.8  # each row is its class's pattern (a sample may differ in a few groups)
    assert len({tuple(r) for r in rows.tolist()}) > 1  # samples of one class are not all the same draw
    manifest = shards.manifest
    assert manifest["checkpoint"]["sha256"] == file_sha256(manifest["checkpoint"]["path"])  # the tokenizer's
    assert manifest["generation"]["options"]["steps"] == 8 and manifest["generation"]["classes"] == [0, 1]
    assert manifest["generation"]["seed"] == 0


def test_a_rerun_writes_nothing_and_a_lost_shard_is_redone(random_rows, random_checkpoint, tmp_path):
    generated = random_rows
    before = mtimes(generated)
    generate.main(["--generator", str(random_checkpoint), "--out", str(generated), *ARGS])
    assert mtimes(generated) == before
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in os.listdir(generated):
        (copy / name).write_bytes((generated / name).read_bytes())
    (copy / "shard-00001.json").unlink()  # an interrupted run: shard 1 never finished
    kept = (copy / "shard-00000.npy").stat().st_mtime_ns
    generate.main(["--generator", str(random_checkpoint), "--out", str(copy), *ARGS])
    assert (copy / "shard-00000.npy").stat().st_mtime_ns == kept
    for name in ("shard-00001.npy", "shard-00001.json", "manifest.json", "index.jsonl"):
        assert (copy / name).read_bytes() == (generated / name).read_bytes(), name


def test_classes_by_name_or_index_and_batching(random_rows, random_checkpoint, tmp_path):
    out = tmp_path / "dogs"
    generate.main(["--generator", str(random_checkpoint), "--out", str(out), "--classes", "1",
                   *ARGS[:-4], "--batch-size", "3", "--device", "cpu"])
    dogs = TokenShards(str(out))
    assert [s["label"] for s in dogs.sources()] == [1, 1, 1]
    # the same samples (dog 0-2) as in the two-class run, made in batches of 3 instead of 2
    assert np.array_equal(dogs.read(), TokenShards(str(random_rows)).read(3, 6))
    assert len({tuple(r) for r in dogs.read().tolist()}) == 3


def test_a_ranks_share_of_the_pngs_does_not_shift_with_what_others_wrote(tmp_path):
    """Each process lists the PNGs still to decode when it gets there: rank 0 may have written some by then. Its
    share must depend on the row alone (rank 1 of 2: rows 1, 3, 5 whatever rank 0 wrote), else rows are left to no
    one (a share of the rows still missing, [1, 2, 3, 4, 5][1::2] = [2, 4], dropped row 1: a failed two-process run)."""
    (tmp_path / detokenize.png_path("", 0)).write_bytes(b"written by rank 0")
    assert detokenize.rows_to_decode(6, str(tmp_path), 1, 2) == [1, 3, 5]
    assert detokenize.rows_to_decode(6, str(tmp_path), 0, 2) == [2, 4]
    assert detokenize.rows_to_decode(6, str(tmp_path)) == [1, 2, 3, 4, 5]  # one process: every missing row


@pytest.mark.distributed
def test_two_processes_write_the_same_bytes_as_one(random_rows, random_checkpoint, tiny_checkpoint, tmp_path):
    decode = ["--tokenizer", str(tiny_checkpoint), "--decode-steps", "2", "--decode-batch-size", "2"]
    one = tmp_path / "one"  # the one-process rows, decoded by one process
    shutil.copytree(random_rows, one)
    generate.main(["--generator", str(random_checkpoint), "--out", str(one), *ARGS, *decode])
    out = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
               "eval.generate", "--generator", str(random_checkpoint), "--out", str(out), *ARGS, *decode]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 to make on 2 process(es)" in result.stderr and "rank 1: 2 samples" in result.stderr
    names = sorted(os.listdir(one))
    assert sorted(os.listdir(out)) == names
    for name in names + [f"images/{r:08d}.png" for r in range(6)]:
        if name not in ("images", "samples.npz"):  # a zip records when it was written
            assert (out / name).read_bytes() == (one / name).read_bytes(), name
    with np.load(out / "samples.npz") as two_npz, np.load(one / "samples.npz") as one_npz:
        assert all(np.array_equal(two_npz[k], one_npz[k]) for k in ("arr_0", "arr_1"))


def test_decoded_into_pngs_and_an_adm_npz(generated, generator_checkpoint, tiny_checkpoint, tmp_path):
    out = tmp_path / "decoded"
    generate.main(["--generator", str(generator_checkpoint[0]), "--out", str(out), *ARGS,
                   "--tokenizer", str(tiny_checkpoint), "--decode-steps", "2", "--decode-batch-size", "3"])
    assert sorted(os.listdir(out / "images")) == [f"{r:08d}.png" for r in range(6)]
    before = {**mtimes(out), **mtimes(out / "images")}
    generate.main(["--generator", str(generator_checkpoint[0]), "--out", str(out), *ARGS,
                   "--tokenizer", str(tiny_checkpoint), "--decode-steps", "2", "--decode-batch-size", "3"])
    assert {**mtimes(out), **mtimes(out / "images")} == before  # a rerun decodes and writes nothing
    with np.load(out / "samples.npz") as npz:
        assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (6, 32, 32, 3)
        rows = npz["rows"]  # ADM's order: shuffled (seeded), the labels in the same order
        assert sorted(rows.tolist()) == list(range(6)) and rows.tolist() != list(range(6))
        assert np.array_equal(rows, generate.sample_order(6, 0))
        assert npz["arr_1"].tolist() == [[0, 0, 0, 1, 1, 1][r] for r in rows]
        # the PNGs are detokenize's of the same rows with the same seed and sampler (and batches: a float32 matrix
        # product's rounding depends on the batch it runs in, which can move a pixel by one level; 3 divides 6, so
        # no batch is padded)
        detokenize.main(["--ckpt", str(tiny_checkpoint), "--tokens", str(generated), "--out", str(tmp_path / "d"),
                         "--steps", "2", "--device", "cpu", "--batch-size", "3"])
        from PIL import Image

        again = np.stack([np.asarray(Image.open(tmp_path / "d" / f"{r:08d}.png")) for r in range(6)])
        assert np.array_equal(npz["arr_0"], again[rows])


def one_line_exit(argv: list) -> str:
    with pytest.raises(SystemExit) as stop:
        generate.cli([str(a) for a in argv])
    message = str(stop.value.code)
    assert stop.value.code not in (0, None) and "\n" not in message and message.startswith("generate: error:")
    return message


def test_mistakes_end_in_one_line(generated, generator_checkpoint, tiny_checkpoint, tmp_path):
    ckpt = generator_checkpoint[0]
    assert "neither a class name" in one_line_exit(["--generator", ckpt, "--out", tmp_path / "a", "--classes",
                                                    "bird", *ARGS])
    assert "at most 32 steps" in one_line_exit(["--generator", ckpt, "--out", tmp_path / "b", "--steps", "33",
                                                "--device", "cpu"])
    assert "not a token generator checkpoint" in one_line_exit(["--generator", tiny_checkpoint, "--out",
                                                                tmp_path / "c", "--device", "cpu"])
    assert "not found" in one_line_exit(["--generator", tmp_path / "missing.pth", "--out", tmp_path / "d"])
    assert "other settings" in one_line_exit(["--generator", ckpt, "--out", generated, *ARGS, "--cfg", "2"])
    # another seed is other samples: a rerun must not report the first seed's rows as done (they hold seed 0's)
    assert "other settings" in one_line_exit(["--generator", ckpt, "--out", generated, *ARGS, "--seed", "1"])
    assert "without checkpoints" in one_line_exit(["--generator", tmp_path, "--out", tmp_path / "e"])


def test_an_unconditional_generator_makes_per_class_rows_in_all(tiny_checkpoint, tmp_path):
    torch.manual_seed(0)
    model = TokenGenerator(GeneratorConfig(16, 2, 9))  # num_classes 0
    ckpt = save_generator(model, tiny_checkpoint, tmp_path / "00000000.pth", classes=None)
    generate.main(["--generator", str(ckpt), "--out", str(tmp_path / "u"), *ARGS])
    shards = TokenShards(str(tmp_path / "u"))
    assert len(shards) == 3 and shards.manifest["classes"] is None
    assert [s["name"] for s in shards.sources()] == ["sample/000000", "sample/000001", "sample/000002"]
    assert all("label" not in s for s in shards.sources()) and not (tmp_path / "u" / "labels.npy").exists()
    assert "unconditional" in one_line_exit(["--generator", ckpt, "--out", tmp_path / "v", "--classes", "0", *ARGS])


# ---- the sampler's flags and defaults -----------------------------------------------------------------------------


def test_every_sampler_setting_has_a_flag_with_its_maskbit_default(capsys):
    import dataclasses

    from flowmo_fast.maskgit.sampling import GenerationOptions

    with pytest.raises(SystemExit):
        generate.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = (("--cfg", "6.7, MaskBit's 5.7 + 1"), ("--cfg-power", "2.5"), ("--temperature", "8.5"),
                ("--softmax-temperature", "1.0"), ("--mask-schedule", "arccos"), ("--cfg-schedule", "pow_cosine"))
    for flag, default in defaults:
        assert flag in text and f"default {default}" in text, flag
    assert "--steps" in text and "default: fit the image: 64 for 512 groups per image and more" in text
    chosen = dict(steps=5, cfg=2.0, cfg_schedule="linear", cfg_power=1.5, temperature=3.0, softmax_temperature=0.5,
                  schedule="cosine")
    assert set(chosen) == {f.name for f in dataclasses.fields(GenerationOptions)}  # one of each, every field
    flag = {"schedule": "--mask-schedule"}
    argv = ["--generator", "g", "--out", "o"]
    for name, value in chosen.items():
        argv += [flag.get(name, "--" + name.replace("_", "-")), str(value)]
    assert generate.settings_from(generate.parse_args(argv)).options == GenerationOptions(**chosen)
    assert generate.settings_from(generate.parse_args(argv[:4])).options == GenerationOptions()


def test_without_steps_the_count_fits_the_image_and_the_log_says_the_rule(random_checkpoint, tmp_path, capsys):
    out = tmp_path / "fit"
    generate.main(["--generator", str(random_checkpoint), "--out", str(out), "--per-class", "1", "--device", "cpu"])
    log = capsys.readouterr().err
    assert "4 decoding steps for 32 groups per image (no --steps: MaskBit's 64 for 512 groups" in log
    assert TokenShards(str(out)).manifest["generation"]["options"]["steps"] == 4  # the resolved count is recorded


# ---- CUDA paths, batch sizes, samples.npz -------------------------------------------------------------------------


def test_the_eager_and_the_graphed_sampler_run_under_the_same_autocast(monkeypatch):
    """--no-graph on CUDA must run under the bf16 autocast the graphed path runs under (a CPU build cannot enter
    CUDA autocast, so the autocast context and both samplers are stand-ins that record what runs inside what)."""
    import contextlib

    from flowmo_fast.maskgit.model import LoadedGenerator

    inside, seen = [], []

    @contextlib.contextmanager
    def autocast_for(device):
        inside.append(torch.device(device))
        yield
        inside.pop()

    class Graphed:
        def __init__(self, model):
            pass

        def __call__(self, labels, keys, options):
            seen.append(("graph", list(inside)))

    monkeypatch.setattr(generate, "autocast_for", autocast_for)
    monkeypatch.setattr(generate, "GraphedGenerator", Graphed)
    monkeypatch.setattr(generate, "generate", lambda model, labels, keys, options: seen.append(("eager", list(inside))))
    loaded = LoadedGenerator(tiny_generator(), None, 0)
    cuda = torch.device("cuda", 0)
    for graph in (True, False):
        generate.make_sampler(loaded, cuda, graph)(None, torch.zeros(2, dtype=torch.long), None)
    assert seen == [("graph", [cuda]), ("eager", [cuda])]


def test_a_short_last_batch_is_padded_to_the_batch_size(random_rows, random_checkpoint, tiny_checkpoint, tmp_path,
                                                        monkeypatch):
    """6 rows in shards of 4 with batches of 3: without padding the generator sees 3, 1, 2 rows and the decoder
    4, 2, each new size a new CUDA graph capture (or recompile) on a GPU. Padded: one size each, and the same rows
    (a sample depends on its key alone) and pictures (to float32 rounding: a pixel level)."""
    sizes = {"generate": [], "decode": []}
    real_generate, real_decode = generate.generate, flowmo_fast.FlowMo.sample_images

    def counted_generate(model, labels, keys, options):
        sizes["generate"].append(len(keys))
        return real_generate(model, labels, keys, options)

    def counted_decode(self, code, *args, **kwargs):
        sizes["decode"].append(len(code))
        return real_decode(self, code, *args, **kwargs)

    monkeypatch.setattr(generate, "generate", counted_generate)
    monkeypatch.setattr(flowmo_fast.FlowMo, "sample_images", counted_decode)
    out = tmp_path / "padded"
    generate.main(["--generator", str(random_checkpoint), "--out", str(out), *ARGS[:-4], "--batch-size", "3",
                   "--device", "cpu", "--tokenizer", str(tiny_checkpoint), "--decode-steps", "2",
                   "--decode-batch-size", "4"])
    assert sizes == {"generate": [3, 3, 3], "decode": [4, 4]}
    assert np.array_equal(TokenShards(str(out)).read(), TokenShards(str(random_rows)).read())  # made in batches of 2
    monkeypatch.setattr(flowmo_fast.FlowMo, "sample_images", real_decode)
    detokenize.main(["--ckpt", str(tiny_checkpoint), "--tokens", str(out), "--out", str(tmp_path / "d"), "--steps", "2",
                     "--device", "cpu", "--batch-size", "2"])
    from PIL import Image

    for r in range(6):
        ours, theirs = (np.asarray(Image.open(folder / f"{r:08d}.png")).astype(int)
                        for folder in (out / "images", tmp_path / "d"))
        assert np.abs(ours - theirs).max() <= 1 and (ours != theirs).mean() < 0.01, r


def test_samples_npz_is_written_one_picture_at_a_time_in_a_seeded_shuffled_order(generated, tmp_path):
    """A 50,000-image samples.npz is 9.8 GB at 256 px: memory while writing it holds a picture or two, never the
    whole array (measured with tracemalloc, which counts numpy's buffers); NumPy and the ADM-style reader
    (eval.image_sets.NpzImages) read it back in the shuffled order."""
    import tracemalloc

    from PIL import Image

    from eval.image_sets import NpzImages

    out = tmp_path / "big"
    shutil.copytree(generated, out)
    (out / "images").mkdir()
    rng = np.random.default_rng(0)
    pictures = rng.integers(0, 256, (6, 128, 128, 3), dtype=np.uint8)
    for r, picture in enumerate(pictures):
        Image.fromarray(picture).save(out / "images" / f"{r:08d}.png")
    tracemalloc.start()
    try:
        path = generate.write_samples(str(out), 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * pictures[0].nbytes, (peak, pictures[0].nbytes)  # the whole array: 6 pictures
    order = generate.sample_order(6, 0)
    assert not np.array_equal(order, np.arange(6)) and not np.array_equal(order, generate.sample_order(6, 1))
    with np.load(path) as npz:
        assert np.array_equal(npz["arr_0"], pictures[order]) and np.array_equal(npz["rows"], order)
        assert npz["arr_1"].tolist() == [[0, 0, 0, 1, 1, 1][r] for r in order]
    assert np.array_equal(torch.cat(list(NpzImages(path).batches(4))).permute(0, 2, 3, 1).numpy(), pictures[order])


def test_decode_flags_reach_the_sampler_settings():
    """--decode-steps, --decode-cfg, --decode-solver, --decode-sampler: the tokenizer's sampler settings the user
    gave (None: the checkpoint's own)."""
    from flowmo_fast.sampler_settings import SamplingOverrides

    base = ["--generator", "g.pth", "--out", "o"]
    assert generate.settings_from(generate.parse_args(base)).decode == SamplingOverrides()
    args = generate.parse_args([*base, "--decode-steps", "8", "--decode-solver", "ab2"])
    assert generate.settings_from(args).decode == SamplingOverrides(steps=8, solver="ab2")
    args = generate.parse_args([*base, "--decode-sampler", "fast", "--decode-steps", "8"])
    assert generate.settings_from(args).decode == SamplingOverrides(steps=8, solver="ab2")  # the flag over the name
    with pytest.raises(SystemExit):
        generate.parse_args([*base, "--decode-solver", "rk4"])
