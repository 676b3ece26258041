"""The token generator: its group layout against the real FlowMo-Lo/Hi quantizer, its loss, masking and label
dropout (flowmo_fast/generator.py)."""

from __future__ import annotations

import pytest
import torch

from flowmo_fast import FlowMo, Tokenizer, load_config
from flowmo_fast.generator import (
    GeneratorConfig, TokenGenerator, bits_to_code, bits_to_ids, groups_to_ids, ids_to_groups, preset_config,
    tokens_to_bits,
)
from flowmo_kernels.lfq import lfq_indices


@pytest.fixture(scope="module", params=["flowmo_lo", "flowmo_hi"])
def real_model(request):
    """The published preset's FlowMo on the meta device: real shapes and quantizer, no 945M weights."""
    with torch.device("meta"):
        return FlowMo(load_config(preset=request.param)).eval()


def test_groups_are_the_tokenizers(real_model):
    m = real_model.config.model
    config = preset_config("tiny", m.code_length, m.context_dim, m.codebook_size_for_entropy)
    assert (config.groups, config.vocab_size) in ((2, 512), (4, 16384))
    code = torch.randint(0, 2, (3, m.code_length, m.context_dim), generator=torch.Generator().manual_seed(0)) * 2.0 - 1
    ids = Tokenizer(real_model).code_to_ids(code)  # [B, T * G], the rows of token shards
    groups = ids_to_groups(ids, config.groups)  # [B, T, G]
    assert torch.equal(groups_to_ids(groups), ids)
    for h in range(config.groups):  # group h is the code's channels h, h + G, ...: bit i weighs 2^i
        assert torch.equal(groups[:, :, h], lfq_indices(code[:, :, h :: config.groups]))
    bits = tokens_to_bits(groups, config.bits)  # [B, T, G, bits]
    assert torch.equal(bits_to_ids(bits), groups)
    assert torch.equal(bits_to_code(bits), code)
    assert torch.equal(real_model.quantize(bits_to_code(bits)).indices, ids)
    assert torch.equal(real_model.quantizer.codes_from_indices(ids, m.code_length), code)


def tiny(**changes) -> TokenGenerator:
    torch.manual_seed(0)
    return TokenGenerator(preset_config("tiny", 8, 18, 9, num_classes=2, **changes))


def captured_inputs(model: TokenGenerator) -> list:
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args))
    return seen


def test_masked_groups_are_zeroed_and_only_they_count():
    model = tiny(class_dropout=0.0)
    seen = captured_inputs(model)
    outputs = []
    model.register_forward_hook(lambda module, args, out: outputs.append(out))
    ids = torch.randint(0, 512, (64, 16))
    torch.manual_seed(1)
    first = model.loss(ids, torch.zeros(64, dtype=torch.long))
    bits, classes = seen[0]
    masked = bits.eq(0).all(-1)  # [B, T, G]
    assert torch.equal(bits.eq(0).any(-1), masked)  # a group is all zero or all bits
    assert torch.equal(bits[~masked], tokens_to_bits(ids_to_groups(ids, 2), 9)[~masked])
    counts = masked.flatten(1).sum(1)
    assert counts.min() >= 1 and counts.max() <= 16 and len(set(counts.tolist())) > 4  # ratios vary per image
    # The loss is the label-smoothed cross-entropy over the masked groups only; the accuracy likewise.
    logits = outputs[0].float()
    targets = ids_to_groups(ids, 2)
    expected = torch.nn.functional.cross_entropy(logits[masked], targets[masked], label_smoothing=0.1)
    assert torch.allclose(first.loss, expected, rtol=1e-5)
    assert torch.allclose(first.accuracy, (logits.argmax(-1) == targets)[masked].float().mean())
    torch.manual_seed(1)
    again = model.loss(ids, torch.zeros(64, dtype=torch.long))
    assert torch.equal(again.loss, first.loss)  # draws only from the global RNG
    assert torch.equal(classes, torch.zeros(64, dtype=torch.long))


def test_label_dropout_uses_the_null_class():
    model = tiny(class_dropout=0.25)
    seen = captured_inputs(model)
    torch.manual_seed(2)
    model.loss(torch.randint(0, 512, (2000, 16)), torch.ones(2000, dtype=torch.long))
    classes = seen[0][1]
    assert set(classes.tolist()) == {1, 2}  # 2 = the null class of a 2-class generator
    assert abs(classes.eq(2).float().mean().item() - 0.25) < 0.03
    assert tiny().loss(torch.randint(0, 512, (4, 16)), None).loss.isfinite()  # labels None: all null


def test_config_checks_and_overrides():
    config = GeneratorConfig(16, 2, 9)
    assert config.override(["width=32", "mask_schedule=cosine"]) == GeneratorConfig(16, 2, 9, width=32,
                                                                                  mask_schedule="cosine")
    assert GeneratorConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="mask_schedule"):
        config.override(["mask_schedule=linear"])
    with pytest.raises(ValueError, match="key one of"):
        config.override(["depthh=3"])
    with pytest.raises(ValueError, match="must divide"):
        preset_config("B", 256, 18, 7)
    with pytest.raises(ValueError, match="preset"):
        preset_config("XL", 256, 18, 9)
    with pytest.raises(ValueError, match="unconditional"):
        TokenGenerator(config).loss(torch.zeros(2, 32, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, 32\]"):
        TokenGenerator(config).loss(torch.zeros(2, 30, dtype=torch.long))
