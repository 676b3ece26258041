"""Known answers of MaskGiT decoding (flowmo_fast/maskgit/sampling.py, mask_ratio in flowmo_fast/maskgit/model.py),
each able to tell a plausible decoding bug from the right thing: the mask schedule's values and the plan's counts,
which groups a step reveals (by confidence, with Gumbel noise of the planned temperature), the ids a step draws
(the softmax at its temperature), and iterative decoding against one step on classes that are each a mixture of two
whole patterns. Every sampler setting is passed explicitly: the tests do not lean on today's defaults."""

from __future__ import annotations

import math

import pytest
import torch

from flowmo_fast.maskgit.model import GeneratorConfig, TokenGenerator, mask_ratio
from flowmo_fast.maskgit.sampling import GenerationOptions, generate, sample_keys


def options(steps: int, temperature: float = 0.0, softmax_temperature: float = 1.0,
            schedule: str = "arccos") -> GenerationOptions:
    """Sampler settings without guidance (cfg 1), every field given."""
    return GenerationOptions(steps=steps, cfg=1.0, cfg_schedule="constant", cfg_power=1.0, temperature=temperature,
                             softmax_temperature=softmax_temperature, schedule=schedule)


def sigma_bound(p: float, draws: int, sigmas: float = 4.5) -> float:
    """How far a frequency of `draws` Bernoulli(p) trials may stray from p: `sigmas` binomial standard deviations
    (4.5: a false alarm about once in 150,000 comparisons)."""
    return sigmas * math.sqrt(p * (1 - p) / draws)


# ---- the mask schedule and the plan ---------------------------------------------------------------------------


def test_mask_ratio_known_values():
    """arccos (MaskBit): (2 / pi) arccos(u); cosine (MaskGiT): cos(pi u / 2). A linear 1 - u gives 1/2 at u = 1/2."""
    u = torch.tensor([0.0, 0.5, math.sqrt(0.5), math.sqrt(3) / 2, 1.0], dtype=torch.float64)
    expected = torch.tensor([1.0, 2 / 3, 1 / 2, 1 / 3, 0.0], dtype=torch.float64)
    assert torch.allclose(mask_ratio(u, "arccos"), expected, atol=1e-12)
    u = torch.tensor([0.0, 1 / 3, 0.5, 2 / 3, 1.0], dtype=torch.float64)
    expected = torch.tensor([1.0, math.sqrt(3) / 2, math.sqrt(0.5), 0.5, 0.0], dtype=torch.float64)
    assert torch.allclose(mask_ratio(u, "cosine"), expected, atol=1e-12)


def test_the_plan_masks_the_schedules_counts():
    """masked_after[k] = floor(n * mask_ratio((k + 1) / steps)), clamped so that every step reveals at least one
    group and leaves one for each step to come. n = 100: arccos 100 * (0.8391, 2/3, 0.4601) and cosine
    100 * (0.9239, 0.7071, 0.3827) at u = 1/4, 1/2, 3/4."""
    assert options(2, schedule="arccos").plan(100).masked_after == (66, 0)
    assert options(2, schedule="cosine").plan(100).masked_after == (70, 0)
    assert options(4, schedule="arccos").plan(100).masked_after == (83, 66, 46, 0)
    assert options(4, schedule="cosine").plan(100).masked_after == (92, 70, 38, 0)
    # n = 9, arccos: floor(9 * ratio) = 8, 7, 6, 6, 5, 4, 2, 0; the clamps make it one group a step
    assert options(8, schedule="arccos").plan(9).masked_after == (8, 7, 6, 5, 4, 3, 2, 0)
    assert options(8).plan(8).masked_after == (7, 6, 5, 4, 3, 2, 1, 0)  # as many steps as groups: one each


def test_training_masks_follow_the_schedule():
    """Training masks ceil(mask_ratio(u) * n) groups, u ~ U[0, 1): with n = 12, more than 8 groups (ratio > 2/3)
    exactly when u < 1/2 on arccos; a linear schedule would do so for u < 1/3."""
    torch.manual_seed(0)
    model = TokenGenerator(GeneratorConfig(6, 2, 9, mask_schedule="arccos"))
    counts = model.random_mask(4000, torch.device("cpu")).flatten(1).sum(1)
    assert abs(counts.gt(8).float().mean().item() - 0.5) < sigma_bound(0.5, 4000)


# ---- which groups a step reveals, and the ids it draws --------------------------------------------------------


class FixedLogits(TokenGenerator):
    """A token generator that predicts one fixed table of logits [T, G, V] for every row, whatever it is shown,
    and keeps what it was shown (the bits of each step's input): the sampler's choices then have known answers."""

    def __init__(self, config: GeneratorConfig, table: torch.Tensor):
        super().__init__(config)
        self.table = table
        self.shown: list[torch.Tensor] = []

    def forward(self, bits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        self.shown.append(bits.clone())
        return self.table.expand(bits.shape[0], *self.table.shape)

    def revealed(self, step: int) -> torch.Tensor:
        """[B, N] bool: the groups revealed before `step` (those step `step` was shown)."""
        return self.shown[step].ne(0).all(-1).flatten(1)


def uniform_over(supports: list[int], code_length: int, groups: int, bits: int) -> torch.Tensor:
    """Logits [T, G, 2^bits]: group j (in row order) uniform over its first supports[j] ids, so whatever id is
    drawn there its log-probability (the confidence before noise) is -log supports[j]."""
    table = torch.full((code_length * groups, 2**bits), -math.inf)
    for j, k in enumerate(supports):
        table[j, :k] = 0.0
    return table.view(code_length, groups, 2**bits)


def test_without_noise_each_step_reveals_the_most_confident_groups():
    """16 groups with confidences -log K, K = 1 .. 16 in a shuffled order, temperature 0: after step k exactly
    the 16 - masked_after[k] groups of smallest K are revealed (reversed confidence reveals the largest first)."""
    supports = torch.randperm(16, generator=torch.Generator().manual_seed(1)) + 1  # [16]: K of group j
    model = FixedLogits(GeneratorConfig(8, 2, 4), uniform_over(supports.tolist(), 8, 2, 4)).eval()
    plan = options(5).plan(16)
    ids = generate(model, None, sample_keys(0, [-1] * 3, [0, 1, 2]), options(5))
    by_confidence = supports.argsort()  # most confident (K = 1) first
    for k in range(4):
        wanted = torch.zeros(16, dtype=torch.bool)
        wanted[by_confidence[: 16 - plan.masked_after[k]]] = True
        assert torch.equal(model.revealed(k + 1), wanted.expand(3, 16)), k
    assert (ids < supports).all()  # every id drawn from its group's support


@pytest.mark.parametrize("temperature, expected", [(2.0, 4 / 5), (4.0, 2 / 3)])
def test_the_gumbel_noise_reveals_by_confidence_with_the_planned_temperature(temperature, expected):
    """Two groups, confidences 0 and -log 4, one revealed at step 0 of 2; the noise there has temperature
    t = temperature * (1 - 1/2). The difference of two Gumbel(0, 1) draws is logistic, so the surer group goes first
    with probability sigmoid(log 4 / t): 4/5 at t = 1, 2/3 at t = 2. Noise 100 times too strong gives ~1/2
    (a random reveal order), reversed confidence 1 - p, an unannealed temperature sigmoid(log 4 / temperature)."""
    model = FixedLogits(GeneratorConfig(1, 2, 2), uniform_over([1, 4], 1, 2, 2)).eval()
    b = 4000
    plan = options(2, temperature).plan(2)
    assert plan.masked_after == (1, 0) and plan.temperature[0] == temperature / 2
    generate(model, None, sample_keys(0, [-1] * b, list(range(b))), options(2, temperature))
    revealed = model.revealed(1)  # [B, 2]
    assert revealed.sum(1).eq(1).all()
    assert abs(revealed[:, 0].float().mean().item() - expected) < sigma_bound(expected, b)


@pytest.mark.parametrize("softmax_temperature", [1.0, 0.5])
def test_drawn_ids_follow_the_softmax(softmax_temperature):
    """One step, logits log(0.1, 0.2, 0.3, 0.4) at all 16 groups of 1000 samples: each id's frequency over the
    16,000 draws is softmax(logits / softmax_temperature) within 4.5 binomial standard deviations
    (p^2 normalised at 0.5: 1/30, 4/30, 9/30, 16/30)."""
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    model = FixedLogits(GeneratorConfig(8, 2, 2), p.log().expand(8, 2, 4)).eval()
    b = 1000
    ids = generate(model, None, sample_keys(3, [-1] * b, list(range(b))), options(1, 1.0, softmax_temperature))
    expected = p ** (1 / softmax_temperature) / (p ** (1 / softmax_temperature)).sum()
    frequency = torch.bincount(ids.flatten(), minlength=4).double() / ids.numel()
    for f, q in zip(frequency.tolist(), expected.tolist()):
        assert abs(f - q) < sigma_bound(q, ids.numel()), (frequency, expected)


# ---- iterative decoding against one step ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixture_generator() -> tuple[TokenGenerator, torch.Tensor]:
    """A tiny generator trained (200 steps, ~2 s) on 2 classes of 4 x 2 groups, each class one of two whole
    patterns (A or B, differing in every group) with probability 1/2. Patterns [class, A/B, 8]."""
    torch.manual_seed(0)
    model = TokenGenerator(GeneratorConfig(4, 2, 9, num_classes=2, class_dropout=0.0, label_smoothing=0.0))
    g = torch.Generator().manual_seed(5)
    a = torch.randint(0, 512, (2, 8), generator=g)
    patterns = torch.stack([a, (a + torch.randint(1, 512, (2, 8), generator=g)) % 512], 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):
        labels, which = torch.randint(0, 2, (32,)), torch.randint(0, 2, (32,))
        loss = model.loss(patterns[labels, which], labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), patterns


def test_many_step_decoding_reproduces_whole_patterns_and_one_step_does_not(mixture_generator):
    """Eight steps reveal one group each: the first fixes the pattern, the rest follow it, so rows are whole
    patterns, both A and B. One step draws every group from its marginal alone (A or B each 1/2): a row is a
    patchwork, whole with probability 2 / 2^8. The gap is what iterative decoding is for."""
    model, patterns = mixture_generator
    labels = torch.tensor([0, 1] * 64)
    keys = sample_keys(0, labels.tolist(), list(range(128)))

    def whole(ids: torch.Tensor) -> torch.Tensor:  # [B, 2]: the row equals pattern A / B of its class
        return (ids[:, None] == patterns[labels]).all(-1)

    many = whole(generate(model, labels, keys, options(8, temperature=1.0)))
    one = whole(generate(model, labels, keys, options(1, temperature=1.0)))
    assert many.any(1).float().mean() > 0.9 and one.any(1).float().mean() < 0.25
    assert many.any(1).float().mean() - one.any(1).float().mean() > 0.7
    share_a = many[:, 0].sum() / many.any(1).sum()  # of the whole rows: 1/2 each if the net's marginals were exact
    assert 0.25 < share_a < 0.75, share_a  # both patterns, not one mode (this net: 49 A, 77 B)
