"""Attention backend choice: SDPA on CPU; the fastest candidate per shape, chosen once, where there are several."""

import pytest
import torch
import torch.nn.functional as F

from flowmo_fast.flowmo.attention import Attention, Backend, sdpa


def reference(q, k, v, scale):
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


def test_sdpa_matches_plain_attention_with_mup_scale():
    q, k, v = (torch.randn(2, 3, 10, 8, dtype=torch.float64) for _ in range(3))
    assert torch.allclose(sdpa(q, k, v, 8.0 / 8), reference(q, k, v, 1.0))
    assert torch.allclose(Attention("auto")(q, k, v, 0.5), reference(q, k, v, 0.5))


def fake_backends(calls):
    def make(name):
        def fn(q, k, v, scale):
            calls.append(name)
            return reference(q, k, v, scale)
        return Backend(name, fn, half_only=False)
    return [Backend("sdpa", lambda q, k, v, s: (calls.append("sdpa"), reference(q, k, v, s))[1], half_only=False),
            make("fast"), make("slow")]


def test_fastest_backend_is_chosen_once_per_shape():
    calls, timed = [], []
    speed = {"sdpa": 2.0, "fast": 1.0, "slow": 3.0}

    def timer(backend, q, k, v, scale):
        timed.append((backend.name, tuple(q.shape)))
        return speed[backend.name]

    attention = Attention("auto", backends=fake_backends(calls), timer=timer)
    q = torch.randn(1, 2, 5, 4)
    out = attention(q, q, q, 0.5)
    assert torch.allclose(out, reference(q, q, q, 0.5))
    assert calls == ["fast"] and len(timed) == 3
    attention(q, q, q, 0.5)
    assert calls == ["fast", "fast"] and len(timed) == 3  # no re-timing for a known shape
    q2 = torch.randn(1, 2, 7, 4)
    speed["slow"] = 0.5
    attention(q2, q2, q2, 0.5)
    assert calls[-1] == "slow" and len(timed) == 6  # a new shape is timed again


def test_pinned_backend_and_unknown_names():
    calls = []
    attention = Attention("slow", backends=fake_backends(calls), timer=lambda *a: pytest.fail("no timing when pinned"))
    q = torch.randn(1, 2, 5, 4)
    attention(q, q, q, 1.0)
    assert calls == ["slow"]
    with pytest.raises(ValueError, match="'flash' is not available; available: auto, sdpa"):
        Attention("flash")


def test_half_only_backends_are_not_used_on_cpu_float32():
    calls = []
    backends = [Backend("sdpa", lambda q, k, v, s: (calls.append("sdpa"), F.scaled_dot_product_attention(q, k, v, scale=s))[1], False),
                Backend("flash", lambda *a: pytest.fail("flash must not run on CPU"), True)]
    attention = Attention("auto", backends=backends, timer=lambda *a: pytest.fail("one candidate: no timing"))
    q = torch.randn(1, 2, 5, 4)
    attention(q, q, q, 1.0)
    assert calls == ["sdpa"]
