"""What a run reports: running means of the loss terms, throughput, memory and MFU, written as one stdout
line per `trainer.log_every` steps and as TensorBoard scalars, plus a progress bar with ETA (rank 0)."""

from __future__ import annotations

import resource
import time
from typing import Optional

import torch
from torch import Tensor

from flowmo_fast.distributed import Processes
from flowmo_fast.flowmo.flops import train_step_flops
from flowmo_fast.hardware import peak_bf16_tflops
from train.parallel import sum_across_ranks


def peak_flops(device: torch.device) -> Optional[float]:
    """Dense bf16 peak FLOP/s of a CUDA device (flowmo_fast.hardware), None elsewhere: no MFU."""
    if device.type != "cuda":
        return None
    tflops = peak_bf16_tflops(torch.cuda.get_device_name(device))
    return tflops * 1e12 if tflops else None


def flowmo_flops_per_step(config, micro_batch: int) -> float:
    """FLOPs of FlowMo's forward and backward in one optimizer step per rank (all micro-batches; the perceptual
    net and the LLM not counted): flowmo_fast.flowmo.flops, the count the benchmarks report too."""
    size = config.data.image_size
    return float(train_step_flops(config, size, size) * micro_batch * config.opt.n_grad_acc)


def peak_memory_gb(device: torch.device) -> float:
    """Peak device memory allocated (CUDA), else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


class MetricLogger:
    """Collects per-step device scalars without syncing; `log()` averages them over steps and ranks."""

    def __init__(
        self,
        procs: Processes,
        log_dir: str,
        max_steps: int,
        start_step: int,
        images_per_step: int,
        flops_per_step: Optional[float],
    ):
        self.procs = procs
        self.images_per_step = images_per_step  # over all ranks
        self.peak = peak_flops(procs.device)
        self.flops_per_step = flops_per_step  # per rank; None: no MFU
        self.sums: dict[str, Tensor] = {}
        self.count = 0
        self.tic, self.tic_step = time.perf_counter(), start_step
        self.writer = self.bar = None
        if procs.is_main:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm import tqdm

            self.writer = SummaryWriter(log_dir)
            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True, smoothing=0.05)

    def add(self, terms: dict[str, Tensor]) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, extra: dict[str, float], skipped_images: Optional[int] = None) -> dict[str, float]:
        """Write the means since the last call, averaged over ranks, with `extra` and the images skipped so
        far on all ranks (None: a trainer whose data cannot fail to decode; every rank must call: one
        all-reduce); returns what was written."""
        values = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        if skipped_images is not None:
            values["skipped_images"] = torch.tensor(float(skipped_images))
        totals = sum_across_ranks(values, self.procs.device)
        means = {k: v / self.procs.world_size for k, v in totals.items() if k != "skipped_images"}
        if skipped_images is not None:
            means["skipped_images"] = totals["skipped_images"]
        elapsed = time.perf_counter() - self.tic
        steps_per_sec = (step - self.tic_step) / elapsed if elapsed > 0 else 0.0
        means.update(extra)
        means["steps_per_sec"] = steps_per_sec
        means["images_per_sec"] = steps_per_sec * self.images_per_step
        means["peak_memory_gb"] = peak_memory_gb(self.procs.device)
        if self.peak and self.flops_per_step:
            means["mfu"] = self.flops_per_step * steps_per_sec / self.peak
        if self.procs.is_main:
            for k, v in means.items():
                self.writer.add_scalar(k, v, global_step=step)
            self.writer.flush()
            self.bar.set_postfix(loss=f"{means.get('total_loss', float('nan')):.4f}", refresh=False)
            self.write(f"step {step} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in means.items()))
        self.sums, self.count = {}, 0
        self.tic, self.tic_step = time.perf_counter(), step
        return means

    def write(self, line: str) -> None:
        """A line on stdout that does not break the progress bar (rank 0 only)."""
        if self.bar is not None:
            self.bar.write(line)

    def note(self, line: str) -> None:
        """A line from any rank: through the progress bar on rank 0, with the rank's number elsewhere."""
        if self.procs.is_main:
            self.write(line)
        else:
            print(f"[rank {self.procs.rank}] {line}", flush=True)

    def add_image(self, tag: str, image, step: int) -> None:
        if self.writer is not None:
            import numpy as np

            self.writer.add_image(tag, np.asarray(image), global_step=step, dataformats="HWC")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
