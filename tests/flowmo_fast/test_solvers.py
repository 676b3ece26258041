"""The sampler's ODE solvers (flowmo_fast.flowmo.sampler, plans in flowmo_fast.sampler_settings): each one's
observed order of convergence on a linear ODE with a closed-form solution, guidance included; Adams-Bashforth's
first step (and its restarts where guidance switches); decoder passes; no value read back from the device."""

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from flowmo_fast.flowmo import flops, sampler
from flowmo_fast.sampler_settings import SOLVERS, UPSTREAM, SamplingOptions

A, B, CFG = -0.7, 0.9, 1.5  # the velocity field below
ORDER = {"euler": 1, "heun": 2, "midpoint": 2, "ab2": 2}


class LinearField:
    """A decoder whose velocity is v = A z + B t c, with c the code's first entry (1 for the code, 0 for the
    null code): the guided field is A z + cfg B t. Counts its calls."""

    def __init__(self):
        self.calls = 0

    def decode(self, z, code, t):
        self.calls += 1
        return A * z + B * t.to(z.dtype).view(-1, 1, 1, 1) * code[:, :1, :1].unsqueeze(-1)


def exact(z1: torch.Tensor, b: float) -> torch.Tensor:
    """z(0) of dz/dt = A z + b t from z(1) = z1: z(t) = C e^(A t) - (b / A) t - b / A^2."""
    c = (z1 + b / A + b / A**2) * math.exp(-A)
    return c - b / A**2


def solve(options: SamplingOptions, guided: bool = True) -> torch.Tensor:
    z1 = torch.linspace(-2, 2, 12, dtype=torch.float64).view(3, 1, 2, 2)
    code = torch.ones(3, 4, 5, dtype=torch.float64)
    return sampler.sample(LinearField(), z1, code, code * 0 if guided else None, options)


def error(options: SamplingOptions, guided: bool = True) -> float:
    z1 = torch.linspace(-2, 2, 12, dtype=torch.float64).view(3, 1, 2, 2)
    want = exact(z1, CFG * B if guided and options.guidance else B)
    return float((solve(options, guided) - want).abs().max())


@pytest.mark.parametrize("schedule", ["linear", "pow_0.25"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_observed_order_of_convergence(solver, schedule):
    """Doubling the steps divides the error by 2^order: guidance at every step (one smooth guided field)."""
    options = SamplingOptions(32, CFG, schedule, None, solver)
    coarse, fine = error(options), error(options.replace(steps=64))
    assert math.log2(coarse / fine) == pytest.approx(ORDER[solver], abs=0.15), (coarse, fine)


@pytest.mark.parametrize("solver", SOLVERS)
def test_without_guidance_the_solvers_solve_the_conditional_field(solver):
    options = SamplingOptions(32, 1.0, "linear", None, solver)
    assert error(options) == pytest.approx(error(options, guided=False), abs=0)
    assert error(options) < (0.05 if solver == "euler" else 2e-3)


def field(z, t):  # a nonlinear velocity, so the Adams-Bashforth combination is not a linear accident
    return torch.sin(3 * z) + t * z


class Nonlinear:
    def decode(self, z, code, t):
        return field(z, t.to(z.dtype).view(-1, 1, 1, 1))


def test_ab2_first_step_is_euler_then_extrapolates_on_uneven_steps():
    options = SamplingOptions(3, 1.0, "pow_0.25", None, "ab2")
    z = torch.linspace(-1, 1, 8, dtype=torch.float64).view(2, 1, 2, 2)
    out = sampler.sample(Nonlinear(), z, torch.ones(2, 4, 5, dtype=torch.float64), None, options)
    times = [(k / 3) ** 4 for k in (3, 2, 1, 0)]
    want, previous = z, None
    for i in range(3):
        t, h = times[i], times[i] - times[i + 1]
        k = field(want, torch.tensor(t, dtype=torch.float32).double())
        step = k if previous is None else k + (h / previous[1]) / 2 * (k - previous[0])
        want, previous = want - h * step, (k, h)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    euler = sampler.sample(Nonlinear(), z, torch.ones(2, 4, 5, dtype=torch.float64), None, options.replace(steps=1,
                           solver="euler"))
    assert torch.equal(sampler.sample(Nonlinear(), z, torch.ones(2, 4, 5, dtype=torch.float64), None,
                                      options.replace(steps=1)), euler)


def test_ab2_restarts_where_guidance_switches():
    """The previous velocity of the other field (guided / not) is not reused: those steps are Euler's."""
    plan = UPSTREAM.replace(solver="ab2").plan()
    switches = [i for i in range(1, 25) if plan.guided[i] != plan.guided[i - 1]]
    assert len(switches) == 2  # into the interval and out of it
    assert [i for i, s in enumerate(plan.steps) if s.history == 0.0] == [0, *switches]
    assert all(s.history < 0 for i, s in enumerate(plan.steps) if i not in (0, *switches))


@pytest.mark.parametrize("solver", SOLVERS)
def test_decoder_passes_are_the_decoder_calls(solver):
    """UPSTREAM's interval guides some velocities: each is one call on a doubled batch, counted as 2 passes."""
    options = UPSTREAM.replace(steps=7, solver=solver)
    model = LinearField()
    z, code = torch.zeros(1, 1, 2, 2), torch.ones(1, 4, 5)
    sampler.sample(model, z, code, code * 0, options)
    guided = sum(s.guided + (s.stage.guided if s.stage else 0) for s in options.plan().steps)
    assert model.calls + guided == flops.decoder_passes(options)
    assert flops.decoder_passes(options.replace(cfg=1.0)) == 7 * (2 if solver in ("heun", "midpoint") else 1)
    assert guided > 0


@pytest.mark.parametrize("solver", SOLVERS)
def test_the_loop_never_reads_a_device_value(solver, monkeypatch):
    """On fake CUDA tensors any read of a value (.item(), a tensor in an `if`) raises: the loop runs on the plan,
    made on the host before it (here before the fake mode, whose CPU tensors are fake too)."""
    options = UPSTREAM.replace(steps=6, solver=solver)
    plan = options.plan()
    monkeypatch.setattr(SamplingOptions, "plan", lambda self: plan)
    with FakeTensorMode():
        z, code = torch.randn(2, 3, 4, 4, device="cuda:0"), torch.ones(2, 4, 5, device="cuda:0")
        out = sampler.sample(LinearField(), z, code, code * 0, options)
    assert out.shape == z.shape and out.device == z.device


def test_euler_is_the_default_and_an_unknown_solver_is_refused():
    assert UPSTREAM.solver == "euler" and SamplingOptions(25, 1.5, "pow_0.25", (0.17, 1.02)) == UPSTREAM
    with pytest.raises(ValueError, match="allowed are euler, heun, midpoint, ab2"):
        UPSTREAM.replace(solver="rk4")
