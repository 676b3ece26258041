"""train.generator_data: token rows and labels as per-rank, resumable batches; unusable folders refused in one line."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from generator_helpers import TOKENS_PER_IMAGE, VOCAB, pattern_rows, write_token_folder

from flowmo_fast.formats.data import DataError
from flowmo_fast.formats.token_shards import MANIFEST, TokenSpec
from train.generator_data import open_tokens, token_batches


@pytest.fixture()
def labelled(tmp_path):
    """40 distinct rows (token 0 is the row's number) in 3 shards, 3 classes."""
    rng = np.random.default_rng(0)
    rows = rng.integers(0, VOCAB, (40, TOKENS_PER_IMAGE))
    rows[:, 0] = np.arange(40)
    labels = rng.integers(0, 3, 40)
    labels[:3] = [0, 1, 2]
    return write_token_folder(tmp_path / "tokens", rows, labels, shard_size=16), rows, labels


def take(stream, n):
    return list(itertools.islice(stream, n))


def test_rows_come_with_their_labels_and_ranks_share_an_epoch(labelled):
    folder, rows, labels = labelled
    data = open_tokens(str(folder))
    assert data.num_classes == 3 and data.tokens_per_image == TOKENS_PER_IMAGE and len(data.shards) == 40
    seen = []
    for rank in range(2):
        for batch in take(token_batches(data, 4, rank, 2, seed=1), 5):  # 5 x 4 = this rank's 20 rows of epoch 0
            assert batch.ids.dtype == torch.int64 and batch.ids.shape == (4, TOKENS_PER_IMAGE)
            for ids, label in zip(batch.ids.numpy(), batch.labels.numpy()):
                assert (ids == rows[ids[0]]).all() and label == labels[ids[0]]
                seen.append(int(ids[0]))
    assert sorted(seen) == list(range(40)) and seen != sorted(seen)  # each row once per epoch, shuffled


def test_a_stream_started_at_a_position_continues_the_same_stream(labelled):
    data = open_tokens(str(labelled[0]))
    straight = take(token_batches(data, 3, 1, 2, seed=5), 12)  # crosses the epoch end (20 rows per rank)
    resumed = take(token_batches(data, 3, 1, 2, seed=5, start=7 * 3), 5)
    for a, b in zip(straight[7:], resumed):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.labels, b.labels)
    other_seed = take(token_batches(data, 3, 1, 2, seed=6), 1)[0]
    assert not torch.equal(other_seed.ids, straight[0].ids)


def test_micro_batches_split_ids_and_labels_together(labelled):
    data = open_tokens(str(labelled[0]))
    batch = take(token_batches(data, 6, seed=0), 1)[0]
    parts = batch.tensor_split(2)
    assert [len(p) for p in parts] == [3, 3]
    assert torch.equal(torch.cat([p.ids for p in parts]), batch.ids)
    assert torch.equal(torch.cat([p.labels for p in parts]), batch.labels)


def test_a_data_set_without_classes_gives_no_labels(tmp_path):
    rows, _ = pattern_rows(10)
    data = open_tokens(str(write_token_folder(tmp_path / "t", rows)))
    assert data.labels is None and data.num_classes == 0
    assert take(token_batches(data, 2), 1)[0].labels is None


def one_line(error: DataError) -> str:
    text = str(error)
    assert "\n" not in text
    return text


def test_unusable_folders_are_refused_in_one_line(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(b"png")
    with pytest.raises(DataError) as e:
        open_tokens(str(tmp_path / "photos"))
    assert "no manifest.json" in one_line(e.value) and "flowmo_fast.tokenize" in str(e.value)

    kl = TokenSpec("latents", "float16", (16, 768))
    write_token_folder(tmp_path / "kl", np.zeros((4, 16, 768)), spec=kl)
    with pytest.raises(DataError) as e:
        open_tokens(str(tmp_path / "kl"))
    assert "holds latents" in one_line(e.value) and "LFQ checkpoint" in str(e.value)

    rows, labels = pattern_rows(8)
    folder = write_token_folder(tmp_path / "unfinished", rows, labels)
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(DataError) as e:
        open_tokens(str(folder))
    assert "unfinished" in one_line(e.value)

    folder = write_token_folder(tmp_path / "old", rows, labels)
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest["classes"]  # written before tokenize recorded classes
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError) as e:
        open_tokens(str(folder))
    assert "did not record classes" in one_line(e.value)

    folder = write_token_folder(tmp_path / "misfit", rows, labels)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["config"]["model"]["codebook_size_for_entropy"] = 6  # 18 bits in 3 ids of 6: 48 ids of 64, not 32
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError) as e:
        open_tokens(str(folder))
    assert "rows of 32 ids below 512 do not fit the tokenizer config" in one_line(e.value)
