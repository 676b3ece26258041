"""Compiles every Triton kernel launch of the ops for real GPUs (Hopper sm_90, Ampere sm_80) on a machine
without one: PTX and cubin through Triton's bundled ptxas, so errors that the CPU interpreter cannot see
(tl.dot shape and dtype rules, register and shared-memory limits, layout conversions) fail here. For Hopper,
`ptxas -v` (Triton's flags) must also report no register spills, at the shapes of FlowMo-Lo and FlowMo-Hi
(head dims 64 and 96, LFQ codes of 9 and 14 bits).

Run as a script in a process where TRITON_INTERPRET is unset: the ops run forward and backward on CPU
tensors with `JITFunction.run` replaced by a recorder (nothing is launched; outputs are garbage), then each
distinct recorded launch is compiled for each target. Prints one line per compile; exit status 1 on any
failure or spill. The test (test_kernels_gpu_compile.py) runs a quick set, Hopper only (about a minute);
`--full` takes about 4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import traceback
from typing import NamedTuple

import torch

ARCHS = {"quick": (90,), "full": (90, 80)}  # Hopper, Ampere
LFQ_BITS = {"quick": (1, 9, 14), "full": (1, 9, 14, 18)}
SPILL_FREE_ARCH = 90
DTYPE_NAMES = {
    torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64", torch.int32: "i32",
}
LAUNCH_OPTIONS = ("num_warps", "num_stages")


def record_launches(lfq_bits: tuple[int, ...]) -> list:
    """Run every op's forward and backward at model-like shapes; return the recorded (kernel, args, kwargs)."""
    from triton.runtime.jit import JITFunction

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    from flowmo_kernels.rope import rope_tables
    from flowmo_kernels.triton_ops import TRITON_OPS as ops

    b, l, heads = 2, 300, 12  # L not a multiple of any block
    # (head dim, RoPE axes, dtypes): the encoder's 12 x 64 (both dtypes), the decoder's 12 x 96 (bf16, as run)
    shapes = ((64, (16, 24, 24), (torch.float32, torch.bfloat16)), (96, (24, 36, 36), (torch.bfloat16,)))
    for head_dim, axes, dtypes in shapes:
        cos, sin = rope_tables(torch.randint(0, 16, (l, 3)), axes)
        for dtype in dtypes:
            x = torch.randn(b, l, heads * head_dim, dtype=dtype, requires_grad=True)
            shift, scale, gate = torch.randn(3, b, 1, heads * head_dim, dtype=dtype, requires_grad=True)
            weight = torch.ones(head_dim, dtype=dtype, requires_grad=True)
            h = ops.modulate(x, shift, scale, dtype)
            qk = h.unflatten(-1, (heads, head_dim)).transpose(1, 2)  # [B, H, L, D], strided as in the model
            q, k = ops.qk_norm_rope(qk, qk * 0.5, weight, weight, cos, sin, dtype)
            y = ops.gated_residual(x, gate, (q + k).transpose(1, 2).flatten(2))
            y = ops.gated_residual(y, None, ops.modulate(y, None, None, dtype))
            lfq_and_backward(ops, y, lfq_bits if head_dim == 64 else ())
    return launches


def lfq_and_backward(ops, y, lfq_bits: tuple[int, ...]) -> None:
    """LFQ of y's values at each number of bits, then the backward of everything."""
    loss = y.float().sum()
    for d in lfq_bits:
        code = ops.lfq(y.flatten()[: 1000 * d].reshape(1000, d))
        loss = loss + code.quantized.float().sum() + code.per_sample_entropy + code.codebook_entropy
    loss.backward()


def signature_of(kernel, args, kwargs) -> tuple[dict, dict]:
    bound = dict(zip((p.name for p in kernel.params), args))
    bound.update({k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
    signature, constexprs = {}, {}
    for param in kernel.params:
        value = bound[param.name] if param.name in bound else param.default
        if param.is_constexpr or value is None:  # Triton specializes a None argument as a constant
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + DTYPE_NAMES[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {param.name}={value!r}")
    return signature, constexprs


class PtxasUsage(NamedTuple):
    registers: int
    stack_bytes: int
    spill_bytes: int  # stores + loads

    def __str__(self) -> str:
        return f"{self.registers} registers, {self.stack_bytes} B stack, {self.spill_bytes} B spilled"


def ptxas_usage(ptx: str, arch: int) -> PtxasUsage:
    """What `ptxas -v` (Triton's bundled ptxas and its flags) reports for the kernel in `ptx` on sm_<arch>."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        command = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                   f"--gpu-name={sm_arch_from_capability(arch)}", source, "-o", source + ".cubin"]
        log = subprocess.run(command, check=True, capture_output=True, text=True).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    stack, stores, loads = map(int, re.search(
        r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    return PtxasUsage(registers, stack, stores + loads)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="Ampere too, and LFQ at d = 1, 9, 14, 18")
    size = "full" if parser.parse_args().full else "quick"
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this compiles the kernels, it does not interpret them")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    seen, failures = set(), 0
    for kernel, args, kwargs in record_launches(LFQ_BITS[size]):
        signature, constexprs = signature_of(kernel, args, kwargs)
        options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
        key = (kernel.__name__, tuple(signature.items()), tuple(constexprs.items()), tuple(options.items()))
        if key in seen:
            continue
        seen.add(key)
        for arch in ARCHS[size]:
            label = f"{kernel.__name__} sm_{arch} {constexprs} {options}"
            try:
                compiled = triton.compile(
                    ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                    target=GPUTarget("cuda", arch, 32), options=options,
                )
                usage = ptxas_usage(compiled.asm["ptx"], arch) if arch == SPILL_FREE_ARCH else None
                spilled = usage is not None and usage.spill_bytes > 0
                failures += spilled
                print(f"{'SPILL' if spilled else 'ok'}   {label}: {compiled.metadata.shared} B shared, "
                      f"{compiled.metadata.num_warps} warps{f', {usage}' if usage else ''}")
            except Exception:
                failures += 1
                print(f"FAIL {label}\n{traceback.format_exc(limit=-3)}")
    print(f"{len(seen)} launches x {len(ARCHS[size])} targets, {failures} failed")
    return 1 if failures or not seen else 0


if __name__ == "__main__":
    sys.exit(main())
