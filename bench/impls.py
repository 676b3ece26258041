"""The implementations the benchmarks compare, behind one adapter (`Implementation`), built by one factory
(`build`). The CPU benchmarks (bench/test_bench_*.py) and the GPU report (bench/gpu_report.py) call each
workload the same way for ours and for upstream; only this module knows how each runs it.

- plain: our model eager with the plain PyTorch kernels (`kernels="torch"`, no compile, no CUDA graphs);
- fast: our fast path: `compile_blocks` (regional torch.compile of each DoubleStreamBlock); on CUDA also
  the Triton kernels (`kernels="auto"`) and the CUDA-graph sampler; fast_triton: the same with the Triton
  kernels forced inside the compiled blocks (`kernels="triton"`, CUDA only);
- upstream_eager / upstream_compiled: upstream's FlowMo from the checkout at $FLOWMO_REFERENCE with the
  same config and weights, without and with its own @torch.compile decorators.

A train step is one micro-batch without norm logging on both sides (`TRAIN_STEP_OVERRIDES`): upstream's
step here is its loss on the whole batch, then backward and Adam, so ours is timed doing the same work.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

import flowmo_fast
from bench import upstream
from flowmo_fast.autocast import autocast_for
from flowmo_fast.config import Config
from flowmo_fast.flowmo import flow
from flowmo_fast.flowmo.graphed_sampler import compile_blocks
from flowmo_fast.formats.token_shards import TokenSpec
from flowmo_fast.sampler_settings import SamplingOptions
from flowmo_fast.tokenize import make_encoder
from flowmo_kernels import triton_available
from flowmo_kernels.rope import rope_tables
from train.objective import FlowMoObjective
from train.step import build_optimizer, train_step

IMPLS = ("plain", "fast", "upstream_eager", "upstream_compiled")
OURS = ("plain", "fast", "fast_triton")
KERNELS = {"plain": "torch", "fast": "auto", "fast_triton": "triton"}  # model.kernels of each of ours
# The work a train-step row times, on every side: one micro-batch (the whole batch), no gradient or weight norms.
TRAIN_STEP_OVERRIDES = ("opt.n_grad_acc=1", "opt.log_norms=False")
TRAIN_STEP_WORK = "1 micro-batch, no norm logging"


class Unavailable(Exception):
    """The implementation cannot run here (no upstream checkout, Triton without CUDA); the message says why."""


@dataclass
class Implementation(ABC):
    """One implementation of FlowMo on one device. Every call runs as the implementation would in evaluation
    or training: bf16 autocast on CUDA (float32 elsewhere), no gradients outside the training calls."""

    name: str
    model: nn.Module
    device: torch.device

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(seed)

    @abstractmethod
    def reconstruct(self, images: Tensor, sampling: SamplingOptions, seed: int) -> Tensor:
        """Encode, quantize, sample back with `sampling` from noise drawn by a generator seeded `seed`."""

    @abstractmethod
    def decode(self, zt: Tensor, code: Tensor, t: Tensor) -> Tensor:
        """One decoder pass: the velocity [B, 3, H, W] in float32."""

    @abstractmethod
    def encode(self, images: Tensor) -> Tensor:
        """The encoder's code before quantization."""

    @abstractmethod
    def token_ids(self, images: Tensor) -> Tensor:
        """The LFQ token ids of the images, int64 [B, ...] on the CPU."""

    @abstractmethod
    def loss(self, images: Tensor, t: Optional[Tensor] = None, noise: Optional[Tensor] = None,
             enable_cfg: bool = True) -> Tensor:
        """The training loss (rectified flow + quantizer); times and noise drawn when None."""

    @abstractmethod
    def block(self, img: Tensor, txt: Tensor, vec: Tensor, ids: Tensor) -> Callable[[], tuple]:
        """The decoder's first DoubleStreamBlock on these hidden states, RoPE ids `ids` [L, 3]; no gradients."""

    @abstractmethod
    def train_step(self, images: Tensor, config: Config) -> Callable[[], None]:
        """One optimizer step on `images` with the implementation's own optimizer (built here): forward,
        backward, Adam. `config` must hold TRAIN_STEP_OVERRIDES, so both sides do the same work."""


def check_train_step_work(config: Config) -> None:
    if config.opt.n_grad_acc != 1 or config.opt.log_norms:
        raise ValueError(
            f"a benchmark train step times {TRAIN_STEP_WORK} on every side, but the config has "
            f"opt.n_grad_acc={config.opt.n_grad_acc} opt.log_norms={config.opt.log_norms}; "
            f"add {' '.join(TRAIN_STEP_OVERRIDES)}"
        )


@dataclass
class Ours(Implementation):
    encoders: dict = field(default_factory=dict)  # batch size -> the tokenizer's encode function

    def reconstruct(self, images, sampling, seed):
        return self.model.reconstruct(images, sampling, generator=self.generator(seed))

    @torch.no_grad()
    def decode(self, zt, code, t):
        with autocast_for(self.device):
            return self.model.decode(zt, code, t).float()

    @torch.no_grad()
    def encode(self, images):
        with autocast_for(self.device):
            return self.model.encode(images)

    def token_ids(self, images):
        """What flowmo_fast.tokenize runs (`make_encoder`, ids as the shards store them)."""
        b = images.shape[0]
        if b not in self.encoders:
            self.encoders[b] = make_encoder(self.model, TokenSpec.for_model(self.model), compile=False, batch_size=b)
        return torch.from_numpy(self.encoders[b](images).astype("int64"))

    def loss(self, images, t=None, noise=None, enable_cfg=True):
        with autocast_for(self.device):
            return flow.rectified_flow_loss(self.model, images, t=t, noise=noise, enable_cfg=enable_cfg).loss

    def block(self, img, txt, vec, ids):
        decoder = self.model.decoder
        rope = rope_tables(ids, decoder.params.axes_dim, decoder.params.theta)
        block, ops = decoder.double_blocks[0], self.model.ops(img.device)
        return torch.no_grad()(lambda: block(img, txt, vec, rope, ops, self.model.attention))

    def train_step(self, images, config):
        """What train.pretrain runs each step (train/step.py), without the perceptual term."""
        check_train_step_work(config)
        model = self.model
        optimizer, objective = build_optimizer(model, config), FlowMoObjective(model, None).train()
        return lambda: train_step(objective, model, images, optimizer, config, self.device)


@dataclass
class Upstream(Implementation):
    module: object = None  # upstream's `flowmo.models`

    def reconstruct(self, images, sampling, seed):
        noise = torch.randn(images.shape, generator=self.generator(seed), device=self.device)
        with autocast_for(self.device):
            return upstream.upstream_reconstruct(self.module, self.model, images, noise, sampling.steps,
                                                 sampling.cfg).float()

    @torch.no_grad()
    def decode(self, zt, code, t):
        with autocast_for(self.device):
            return self.model.decode(img=zt, code=code, timesteps=t)[0].float()

    @torch.no_grad()
    def encode(self, images):
        with autocast_for(self.device):
            return self.model.encode(images)[0]

    @torch.no_grad()
    def token_ids(self, images):
        with autocast_for(self.device):
            return self.model._quantize(self.model.encode(images)[0])[1].reshape(images.shape[0], -1).cpu()

    def loss(self, images, t=None, noise=None, enable_cfg=True):
        with autocast_for(self.device):
            if t is None:  # upstream's own training loss, drawing its own t, noise and guidance dropout
                return self.module.rf_loss(self.model.config, self.model, {"image": images}, {})[0]
            tb = t.view(-1, 1, 1, 1)
            v, aux = self.model(img=images, noised_img=(1 - tb) * images + tb * noise, timesteps=t,
                                enable_cfg=enable_cfg)
            return (noise - v - images).pow(2).mean() + aux["quantizer_loss"]

    def block(self, img, txt, vec, ids):
        pe = self.model.decoder.pe_embedder(ids[None].expand(img.shape[0], -1, -1))
        block = self.model.decoder.double_blocks[0]
        return torch.no_grad()(lambda: block(img=img, txt=txt, vec=vec, pe=(None, pe)))

    def train_step(self, images, config):
        """Upstream's loss (rf_loss) on the whole batch, backward, its optimizer (upstream.upstream_optimizer)."""
        check_train_step_work(config)
        optimizer = upstream.upstream_optimizer(self.model, config)

        def step():
            optimizer.zero_grad(set_to_none=True)
            self.loss(images).backward()
            optimizer.step()

        return step


def build(impl: str, config: Config, weights: dict, device: torch.device,
          compile_backend: str = "inductor") -> Implementation:
    """`impl` with `config` and the initial `weights` on `device`, in eval mode; raises Unavailable when it
    cannot run here."""
    if impl in OURS:
        if impl == "fast_triton" and not (device.type == "cuda" and triton_available()):
            raise Unavailable("Triton kernels run on CUDA")
        with torch.device(device):
            model = flowmo_fast.FlowMo(config)
        model.load_state_dict(weights)
        model.kernels = KERNELS[impl]
        model.cuda_graphs = impl != "plain"
        if impl != "plain":
            compile_blocks(model, dynamic=False, backend=compile_backend)
        return Ours(impl, model.eval(), device)
    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join((*OURS, *IMPLS[2:]))}")
    reason = upstream.skip_reason()
    if reason is not None:
        raise Unavailable(reason)
    with torch.device(device):
        module, model = upstream.load_upstream(config, weights, compiled=impl == "upstream_compiled")
    return Upstream(impl, model.eval(), device, module)


@dataclass(frozen=True)
class Setting:
    """A tiny-preset model with `overrides`, fed `batch` random images of `size` x `size` pixels (CPU)."""

    name: str
    overrides: tuple[str, ...]
    size: int
    batch: int

    def config(self) -> Config:
        return flowmo_fast.load_config([*self.overrides, f"data.image_size={self.size}"], preset="tiny")

    def images(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.rand(self.batch, 3, self.size, self.size, generator=g) * 2 - 1

    def describe(self) -> str:
        m = self.config().model
        return f"{self.name}: width {m.mup_width}, {m.enc_depth}+{m.dec_depth} blocks, {self.size}px, batch {self.batch}"


# Issue 7's CPU setting for the sampler: width 2, 4 decoder blocks, 64px, batch 4; and the tiny preset as is.
SAMPLING = Setting("sampling", ("model.dec_depth=4",), size=64, batch=4)
TINY_SAMPLING = Setting("tiny sampling", (), size=32, batch=4)
TRAINING = Setting("training", TRAIN_STEP_OVERRIDES, size=32, batch=4)
NOISE_SEED = 1  # the reconstruct rows' sampler noise


class Implementations:
    """The implementations of one CPU setting, each built on first use and kept for the pytest session."""

    def __init__(self, setting: Setting, train: bool):
        self.setting = setting
        self.train = train
        self.config = setting.config()
        torch.manual_seed(0)
        self.weights = copy.deepcopy(flowmo_fast.FlowMo(self.config).state_dict())  # every row starts from these
        self.built: dict[str, Implementation] = {}
        self.references: dict[str, tuple] = {}

    def reference(self, key: str, compute: Callable[[], tuple]) -> tuple:
        """The plain model's values for `key`, computed once."""
        if key not in self.references:
            self.references[key] = compute()
        return self.references[key]

    def get(self, impl: str) -> Implementation:
        """`impl` of this setting; skips the calling benchmark when it cannot run here."""
        if impl not in self.built:
            import pytest  # here: the GPU report imports this module where pytest may be missing

            try:
                built = build(impl, self.config, self.weights, torch.device("cpu"))
            except Unavailable as e:
                pytest.skip(str(e))
            built.model.train(self.train)
            self.built[impl] = built
        return self.built[impl]
