"""The training loop of `train.pretrain` and `train.posttrain` (upstream `flowmo/train.py`), top to bottom:
start point, model, objective and wrapping, optimizer, data, then steps with logging, samples, checkpoints.

Each step: one batch per rank, split into `opt.n_grad_acc` micro-batches (gradients reduced on the last),
bf16 autocast on CUDA, Adam step, weight norms reset to their initial values, EMA every 10 steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from typing import Iterator

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

from flowmo_fast.checkpoint import CheckpointError, check_state_dict, read_checkpoint, select_state_dict
from flowmo_fast.config import Config
from flowmo_fast.data import build_dataset, first_valid_images, make_loader
from flowmo_fast.model import FlowMo, autocast_for
from train import checkpointing, parallel
from train.checkpointing import Progress
from train.ema import EMA
from train.metrics import MetricLogger, flowmo_flops_per_step, peak_flops
from train.norms import WeightNormFixer
from train.objective import FlowMoObjective
from train.perceptual import build_perceptual_loss
from train.samples import GRID_IMAGES, grid_path, reconstruction_grid

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class NonFiniteLoss(RuntimeError):
    pass


def build_optimizer(model: FlowMo, config: Config) -> torch.optim.Optimizer:
    """Adam (AdamW when opt.weight_decay > 0) over the trainable parameters: encoder group, decoder group."""
    groups = [{"params": [p for p in tower.parameters() if p.requires_grad]} for tower in (model.encoder, model.decoder)]
    opt = config.opt
    cls = torch.optim.AdamW if opt.weight_decay else torch.optim.Adam
    return cls([g for g in groups if g["params"]], lr=opt.lr, betas=(opt.beta1, opt.beta2), weight_decay=opt.weight_decay)


def total_norm(tensors) -> torch.Tensor:
    return parallel.full_tensor(torch.nn.utils.get_total_norm(list(tensors)))


def train_step(wrapped, objective, model, images, optimizer, config: Config, device) -> dict[str, torch.Tensor]:
    """One optimizer step on one batch; returns the loss terms (mean over micro-batches) and norms."""
    optimizer.zero_grad(set_to_none=True)
    n = config.opt.n_grad_acc
    terms: dict[str, torch.Tensor] = {}
    for i, chunk in enumerate(images.tensor_split(n)):
        with parallel.gradient_sync(wrapped, model, enabled=i == n - 1):
            with autocast_for(device, config.trainer.enable_bfloat16):
                loss, chunk_terms = wrapped(chunk)
            (loss / n).backward()
        for k, v in chunk_terms.items():
            terms[k] = terms[k] + v / n if k in terms else v / n
    if config.opt.log_norms:
        trained = [p for p in model.parameters() if p.grad is not None]
        terms["debug/original_grad_norm"] = total_norm(p.grad for p in trained)
        terms["debug/param_norm"] = total_norm(trained)
    optimizer.step()
    return terms


def next_images(batches: Iterator[dict], minimum: int, config: Config, data_size: int, note) -> tuple[torch.Tensor, int, int]:
    """(images, images skipped, samples drawn): the next batch with at least `minimum` decodable images."""
    skipped = drawn = 0
    while True:
        batch = next(batches)
        drawn += config.data.batch_size
        skipped += batch["skipped"]
        for name in batch["skipped_names"]:
            note(f"skipped an image that does not decode: {name}")
        if batch["image"].shape[0] >= minimum:
            return batch["image"], skipped, drawn
        if drawn > 2 * max(data_size, config.data.batch_size):
            raise RuntimeError(
                f"{drawn} images drawn without a batch of {minimum} that decode ({skipped} failed): "
                "check that the data files are readable images"
            )


class NonFiniteWatch:
    """Remembers, on the device (no sync per step), the first step (counted from 1) whose loss was NaN or inf."""

    def __init__(self, device: torch.device):
        self.first = torch.full((), -1, dtype=torch.long, device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        self.first = torch.where((self.first < 0) & ~torch.isfinite(loss), step, self.first)

    def check(self, env: parallel.Distributed, last_good: str) -> None:
        """Raise on every rank if any rank saw a non-finite loss."""
        first = int(self.first.item())
        first = parallel.min_across_ranks(first if first >= 0 else 2**62, env)
        if first < 2**62:
            raise NonFiniteLoss(
                f"the loss became NaN or inf at step {first}; stopping without saving. "
                f"Last good checkpoint: {last_good or 'none yet'}. Lower opt.lr (or check the data) and rerun "
                "the same command to resume from it."
            )


def run(args: argparse.Namespace, config: Config) -> int:
    """Train until trainer.max_steps (or SIGTERM); returns the process exit code."""
    env = parallel.init_distributed()
    try:
        return train(args, config, env)
    except NonFiniteLoss as e:
        if env.is_main:
            print(f"error: {e}", flush=True)
        return 1
    except (FileNotFoundError, CheckpointError) as e:  # a missing or unusable input file: say which
        if env.is_main:
            print(f"error: {e}", flush=True)
        return 2
    finally:
        parallel.shutdown()


def train(args: argparse.Namespace, config: Config, env: parallel.Distributed) -> int:
    device = env.device

    def log(message: str) -> None:
        if env.is_main:
            print(message, flush=True)

    def note(message: str) -> None:  # from any rank, without breaking rank 0's progress bar
        if env.is_main:
            metrics.write(message)
        else:
            print(f"[rank {env.rank}] {message}", flush=True)

    log_dir = os.path.join(args.results_dir, args.experiment_name)
    os.makedirs(log_dir, exist_ok=True)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("medium")
        torch.backends.cudnn.benchmark = True
    log(f"{env.world_size} process(es) on {device.type}; experiment folder {log_dir}")

    # Start point: this experiment's newest checkpoint (exact resume), else --resume-from-ckpt's weights
    # and step count (upstream: fresh optimizer and EMA), else from scratch.
    newest = checkpointing.newest_readable(log_dir, log)
    resuming = newest is not None
    if resuming:
        start_path, ckpt = newest
        progress = checkpointing.progress_of(ckpt, env.world_size, log)
        log(f"resuming from {start_path} (step {progress.total_steps})")
    elif args.resume_from_ckpt:
        start_path, ckpt = args.resume_from_ckpt, read_checkpoint(args.resume_from_ckpt)
        progress = Progress(total_steps=int(ckpt.get("total_steps", 0)))
        log(f"starting from the weights of {start_path} (step {progress.total_steps})")
    else:
        start_path, ckpt, progress = "", None, Progress()
    if progress.total_steps >= config.trainer.max_steps:
        log(f"nothing to do: already at step {progress.total_steps} >= trainer.max_steps={config.trainer.max_steps}; "
            "set trainer.max_steps higher to train further")
        return 0

    # Data: an endless per-rank stream, continued from the checkpoint's position.
    dataset = build_dataset(config.data, "train")
    log(f"training data: {dataset.describe()}")
    loader = make_loader(
        dataset,
        config.data.batch_size,
        env.rank,
        env.world_size,
        seed=config.global_seed,
        start=progress.data_position,
        num_workers=config.data.num_workers,
        pin_memory=device.type == "cuda",
    )
    batches = iter(loader)
    grid_images = first_valid_images(build_dataset(config.data, "val"), GRID_IMAGES).to(device)

    # Model: same initial weights on every rank (FlowMo freezes the parameters no output depends on).
    torch.manual_seed(config.global_seed)
    model = FlowMo(config).to(device)
    model.cuda_graphs = False  # progress grids sample eagerly: no graph capture or block compile of the trained model
    if ckpt is not None:
        state = select_state_dict(ckpt, "model", start_path)
        check_state_dict(model, state, start_path)
        model.load_state_dict(state)
    if progress.encoder_frozen:
        model.encoder.requires_grad_(False)
    objective = FlowMoObjective(model, build_perceptual_loss(config.opt, device))
    wrapped = parallel.wrap(objective, model, config, env)
    n_params = sum(p.numel() for p in model.parameters())
    layout = "FSDP2" if config.trainer.fsdp else "DDP" if env.world_size > 1 else "one process"
    log(f"FlowMo: {n_params / 1e6:.2f}M parameters; {layout}")

    ema = EMA(model, config.model.ema_decay)
    norms = WeightNormFixer(model, config.model.fix_norm_mode) if config.model.fix_initial_norms else None
    optimizer = build_optimizer(model, config)
    if resuming:
        ema.load(select_state_dict(ckpt, "ema", start_path))
        if norms is not None and ckpt.get("initial_norms"):
            norms.load_state_dict(ckpt["initial_norms"])
        if "optimizer_state_dict" in ckpt:  # absent from upstream's files
            set_optimizer_state_dict(
                model, optimizer, ckpt["optimizer_state_dict"], options=StateDictOptions(full_state_dict=True)
            )

    if env.is_main:
        with open(os.path.join(log_dir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2)
    trainer = config.trainer
    flops = None
    if peak_flops(device):  # MFU is reported where the device's peak is known
        flops = flowmo_flops_per_step(config, config.data.batch_size // config.opt.n_grad_acc)
        log(f"FlowMo forward + backward: {flops / 1e12:.3g} TFLOP per step per rank")
    metrics = MetricLogger(
        env, log_dir, trainer.max_steps, progress.total_steps, config.data.batch_size * env.world_size, flops
    )
    watch = NonFiniteWatch(device)
    last_good = start_path if resuming else ""
    skipped_total = 0

    def save(step: int) -> str:
        """Every rank gathers (FSDP needs all); rank 0 writes, then prunes."""
        path = checkpointing.checkpoint_path(log_dir, step)
        model_state = parallel.full_state_dict(model.state_dict(), keep=env.is_main)
        ema_state = parallel.full_state_dict(ema.tensors, keep=env.is_main)
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=FULL)
        rng = parallel.all_gather_objects(checkpointing.capture_rng())
        if env.is_main:
            checkpointing.save(
                path, config, model_state, ema_state, progress, optimizer_state, rng,
                norms.state_dict() if norms is not None else None, env.world_size,
            )
            checkpointing.prune(log_dir, trainer.keep_every)
            metrics.write(f"saved {path}")
        return path

    # RNG: upstream's per-rank seed; a resumed run continues every rank's streams where they stopped.
    seed = config.global_seed * env.world_size + env.rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    rng_states = ckpt.get("rng_state_per_rank", []) if resuming else []
    if len(rng_states) == env.world_size:
        checkpointing.restore_rng(rng_states[env.rank])

    log(f"training from step {progress.total_steps} to {trainer.max_steps}")
    with parallel.StopRequest(env) as stop, contextlib.closing(metrics):
        while progress.total_steps < trainer.max_steps:
            if not progress.encoder_frozen and (config.opt.freeze_encoder or progress.total_steps >= config.opt.freeze_encoder_after):
                metrics.write(f"freezing the encoder and rebuilding the optimizer at step {progress.total_steps}")
                model.encoder.requires_grad_(False)
                progress.encoder_frozen = True
                if not trainer.fsdp:
                    wrapped = parallel.wrap(objective, model, config, env)  # DDP must know the new trainable set
                optimizer = build_optimizer(model, config)

            images, skipped, drawn = next_images(batches, config.opt.n_grad_acc, config, len(dataset), note)
            progress.data_position += drawn
            skipped_total += skipped
            images = images.to(device, non_blocking=True)

            objective.train()
            terms = train_step(wrapped, objective, model, images, optimizer, config, device)
            if norms is not None:
                norms.apply(model)
            ema.update(model, progress.total_steps)
            progress.total_steps += 1
            step = progress.total_steps  # steps done; the log, checkpoints and messages count this way
            watch.observe(terms["total_loss"], step)
            metrics.add(terms)

            stopping = stop.agreed()
            final = step == trainer.max_steps or stopping
            if step % trainer.log_every == 0 or final:
                watch.check(env, last_good)
                encoder_checksum = sum(parallel.full_tensor(p.mean()) for p in model.encoder.parameters())
                metrics.log(step, {"encoder_checksum": float(encoder_checksum)}, skipped_total)
            if (step % trainer.sample_every == 0 or final) and len(grid_images):
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    grid = reconstruction_grid(model, grid_images)
                if env.is_main:
                    os.makedirs(os.path.dirname(grid_path(log_dir, step)), exist_ok=True)
                    grid.save(grid_path(log_dir, step))
                    metrics.add_image("reconstructions", grid, step)
                    metrics.write(f"wrote {grid_path(log_dir, step)} (top: inputs, bottom: reconstructions)")
            if step % trainer.checkpoint_every == 0 or final:
                watch.check(env, last_good)
                last_good = save(step)
            if stopping:
                log(f"stopped by SIGTERM after step {step}; rerun the same command to resume")
                break
    log(f"done at step {progress.total_steps}; newest checkpoint {last_good}")
    return 0
