"""The training loop of `train.pretrain` and `train.posttrain` (upstream `flowmo/train.py`). A run is set up by
named parts (start point, the memory fit, data, model and optimizer, RNG), then `train` steps through it with
logging, progress grids and checkpoints: the step loop of train.loop, with `TokenizerSteps` as FlowMo's part of it.
The memory fit (`fit_memory`, train.memory): the estimate of a micro-batch's memory per GPU, and `opt.n_grad_acc`
raised until it fits a limit (`trainer.memory_gib`, else the GPU's free memory).

Each step: one batch per rank, split into `opt.n_grad_acc` micro-batches (gradients reduced on the last),
bf16 autocast on CUDA, Adam step, weight norms reset to their initial values, EMA every 10 steps.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from flowmo_fast.autocast import autocast_dtype
from flowmo_fast.config import Config
from flowmo_fast.distributed import Processes, min_across_ranks, spare_cpus
from flowmo_fast.flowmo.llm_infill import find_llm
from flowmo_fast.flowmo.model import FlowMo
from flowmo_fast.formats.checkpoint import check_llm_record, model_records
from flowmo_fast.formats.data import DataError, ImageBatch, ImageDataset, build_dataset, first_valid_images, make_loader
from flowmo_fast.formats.images import GRID_IMAGES
from flowmo_fast.llm_settings import is_llm_quantization
from train import memory, parallel, train_state
from train.ema import EMA
from train.loop import Drawn, LogExtra, StepHooks, finished, run_steps, say
from train.metrics import MetricLogger, flowmo_flops_per_step, peak_flops
from train.norms import WeightNormFixer
from train.objective import FlowMoObjective
from train.perceptual import build_perceptual_loss
from train.samples import save_grid
from train.start import Experiment, StartPoint, find_start, in_processes, prepare, save_config, say_size, seed_rngs
from train.step import build_optimizer, compile_for_training
from train.train_state import Progress


def run(experiment: Experiment, config: Config) -> int:
    """Train until trainer.max_steps (or SIGTERM); returns the process exit code."""
    require_llm(config)
    return in_processes(functools.partial(train, experiment, config))


def require_llm(config: Config) -> None:
    """The LLM of `model.quantization_type=qwen2.5-coder-0.5b[_span_P]` must be on this machine and fit the config:
    checked before any process, data or model starts, ending the command with one line naming what is wrong."""
    if not is_llm_quantization(config.model.quantization_type):
        return
    try:
        find_llm(config.model)
    except (FileNotFoundError, ImportError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def next_images(batches: Iterator[ImageBatch], minimum: int, config: Config, dataset: ImageDataset, note: Callable[[str], None]) -> tuple[torch.Tensor, int, int]:
    """(images, images skipped, samples drawn): the next batch with at least `minimum` decodable images."""
    skipped = drawn = 0
    while True:
        batch = next(batches)
        drawn += config.data.batch_size
        skipped += batch.skipped
        for name in batch.skipped_names:
            note(f"skipped an image that does not decode: {name}")
        if batch.images.shape[0] >= minimum:
            return batch.images, skipped, drawn
        if drawn > 2 * max(len(dataset), config.data.batch_size):
            raise DataError(
                f"{drawn} images drawn from {dataset.describe()} without a batch of {minimum} that decode "
                f"({skipped} failed): check that the files are images PIL can read, or train on another folder"
            )


def memory_limit(config: Config, procs: Processes) -> tuple[Optional[int], str]:
    """(bytes, where it came from): trainer.memory_gib, else what the GPU reports (the least over the processes,
    so all of them pick the same opt.n_grad_acc); (None, "") on the CPU without the key."""
    if config.trainer.memory_gib is not None:
        return int(config.trainer.memory_gib * memory.GIB), "trainer.memory_gib"
    reported = memory.device_memory(procs.device)
    if reported is None:
        return None, ""
    return min_across_ranks(reported, procs), f"free on {procs.device}"


def encoder_frozen_now(config: Config, progress: Progress) -> bool:
    """Whether the encoder is frozen, or freezes before the next step (`freeze_encoder_if_due`)."""
    opt = config.opt
    return progress.encoder_frozen or opt.freeze_encoder or progress.total_steps >= opt.freeze_encoder_after


def fit_memory(config: Config, procs: Processes, progress: Progress) -> Config:
    """Before the first step: the estimate of what a micro-batch needs per process (train.memory) in one line,
    and with a memory limit opt.n_grad_acc raised, when needed, until data.batch_size's micro-batches fit
    (memory.DoesNotFit when not even one image does). Returns the config to train with."""
    bf16 = config.trainer.enable_bfloat16 and autocast_dtype(procs.device) is not None
    trained = not encoder_frozen_now(config, progress)
    placement = memory.Placement(procs.world_size, bf16, encoder_trained=trained)
    unseen = ", the frozen LLM not counted" if is_llm_quantization(config.model.quantization_type) else ""
    head = f"memory per process, estimated ({'bf16 autocast' if bf16 else 'float32'}{unseen}):"
    limit, source = memory_limit(config, procs)
    if limit is None:
        estimate = memory.estimate_memory(config, config.data.batch_size // config.opt.n_grad_acc, placement)
        say(procs, f"{head} {estimate.describe()} GiB; no limit given (trainer.memory_gib=N fits opt.n_grad_acc "
            "to N GiB)")
        return config
    fit = memory.fit_grad_acc(config, limit, placement)
    n = config.opt.n_grad_acc
    change = f"opt.n_grad_acc={n}" if fit.n_grad_acc == n else f"opt.n_grad_acc {n} -> {fit.n_grad_acc}"
    say(procs, f"{head} {fit.estimate.describe()} GiB; fits {memory.gib(limit)} GiB ({source}) with {change} "
        f"(data.batch_size={config.data.batch_size})")
    return dataclasses.replace(config, opt=dataclasses.replace(config.opt, n_grad_acc=fit.n_grad_acc))


@dataclass
class Data:
    dataset: ImageDataset  # the training set
    batches: Iterator[ImageBatch]  # this rank's endless stream, continued from the start point's position
    grid_images: torch.Tensor  # [N, 3, H, W] fixed validation images for the progress grid, on the device


def loader_workers(requested: int, procs: Processes) -> int:
    """data.num_workers (upstream's default: 8), at most the CPUs beside this process: no more processes than CPUs."""
    spare = spare_cpus()
    if requested <= spare:
        return requested
    say(procs, f"data.num_workers={requested}, but this machine has {spare + 1} CPU(s): using {spare} loader worker(s)")
    return spare


def build_data(config: Config, procs: Processes, progress: Progress) -> Data:
    dataset = build_dataset(config.data, "train")
    say(procs, f"training data: {dataset.describe()}")
    loader = make_loader(
        dataset, config.data.batch_size, procs.rank, procs.world_size, seed=config.global_seed,
        start=progress.data_position, num_workers=loader_workers(config.data.num_workers, procs),
        pin_memory=procs.device.type == "cuda",
    )
    grid_set = dataset.centre_cropped() if config.data.data_dir else build_dataset(config.data, "val")
    grid_images = first_valid_images(grid_set, GRID_IMAGES).to(procs.device)
    return Data(dataset, iter(loader), grid_images)


@dataclass
class Trainee:
    """The model and everything that updates it."""

    model: FlowMo
    objective: FlowMoObjective
    wrapped: torch.nn.Module  # the objective under DDP (or itself: one process, FSDP)
    ema: EMA
    norms: Optional[WeightNormFixer]
    optimizer: torch.optim.Optimizer


def build_trainee(config: Config, procs: Processes, start: StartPoint) -> Trainee:
    """Same initial weights on every rank (the parameters no output depends on frozen), the start point's
    weights, the objective wrapped for several processes, EMA, norm fixer and optimizer (their states on resume)."""
    torch.manual_seed(config.global_seed)
    model = FlowMo(config).to(procs.device)
    model.cuda_graphs = False  # progress grids sample eagerly: no graph capture of the trained model
    if start.ckpt is not None:
        train_state.load_model(model, start.ckpt, start.path)
        infiller = getattr(model.quantizer, "infiller", None)  # the LLM type: the LLM the checkpoint recorded?
        if infiller is not None:
            check_llm_record(start.ckpt, infiller.config_hash, config.model.llm_path, start.path)
    if start.progress.encoder_frozen:
        model.encoder.requires_grad_(False)
    compile_for_training(model, config, procs.device)
    model.activation_checkpointing = config.trainer.activation_checkpointing  # around the compiled blocks
    objective = FlowMoObjective(model, build_perceptual_loss(config.opt, procs.device))
    norms = WeightNormFixer(model, config.model.fix_norm_mode) if config.model.fix_initial_norms else None
    trainee = Trainee(model, objective, parallel.wrap(objective, model, config, procs),
                      EMA(model, config.model.ema_decay), norms, build_optimizer(model, config))
    if start.resuming:
        train_state.restore(trainee, start.ckpt, start.path)
    say_size(procs, "FlowMo", model, config)
    return trainee


def build_metrics(config: Config, procs: Processes, log_dir: str, progress: Progress) -> MetricLogger:
    """Logs to stdout and TensorBoard; MFU where the device's peak is known."""
    flops = None
    if peak_flops(procs.device):
        flops = flowmo_flops_per_step(config, config.data.batch_size // config.opt.n_grad_acc)
        say(procs, f"FlowMo forward + backward: {flops / 1e12:.3g} TFLOP per step per rank")
    images_per_step = config.data.batch_size * procs.world_size
    return MetricLogger(procs, log_dir, config.trainer.max_steps, progress.total_steps, images_per_step, flops)


def freeze_encoder_if_due(trainee: Trainee, config: Config, procs: Processes, progress: Progress,
                          metrics: MetricLogger) -> None:
    """Upstream's `opt.freeze_encoder` / `opt.freeze_encoder_after`: freeze once, then rebuild the optimizer."""
    if progress.encoder_frozen or not encoder_frozen_now(config, progress):
        return
    metrics.write(f"freezing the encoder and rebuilding the optimizer at step {progress.total_steps}")
    trainee.model.encoder.requires_grad_(False)
    progress.encoder_frozen = True
    if not config.trainer.fsdp:  # DDP must know the new trainable set
        trainee.wrapped = parallel.wrap(trainee.objective, trainee.model, config, procs)
    trainee.optimizer = build_optimizer(trainee.model, config)


@dataclass
class TokenizerSteps(StepHooks):
    """FlowMo's part of the step loop: the encoder frozen when due, batches of decodable images (the skipped ones
    counted), weight norms reset after each optimizer step, the encoder checksum logged, progress grids."""

    config: Config
    procs: Processes
    log_dir: str
    progress: Progress
    data: Data
    trainee: Trainee
    metrics: MetricLogger
    skipped_total: int = 0  # images that did not decode, this rank, this run

    def before_step(self) -> None:
        freeze_encoder_if_due(self.trainee, self.config, self.procs, self.progress, self.metrics)

    def next_batch(self) -> Drawn:
        images, skipped, drawn = next_images(self.data.batches, self.config.opt.n_grad_acc, self.config,
                                             self.data.dataset, self.metrics.note)
        self.skipped_total += skipped
        return Drawn(images, drawn)

    def after_optimizer_step(self) -> None:
        if self.trainee.norms is not None:
            self.trainee.norms.apply(self.trainee.model)

    def log_extra(self) -> LogExtra:
        checksum = sum(parallel.full_tensor(p.mean()) for p in self.trainee.model.encoder.parameters())
        return LogExtra({"encoder_checksum": float(checksum)}, self.skipped_total)

    def sample(self, step: int, final: bool) -> None:
        if (step % self.config.trainer.sample_every == 0 or final) and len(self.data.grid_images):
            save_grid(self.trainee.model, self.data.grid_images, self.log_dir, step, self.procs, self.metrics)

    def save(self) -> str:
        records = functools.partial(model_records, self.config)
        return train_state.save_step(self.log_dir, self.trainee, self.progress, self.procs, self.config, records,
                                       self.metrics.write)


def train(experiment: Experiment, config: Config, procs: Processes) -> int:
    log_dir = prepare(experiment, config, procs)
    start = find_start(experiment, procs)
    progress = start.progress
    if finished(progress, config, procs):
        return 0
    fitted = fit_memory(config, procs, progress)
    if fitted != config:
        config = fitted
        save_config(log_dir, config, procs)
    data = build_data(config, procs, progress)
    trainee = build_trainee(config, procs, start)
    metrics = build_metrics(config, procs, log_dir, progress)
    seed_rngs(config.global_seed, procs, start)
    hooks = TokenizerSteps(config, procs, log_dir, progress, data, trainee, metrics)
    run_steps(trainee, config, procs, progress, metrics, hooks, start.path if start.resuming else "")
    return 0
