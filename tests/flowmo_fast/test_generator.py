"""The token generator: its group layout against the real FlowMo-Lo/Hi quantizer, its loss, masking and label
dropout (flowmo_fast/maskgit/model.py)."""

from __future__ import annotations

import pytest
import torch

from flowmo_fast import FlowMo, Tokenizer, load_config
from flowmo_fast.maskgit.model import (
    GeneratorConfig,
    TokenGenerator,
    bits_to_code,
    bits_to_ids,
    groups_to_ids,
    ids_to_groups,
    tokens_to_bits,
)
from flowmo_fast.overrides import with_overrides
from flowmo_kernels.lfq import lfq_indices
from train.generator_config import make_config
from train.generator_data import TokenLayout


@pytest.fixture(scope="module", params=["flowmo_lo", "flowmo_hi"])
def real_model(request):
    """The published preset's FlowMo on the meta device: real shapes and quantizer, no 945M weights."""
    with torch.device("meta"):
        return FlowMo(load_config(preset=request.param)).eval()


def test_groups_are_the_tokenizers(real_model):
    m = real_model.config.model
    config = GeneratorConfig(m.code_length, m.context_dim // m.codebook_size_for_entropy, m.codebook_size_for_entropy)
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
    return TokenGenerator(GeneratorConfig(8, 2, 9, num_classes=2, **changes))


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
    assert with_overrides(config, ["width=32", "mask_schedule=cosine"]) == GeneratorConfig(16, 2, 9, width=32,
                                                                                        mask_schedule="cosine")
    assert GeneratorConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="mask_schedule='linear'; allowed: cosine, arccos"):
        with_overrides(config, ["mask_schedule=linear"])
    with pytest.raises(ValueError, match="unknown config key 'depthh'"):
        with_overrides(config, ["depthh=3"])
    with pytest.raises(ValueError, match="must divide"):
        make_config("B", TokenLayout(256, 18, 7, 10), [])
    with pytest.raises(ValueError, match="unknown preset 'XL'; allowed: tiny, B, L"):
        make_config("XL", TokenLayout(256, 18, 9, 10), [])
    with pytest.raises(ValueError, match="unconditional"):
        TokenGenerator(config).loss(torch.zeros(2, 32, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, 32\]"):
        TokenGenerator(config).loss(torch.zeros(2, 30, dtype=torch.long))


# ---- sampling (flowmo_fast/maskgit/sampling.py) ---------------------------------------------------------------------


def train_on_patterns(steps: int = 120) -> tuple[TokenGenerator, torch.Tensor, list]:
    """A tiny generator trained on two classes whose rows are each one fixed random pattern."""
    torch.manual_seed(0)
    model = TokenGenerator(GeneratorConfig(8, 2, 9, num_classes=2, label_smoothing=0.0))
    patterns = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(5))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(steps):
        labels = torch.randint(0, 2, (32,))
        out = model.loss(patterns[labels], labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        history.append((out.loss.item(), out.accuracy.item()))
    return model.eval(), patterns, history


def test_a_tiny_generator_learns_two_patterns_and_samples_each_class():
    from flowmo_fast.maskgit.sampling import GenerationOptions, generate, sample_keys

    model, patterns, history = train_on_patterns()
    first, last = history[0][0], sum(loss for loss, _ in history[-10:]) / 10
    assert last < 0.1 * first  # masked-token loss falls (6.3 -> ~0.1)
    assert sum(acc for _, acc in history[-10:]) / 10 > 0.9
    labels = torch.tensor([0, 1] * 16)
    keys = sample_keys(0, labels.tolist(), list(range(32)))
    ids = generate(model, labels, keys, GenerationOptions(steps=8))
    own = (ids == patterns[labels]).float().mean(1)
    other = (ids == patterns[1 - labels]).float().mean(1)
    assert own.min() >= 0.8 and own.mean() > 0.95 and other.max() < 0.2  # each row is its class's pattern
    sharp = generate(model, labels, keys, GenerationOptions(steps=8, softmax_temperature=0.25))
    assert torch.equal(sharp, patterns[labels])


def test_samples_do_not_depend_on_the_batch():
    from flowmo_fast.maskgit.sampling import GenerationOptions, generate, sample_keys

    model = tiny().eval()
    labels = [0, 1, 1, 0, 1]
    keys = sample_keys(7, labels, [0, 0, 1, 1, 2])
    options = GenerationOptions(steps=6, cfg=3.0)
    together = generate(model, torch.tensor(labels), keys, options)
    for i in range(5):
        assert torch.equal(generate(model, torch.tensor(labels[i : i + 1]), keys[i : i + 1], options), together[i:i+1])
    assert len({tuple(row) for row in together.tolist()}) == 5  # distinct keys, distinct samples
    again = generate(model, torch.tensor(labels), sample_keys(8, labels, [0, 0, 1, 1, 2]), options)
    assert not torch.equal(again, together)  # the seed matters


def test_guidance_mixes_conditional_and_null_logits():
    from flowmo_fast.maskgit.sampling import guided_logits

    model = tiny().eval()
    bits = tokens_to_bits(torch.randint(0, 512, (3, 8, 2)), 9)
    classes = torch.tensor([0, 1, 0])
    with torch.no_grad():
        cond, uncond = model(bits, classes), model(bits, torch.full((3,), 2))
        assert torch.allclose(guided_logits(model, bits, classes, 2.5), uncond + 2.5 * (cond - uncond), atol=1e-5)
        assert torch.equal(guided_logits(model, bits, classes, 1.0), cond)


def test_the_plan_reveals_every_group_by_the_last_step():
    from flowmo_fast.maskgit.sampling import GenerationOptions

    for steps, n in ((8, 16), (16, 16), (64, 512), (3, 1024)):
        for schedule in ("arccos", "cosine"):
            plan = GenerationOptions(steps=steps, schedule=schedule).plan(n)
            masked = (n, *plan.masked_after)
            assert masked[-1] == 0 and all(a > b for a, b in zip(masked, masked[1:]))
    plan = GenerationOptions(steps=4, cfg=3.0, cfg_schedule="linear", temperature=2.0).plan(16)
    assert plan.cfg == (1.0, 1.5, 2.0, 2.5) and plan.temperature == (1.5, 1.0, 0.5, 0.0)
    with pytest.raises(ValueError, match="at most 16 steps"):
        GenerationOptions(steps=17).plan(16)
    with pytest.raises(ValueError, match="allowed"):
        GenerationOptions(cfg_schedule="cosine")


def test_revealed_groups_stay_and_follow_the_plan():
    from flowmo_fast.maskgit.sampling import GenerationOptions, generate, sample_keys

    model = tiny().eval()
    seen = captured_inputs(model)
    options = GenerationOptions(steps=6, cfg=1.0)
    final = generate(model, torch.tensor([0, 1, 1]), sample_keys(0, [0, 1, 1], [0, 0, 1]), options)
    plan = options.plan(16)
    revealed = [bits.ne(0).all(-1).flatten(1) for bits, _ in seen]  # [B, N] per step's input
    assert revealed[0].sum() == 0
    for k in range(1, 6):
        assert revealed[k].sum(1).tolist() == [16 - plan.masked_after[k - 1]] * 3
        assert (revealed[k] >= revealed[k - 1]).all()  # a revealed group is never masked again
        previous, now = seen[k - 1][0], seen[k][0]
        assert torch.equal(now.flatten(1, 2)[revealed[k - 1]], previous.flatten(1, 2)[revealed[k - 1]])
    assert torch.equal(tokens_to_bits(final.view(3, 8, 2), 9).flatten(1, 2)[revealed[-1]],
                       seen[-1][0].flatten(1, 2)[revealed[-1]])


def test_matmul_flops_match_torchs_count():
    from torch.utils.flop_counter import FlopCounterMode

    model = TokenGenerator(GeneratorConfig(8, 2, 9, num_classes=2, width=32, depth=3, heads=2)).eval()
    bits, classes = tokens_to_bits(torch.randint(0, 512, (5, 8, 2)), 9), torch.tensor([0, 1, 2, 0, 1])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(bits, classes)
    attention = 3 * 5 * 4 * 9**2 * 32  # QK^T and AV: torch's counter skips the CPU attention kernel
    assert model.matmul_flops(5) == counter.get_total_flops() + attention


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_the_cuda_graph_replays_generate():
    from flowmo_fast.maskgit.sampling import GenerationOptions, GraphedGenerator, generate, sample_keys

    model = tiny().cuda().eval()
    graphed = GraphedGenerator(model, compile=False)
    options = GenerationOptions(steps=6, cfg=2.0)
    labels = torch.tensor([0, 1, 1, 0], device="cuda")
    for seed in (0, 1):  # the capture, then a replay with other keys
        keys = sample_keys(seed, labels.tolist(), [0, 1, 2, 3], "cuda")
        assert torch.equal(graphed(labels, keys, options), generate(model, labels, keys, options))
    assert len(graphed.captured) == 1


def test_the_sampling_loop_never_reads_a_tensor_on_the_host():
    """On the meta device every read of a value (.item(), .tolist(), bool(), a data-dependent shape) raises: the
    loop runs there only if it has no host synchronisation, as a CUDA graph capture needs."""
    from flowmo_fast.maskgit.sampling import GenerationOptions, generate

    with torch.device("meta"):
        model = TokenGenerator(GeneratorConfig(8, 2, 9, num_classes=2)).eval()
        keys, labels = torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)
    assert generate(model, labels, keys, GenerationOptions(steps=4, cfg=2.0)).shape == (3, 16)


# ---- the training recipe: dropout ---------------------------------------------------------------------------------


def test_dropout_acts_in_training_only_and_each_key_has_an_effect():
    ids, labels = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 0, 1])
    bits = tokens_to_bits(ids_to_groups(ids, 2), 9)
    plain = tiny()
    with torch.no_grad():
        reference = plain.eval()(bits, labels)
    for key in ("dropout", "attention_dropout"):
        model = tiny(**{key: 0.3})
        model.load_state_dict(plain.state_dict())
        with torch.no_grad():
            assert torch.equal(model.eval()(bits, labels), reference), key  # eval: no dropout
            model.train()
            torch.manual_seed(1)
            first, second = model(bits, labels), model(bits, labels)
        assert not torch.allclose(first, second, atol=1e-3) and not torch.allclose(first, reference, atol=1e-3), key
    model = tiny().train()  # dropout 0 (tiny's, the default): training draws nothing, the forward is eval's
    state = torch.get_rng_state()
    with torch.no_grad():
        assert torch.equal(model(bits, labels), reference)
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match=r"model.attention_dropout=1.0: must lie in \[0, 1\)"):
        tiny(attention_dropout=1.0)


# ---- the sampler's defaults: MaskBit's tuned 18-bit configuration ---------------------------------------------------


def test_the_defaults_are_maskbits_18_bit_configuration_in_our_guidance_convention():
    """MaskBit (configs/generator/maskbit_generator_18bit.yaml, modeling/modules/sampling.py) at step i of 64 mixes
    cond + s (cond - uncond) with s = 5.7 (1 - cos(pi (i / 64)^2.5)) / 2 and adds Gumbel noise of 8.5 (1 - (i + 1) / 64)
    to log p of the drawn id: our defaults must give the same logits and noise at every step."""
    import math

    from flowmo_fast.maskgit.sampling import GenerationOptions, guided_logits

    options = GenerationOptions()
    assert (options.cfg_schedule, options.schedule, options.softmax_temperature) == ("pow_cosine", "arccos", 1.0)
    plan = options.plan(512)  # FlowMo-Lo: 256 tokens x 2 groups, MaskBit's 18 bits as 2 x 9
    assert len(plan.cfg) == 64
    model = tiny().eval()
    bits = tokens_to_bits(torch.randint(0, 512, (3, 8, 2), generator=torch.Generator().manual_seed(0)), 9)
    classes = torch.tensor([0, 1, 0])
    with torch.no_grad():
        cond, uncond = model(bits, classes), model(bits, torch.full((3,), 2))
        for i in range(64):
            s = 5.7 * (1 - math.cos(math.pi * (i / 64) ** 2.5)) / 2
            assert plan.cfg[i] == pytest.approx(1 + s, abs=1e-12)
            assert plan.temperature[i] == pytest.approx(8.5 * (1 - (i + 1) / 64), abs=1e-12)
            if i % 16 == 8:
                maskbit = cond + s * (cond - uncond)
                torch.testing.assert_close(guided_logits(model, bits, classes, plan.cfg[i]), maskbit, rtol=0, atol=1e-5)


def test_the_default_step_count_fits_the_image():
    from flowmo_fast.maskgit.sampling import GenerationOptions, default_steps, generate, sample_keys

    assert [default_steps(n) for n in (512, 1024, 256, 32, 9, 8, 1)] == [64, 64, 32, 4, 2, 1, 1]
    assert GenerationOptions().fitted(32).steps == 4 and GenerationOptions(steps=7).fitted(32).steps == 7
    with pytest.raises(ValueError, match="at most 32 steps"):
        GenerationOptions(steps=64).plan(32)  # MaskBit's 64, given explicitly, does not fit a 32-group image
    model = TokenGenerator(GeneratorConfig(16, 2, 9)).eval()  # 32 groups, unconditional: one forward per step
    calls = captured_inputs(model)
    ids = generate(model, None, sample_keys(0, [-1, -1], [0, 1]), GenerationOptions())
    assert len(calls) == 4 and ids.shape == (2, 32)
