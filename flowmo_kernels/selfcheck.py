"""Fast paths that check themselves: the first time a fast path runs for a key (which fast path, device, dtypes,
shape class), its result is compared with the plain path's; on a mismatch beyond the tolerance of its dtype, or
an error, one warning line names it, the error and the fallback, and the plain path runs for that key from then on.

One mechanism for every fast path: a `FastPathChecks` registry, owned by whoever runs the fast path (each model has
its own, no module state), records a verdict per key. Here, its use for the Triton ops (`checked_ops`: each op of a
`KernelOps` set that is not its plain twin is checked, forward and backward, on a small slice of its first call's
inputs); `flowmo_fast.fastpath` uses the same registry for compiled blocks and captured CUDA graphs.

On by default; `FLOWMO_CHECK_FAST_PATHS=0` in the environment turns every check off (the fast paths then run
unchecked). A check never runs inside torch.compile's tracing or a CUDA-graph capture (it reads a value on the
host); there the verdicts found so far apply (an op with any failed key runs its plain twin inside compiled code).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

SWITCH = "FLOWMO_CHECK_FAST_PATHS"  # "0": no checks
# The relative L2 error allowed between a fast path's float outputs (and gradients) and its plain twin's, by the
# dtype it computes in. A wrong kernel is off by far more (a missing term, a wrong index: tens of percent); bf16
# rounding differs by a few 1e-3.
REL_L2 = MappingProxyType({torch.float64: 1e-5, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2})
PROBE_ROWS = 16  # tokens (or LFQ code groups: 4x) of the small input an op is checked on


class FastPathWarning(RuntimeWarning):
    """A fast path differed from its plain twin (or failed) and is replaced by it from now on."""


@dataclass(frozen=True)
class Tolerance:
    rel_l2: float  # of each float tensor
    share: float = 0.0  # of the entries of each integer tensor that may differ (draws near a tie can flip)

    def allows(self, error: "Difference") -> bool:
        return error.rel_l2 <= self.rel_l2 and error.share <= self.share


@dataclass(frozen=True)
class Difference:
    rel_l2: float  # the largest relative L2 difference of a float tensor
    share: float  # the largest share of differing entries of an integer tensor

    def describe(self, tol: Tolerance) -> str:
        parts = [f"relative L2 {self.rel_l2:.2e} (tolerance {tol.rel_l2:.0e})"]
        if self.share:
            parts.append(f"{100 * self.share:.2g}% of integer outputs (tolerance {100 * tol.share:.2g}%)")
        return ", ".join(parts)


def tolerance(dtype: torch.dtype, share: float = 0.0) -> Tolerance:
    return Tolerance(REL_L2.get(dtype, REL_L2[torch.float32]), share)


def least_precise(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The floating dtype of the largest epsilon among `dtypes` (float32 when there is none)."""
    floats = [d for d in dtypes if d.is_floating_point]
    return max(floats, key=lambda d: torch.finfo(d).eps) if floats else torch.float32


def compute_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """The precision a result was computed in: the autocast dtype where autocast is on for the tensors' device,
    else the least precise floating dtype among them."""
    if tensors and tensors[0].device.type in ("cuda", "cpu") and torch.is_autocast_enabled(tensors[0].device.type):
        return torch.get_autocast_dtype(tensors[0].device.type)
    return least_precise([t.dtype for t in tensors])


def tensors_of(value: Any) -> list[Tensor]:
    """The tensors in a result (a tensor, or tuples, lists and named tuples of them), in order."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_of(v)]
    return []


def difference(got: Any, want: Any) -> Difference:
    """Between two results of the same structure: the largest relative L2 (in float32) of a float tensor, the
    largest share of entries that differ of another tensor; inf where shapes or kinds disagree."""
    got, want = tensors_of(got), tensors_of(want)
    if len(got) != len(want):
        return Difference(math.inf, math.inf)
    rel, share = 0.0, 0.0
    for a, b in zip(got, want):
        if a.shape != b.shape or a.is_floating_point() != b.is_floating_point():
            return Difference(math.inf, math.inf)
        if a.numel() == 0:
            continue
        if a.is_floating_point():
            a, b = a.detach().float(), b.detach().float()
            diff = float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))
            rel = max(rel, diff if not math.isnan(diff) else math.inf)  # one host read per tensor: never in a capture
        else:
            share = max(share, float((a != b).float().mean()))
    return Difference(rel, share)


def in_trace_or_capture() -> bool:
    """Inside torch.compile's tracing or a CUDA-graph capture: no check can run (it reads a value on the host)."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@dataclass
class FastPathChecks:
    """The verdicts of one owner's fast paths (a model's): key -> passed."""

    verdicts: dict = field(default_factory=dict)
    wrapped: dict = field(default_factory=dict)  # KernelOps -> its checked set (`checked_ops`)

    @staticmethod
    def enabled() -> bool:
        return os.environ.get(SWITCH, "1") != "0"

    def verdict(self, key: tuple) -> Optional[bool]:
        """True: the fast path passed; False: it failed (use the plain path); None: not checked (yet, or at all)."""
        return self.verdicts.get(key)

    def check(self, key: tuple, what: str, error: Callable[[], Difference], tol: Tolerance) -> bool:
        """Run `error()` (the fast path against the plain path; raising means the fast path failed) for `key`,
        record and return whether it passed; warn in one line when it did not."""
        try:
            value = error()
            problem = None if tol.allows(value) else f"differs from the plain path: {value.describe(tol)}"
        except Exception as e:  # a fast path that cannot run here (a compile or launch failure) falls back too
            message = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            problem = f"failed: {type(e).__name__}: {message}"
        self.verdicts[key] = problem is None
        if problem is not None:
            warnings.warn_explicit(
                f"{what} {problem}; using the plain path for it from now on ({SWITCH}=0 turns these checks off)",
                FastPathWarning, filename="flowmo", lineno=0,
            )
        return problem is None

    def accept(self, key: tuple) -> None:
        """The fast path for `key` runs unchecked: it cannot be compared (its calls draw random numbers)."""
        self.verdicts[key] = True

    def failed(self) -> list[tuple]:
        return [key for key, passed in self.verdicts.items() if not passed]


# ---- the Triton ops ---------------------------------------------------------------------------------------------
# A probe takes an op's arguments (the plain twin's signature) and returns a `Probe`: cheap to make on every call;
# its small arguments (the first PROBE_ROWS tokens of the first sample: views, strides kept) made only when a key is
# first checked.


class Probe(NamedTuple):
    shape_class: tuple  # what selects other kernel code: widths, the optional inputs present
    args: tuple  # the call's arguments in the twin's order (keyword ones too): their dtypes and devices key it
    small: Callable[[], tuple]  # the small arguments the op is checked on
    constants: tuple[int, ...]  # positions of the arguments the op takes no gradient for


def _modulate_probe(x, shift, scale, out_dtype=None):
    small = lambda: (x[:1, :PROBE_ROWS], *(v[:1] if v is not None else None for v in (shift, scale)), out_dtype)  # noqa: E731
    return Probe((x.shape[-1], scale is not None), (x, shift, scale, out_dtype), small, ())


def _gated_residual_probe(x, gate, y):
    small = lambda: (x[:1, :PROBE_ROWS], gate[:1] if gate is not None else None, y[:1, :PROBE_ROWS])  # noqa: E731
    return Probe((x.shape[-1], gate is not None), (x, gate, y), small, ())


def _qk_norm_rope_probe(q, k, q_weight, k_weight, cos, sin, out_dtype):
    heads = (slice(0, 1), slice(0, 2), slice(0, PROBE_ROWS))
    small = lambda: (q[heads], k[heads], q_weight, k_weight, cos[:PROBE_ROWS], sin[:PROBE_ROWS], out_dtype)  # noqa: E731
    return Probe((q.shape[-1],), (q, k, q_weight, k_weight, cos, sin, out_dtype), small, (4, 5))  # 4, 5: the tables


def _lfq_probe(x, with_loss=True):
    return Probe((x.shape[-1], with_loss), (x, with_loss), lambda: (x[: 4 * PROBE_ROWS], with_loss), ())


PROBES = MappingProxyType({
    "modulate": _modulate_probe,
    "gated_residual": _gated_residual_probe,
    "qk_norm_rope": _qk_norm_rope_probe,
    "lfq": _lfq_probe,
})
# How a shape class reads in a warning, per op.
SHAPE_CLASS_TEXT = MappingProxyType({
    "modulate": lambda d, modulated: (f"D={d}", "modulated" if modulated else "plain LayerNorm"),
    "gated_residual": lambda d, gated: (f"D={d}", "gated" if gated else "ungated"),
    "qk_norm_rope": lambda head_dim: (f"head dim {head_dim}",),
    "lfq": lambda d, with_loss: (f"d={d}", "with loss" if with_loss else "no loss"),
})


def _signature(args: tuple) -> tuple:
    """What else selects kernel code, cheap to hash on every call: each tensor's dtype and device, other values."""
    return tuple((a.dtype, a.device) if isinstance(a, Tensor) else a for a in args)


def _leaves(args: tuple, constants: Sequence[int]) -> tuple:
    """The arguments with every float tensor but the `constants` a fresh leaf that requires grad (a view stays a
    view: its strides are what the kernel reads)."""
    return tuple(a.detach().requires_grad_(k not in constants) if isinstance(a, Tensor) and a.is_floating_point()
                 else a for k, a in enumerate(args))


def forward_backward(op: Callable, args: tuple, constants: Sequence[int] = ()) -> list[Tensor]:
    """The op's outputs and the gradients of its float inputs (but the `constants`) under fixed random cotangents
    on its float outputs (seeded: the same for the fast op and its twin)."""
    leaves = _leaves(args, constants)
    with torch.enable_grad():
        outputs = tensors_of(op(*leaves))
        inputs = [a for a in leaves if isinstance(a, Tensor) and a.requires_grad]
        differentiable = [o for o in outputs if o.requires_grad]
        g = torch.Generator().manual_seed(0)
        total = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in differentiable)
        grads = torch.autograd.grad(total, inputs, allow_unused=True) if differentiable else ()
    grads = [gr if gr is not None else torch.zeros_like(x) for gr, x in zip(grads, inputs)]
    return [o.detach() for o in outputs] + grads


def _describe(args: tuple) -> tuple:
    return tuple(str(a.dtype).removeprefix("torch.") if isinstance(a, Tensor) else
                 str(a).removeprefix("torch.") if isinstance(a, (torch.dtype, bool)) else "-" for a in args)


class CheckedOp:
    """One fast op (`fused`) checked against its plain twin the first time each key meets it."""

    def __init__(self, name: str, fused: Callable, plain: Callable, checks: FastPathChecks, label: str):
        self.name, self.fused, self.plain, self.checks, self.label = name, fused, plain, checks, label
        self.__name__ = self.__qualname__ = f"checked_{name}"
        self.implementation = f"{getattr(fused, '__module__', '')}.{getattr(fused, '__qualname__', repr(fused))}"
        self.any_failed = False  # read inside compiled code (dynamo guards on it: a failure recompiles)

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return (self.plain if self.any_failed else self.fused)(*args, **kwargs)
        probe = PROBES[self.name](*args, **kwargs)
        key = (self.label, self.name, self.implementation, probe.shape_class, _signature(probe.args))
        passed = self.checks.verdict(key)
        if passed is None and self.checks.enabled() and not in_trace_or_capture():
            passed = self.first_check(key, probe.shape_class, probe.small(), probe.constants)
        return (self.plain if passed is False else self.fused)(*args, **kwargs)

    def first_check(self, key: tuple, shape_class: tuple, small: tuple, constants: Sequence[int]) -> bool:
        """The fast op against its twin, forward and backward, on the small arguments; recorded under `key`."""
        device = tensors_of(small)[0].device
        where = ", ".join(SHAPE_CLASS_TEXT[self.name](*shape_class))
        what = f"{self.label} {self.name} [{where}; {', '.join(_describe(small))}] on {device}"
        error = lambda: difference(forward_backward(self.fused, small, constants),  # noqa: E731
                                   forward_backward(self.plain, small, constants))
        dtypes = [a.dtype if isinstance(a, Tensor) else a for a in small if isinstance(a, (Tensor, torch.dtype))]
        passed = self.checks.check(key, what, error, tolerance(least_precise(dtypes)))
        self.any_failed = self.any_failed or not passed
        return passed


def checked_ops(checks: FastPathChecks, ops, plain_ops):
    """`ops` (a flowmo_kernels.KernelOps) with each op that is not `plain_ops`' twin checked against it (the same
    set object for the same `ops`, so compiled code that saw it is reused)."""
    if ops is plain_ops:
        return ops
    if ops not in checks.wrapped:
        changed = {}
        for f in fields(ops):
            fast, plain = getattr(ops, f.name), getattr(plain_ops, f.name)
            if f.name in PROBES and fast is not plain:
                changed[f.name] = CheckedOp(f.name, fast, plain, checks, f"kernels={ops.name}")
        checks.wrapped[ops] = type(ops)(**{f.name: changed.get(f.name, getattr(ops, f.name)) for f in fields(ops)})
    return checks.wrapped[ops]
