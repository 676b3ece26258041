"""A compiled block does not recompile for each batch size (the attention backend is looked up without it)."""

import pytest
import torch
from torch._dynamo.utils import counters

from flowmo_fast.flowmo.attention import Attention, choice_key
from flowmo_fast.flowmo.graphed_sampler import compile_blocks
from flowmo_fast.flowmo.mmdit import position_ids
from flowmo_kernels.rope import rope_tables


def test_choice_key_leaves_out_the_batch_size():
    q, k = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8)
    assert choice_key(q, k) == choice_key(q[:1], k[:1]) != choice_key(q.double(), k.double())
    assert choice_key(q, k) != choice_key(q[:, :2], k[:, :2]) != choice_key(q[:, :, :4], k)


@pytest.mark.compile
def test_compiled_block_compiles_at_most_twice_over_four_batch_sizes(tiny_model):
    """Batch 2 compiles a static graph, batch 3 a dynamic one that batches 4 and 5 reuse. A backend lookup by
    the full query shape guards the batch size into each graph: one compile per batch size."""
    block = tiny_model.decoder.double_blocks[0]
    compile_blocks(tiny_model, backend="eager")  # dynamo's graph capture alone: fast on the CPU
    hidden, p = tiny_model.decoder.params.hidden_size, tiny_model.patch_size
    ids = position_ids(tiny_model.code_length, 32 // p, 32 // p, "cpu")
    rope = rope_tables(ids, tiny_model.decoder.params.axes_dim, tiny_model.decoder.params.theta)
    ops, attention = tiny_model.ops(torch.device("cpu")), Attention("auto")
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        for b in (2, 3, 4, 5):
            img = torch.randn(b, len(ids) - tiny_model.code_length, hidden)
            txt = torch.randn(b, tiny_model.code_length, hidden)
            block(img, txt, torch.randn(b, hidden), rope, ops, attention)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    torch._dynamo.reset()
