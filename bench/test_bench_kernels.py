"""LFQ entropy loss, forward + backward at N = 8192 codes of d = 9 and 14 bits: ours (exact, never an
N x 2^d tensor) against upstream's formulation (a softmax over all 2^d codes; written out here, and as
upstream's own LFQ module when FLOWMO_REFERENCE is set), time and peak memory.

One benchmark group per d; the table's ratios compare the rows. CUDA when available, else the CPU. On
CUDA the Triton kernel and `torch.compile` of the plain PyTorch version run too: `kernels=auto` should
take whichever is faster there. Peak memory (extra_info `peak_memory_mib`) is the CUDA allocator's peak on a
GPU; on the CPU the rise of the resident set's high-water mark, measured after the timing with glibc told
to return every allocation of 64 KiB or more to the system when freed, so that the mark follows live
tensors (then told to keep allocations below 32 MiB, its default steady state: mapping and faulting in
fresh pages on every call would slow every later benchmark in the process).
"""

from __future__ import annotations

import ctypes
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F

from bench import upstream
from flowmo_kernels import triton_available
from flowmo_kernels.lfq import LFQOutput, indices_to_codes, lfq_torch

N = 8192
BITS = (9, 14)
IMPLEMENTATIONS = ("upstream_softmax", "upstream_lfq", "ours_torch", "ours_torch_compiled", "ours_triton")
CUDA_ONLY = ("ours_torch_compiled", "ours_triton")
UPSTREAM = ("upstream_softmax", "upstream_lfq")
UPSTREAM_ROUNDS = 3  # seconds per call at d = 14 on a CPU
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters
MEASURE_MMAP_THRESHOLD, DEFAULT_MMAP_THRESHOLD_MAX = 64 * 2**10, 32 * 2**20


def upstream_softmax_loss(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Upstream's formulation: logits 2 x.c over all codes c [2^d, d], temperature 0.1, N x 2^d."""
    logits = 2 * x @ codes.T / 0.1
    probs = logits.softmax(-1)
    per_sample = -(probs * logits.log_softmax(-1)).sum(-1).mean()
    avg = probs.mean(0)
    codebook = -(avg * torch.log(avg + 1e-5)).sum()
    return per_sample - codebook + F.mse_loss(x, torch.where(x > 0, 1.0, -1.0))


def our_loss(lfq: Callable[[torch.Tensor], LFQOutput]) -> Callable:
    def loss(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        out = lfq(x)
        return out.per_sample_entropy - out.codebook_entropy + out.commitment

    return loss


def upstream_lfq_loss(bits: int, device: torch.device) -> Callable:
    """Upstream's own LFQ module (from $FLOWMO_REFERENCE) in training mode: its entropy and commitment losses."""
    losses = upstream.upstream_lfq_losses(bits, device)

    def loss(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        entropy, commitment = losses(x)
        return entropy + commitment

    return loss


def loss_fn(impl: str, bits: int, device: torch.device) -> Callable:
    if impl == "upstream_softmax":
        return upstream_softmax_loss
    if impl == "upstream_lfq":
        return upstream_lfq_loss(bits, device)
    if impl == "ours_torch":
        return our_loss(lfq_torch)
    if impl == "ours_torch_compiled":
        return torch.compile(our_loss(lfq_torch))
    from flowmo_kernels.lfq_triton import lfq_triton

    return our_loss(lfq_triton)


@pytest.fixture(scope="module")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


@pytest.fixture(scope="module")
def peak_memory(device) -> Callable[[Callable], Optional[float]]:
    """fn -> MiB that one call of fn adds at its peak (None where it cannot be measured)."""
    if device.type == "cuda":

        def measure(fn):
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - before) / 2**20

        return measure
    try:
        libc = ctypes.CDLL("libc.so.6")
        _status_kib("VmHWM")
    except (OSError, StopIteration):
        return lambda fn: None

    def measure(fn):
        libc.mallopt(M_MMAP_THRESHOLD, MEASURE_MMAP_THRESHOLD)
        libc.malloc_trim(0)  # give back the free pages the timed calls left in the heap
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the high-water mark to the current resident set
            before = _status_kib("VmRSS")
            fn()
            return (_status_kib("VmHWM") - before) / 1024
        finally:
            libc.mallopt(M_MMAP_THRESHOLD, DEFAULT_MMAP_THRESHOLD_MAX)
            libc.mallopt(M_TRIM_THRESHOLD, 2 * DEFAULT_MMAP_THRESHOLD_MAX)

    return measure


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("bits", BITS)
def test_bench_lfq_loss_forward_backward(benchmark, device, peak_memory, bits, impl):
    if impl in CUDA_ONLY and not (device.type == "cuda" and triton_available()):
        pytest.skip("GPU comparison: needs CUDA and Triton")
    if impl == "upstream_lfq" and upstream.skip_reason() is not None:
        pytest.skip(upstream.skip_reason())
    g = torch.Generator().manual_seed(bits)
    x = (0.1 * torch.randn(N, bits, generator=g)).to(device).requires_grad_()
    codes = indices_to_codes(torch.arange(2**bits, device=device), bits)
    loss = loss_fn(impl, bits, device)

    def step():
        x.grad = None
        loss(x, codes).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"lfq loss fwd+bwd d={bits} N={N} ({device.type})"
    step()  # warm-up (and compilation)
    cpu = f"cpu, {torch.get_num_threads()} threads"
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if device.type == "cuda" else cpu
    if impl in UPSTREAM:
        benchmark.pedantic(step, rounds=UPSTREAM_ROUNDS, iterations=1)
    else:
        benchmark(step)
    benchmark.extra_info["peak_memory_mib"] = peak_memory(step)
    assert torch.isfinite(x.grad).all()
