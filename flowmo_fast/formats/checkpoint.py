"""Checkpoint I/O in the upstream layout: {total_steps, model_ema_state_dict, model_state_dict}, plus our config.

Upstream files carry no config: we infer it from the weights' shapes (the preset whose context_dim and
quantizer match, with depths, widths and patch size read off the weights).

`model.quantization_type=qwen2.5-coder-0.5b[_span_P]`: the frozen LLM is never saved. Our files record which
one the model was trained with ("llm": its `model.llm_path` and `llm_config_hash`), and loading checks that the
LLM found at `model.llm_path` has the same architecture.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from typing import Any, BinaryIO, Callable, Iterable, Literal, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from flowmo_fast.config import HIDDEN_PER_WIDTH, Config, config_from_dict, load_config
from flowmo_fast.flowmo.llm_infill import LLMInfiller, find_llm, llm_config_hash
from flowmo_fast.flowmo.model import FlowMo
from flowmo_fast.llm_settings import LLM_QUANTIZATION, is_llm_quantization

Which = Literal["ema", "model"]  # a checkpoint's EMA or raw weights
WHICH: dict[Which, str] = {"ema": "model_ema_state_dict", "model": "model_state_dict"}
PRESET_BY_CODE = {("lfq", 18): "flowmo_lo", ("lfq", 56): "flowmo_hi", ("kl", 768): "flowmo_hi_kl"}
# A code of Qwen2.5-Coder-0.5B's width (not doubled as for KL) is the LLM type; its seed command's code length.
LLM_CODE_WIDTH = 896
LLM_SEED_OVERRIDES = ("model.code_length=128",)
CHECKPOINT_DIR = "checkpoints"  # a run's checkpoints: <run>/checkpoints/%08d.pth, as upstream
CHECKPOINT_NAME = re.compile(r"\d+\.pth")


class CheckpointError(ValueError):
    """A file that is not a usable FlowMo checkpoint; the message names the file and the problem."""


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, CHECKPOINT_DIR, "%08d.pth" % step)


def step_of(path: str) -> int:
    return int(os.path.splitext(os.path.basename(path))[0])


def list_checkpoints(run_dir: str) -> list[str]:
    """A run's checkpoints, oldest step first. Only complete files: a checkpoint being written is a hidden
    temporary file (`atomic_write`) until its rename, and a name that is not `<step>.pth` is no checkpoint."""
    folder = os.path.join(run_dir, CHECKPOINT_DIR)
    try:
        names = [n for n in os.listdir(folder) if CHECKPOINT_NAME.fullmatch(n)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted((os.path.join(folder, n) for n in names), key=step_of)


def read_checkpoint(path: str) -> dict:
    """torch.load(weights_only=True) with errors that name the file and say what is wrong with it."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): a truncated download or an interrupted save")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # zip, pickle and storage errors all mean the same thing to a user
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt file, or not made by torch.save): "
            f"{type(e).__name__}: {str(e)[:200]}. Download or copy it again."
        ) from e
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a FlowMo checkpoint dict")
    return dict(ckpt)


def select_state_dict(ckpt: Mapping, which: str, path: str = "checkpoint") -> dict[str, Tensor]:
    if which not in WHICH:
        raise ValueError(f"which={which!r}; allowed: {', '.join(WHICH)}")
    key = WHICH[which]
    if key in ckpt:
        return dict(ckpt[key])
    if any(k.startswith(("encoder.", "decoder.")) for k in ckpt):  # a bare state dict
        return {k: v for k, v in ckpt.items() if isinstance(v, Tensor)}
    raise CheckpointError(
        f"{path} has no '{key}' (keys: {', '.join(sorted(map(str, ckpt))[:8])}); "
        f"a FlowMo checkpoint holds {', '.join(WHICH.values())}"
    )


def infer_config(state_dict: Mapping[str, Tensor], overrides: Iterable[str] = ()) -> Config:
    """Config of an upstream state dict, from its shapes; `overrides` (dotlist) win."""
    try:
        enc_txt = state_dict["encoder.txt_in.weight"].shape  # [enc_hidden, encoder_context_dim]
        dec_txt = state_dict["decoder.txt_in.weight"].shape  # [dec_hidden, context_dim + 1]
        img_in = state_dict["decoder.img_in.weight"].shape  # [dec_hidden, 3 p^2]
    except KeyError as e:
        raise CheckpointError(f"state dict lacks {e.args[0]}: not a FlowMo model") from None
    context_dim = dec_txt[1] - 1
    quant = "kl" if enc_txt[1] == 2 * context_dim else LLM_QUANTIZATION if context_dim == LLM_CODE_WIDTH else "lfq"
    preset = PRESET_BY_CODE.get((quant, context_dim))
    seed = list(LLM_SEED_OVERRIDES) if quant == LLM_QUANTIZATION else []

    def depth(prefix: str) -> int:
        blocks = {int(m.group(1)) for k in state_dict if (m := re.match(rf"{prefix}\.double_blocks\.(\d+)\.", k))}
        return max(blocks) + 1 if blocks else 0

    derived = [
        f"model.context_dim={context_dim}",
        f"model.quantization_type={quant}",
        f"model.mup_width={dec_txt[0] // HIDDEN_PER_WIDTH}",
        f"model.enc_mup_width={enc_txt[0] // HIDDEN_PER_WIDTH}",
        f"model.patch_size={int(round((img_in[1] / 3) ** 0.5))}",
        f"model.enc_depth={depth('encoder')}",
        f"model.dec_depth={depth('decoder')}",
    ]
    return load_config(seed + derived + list(overrides), preset=preset)


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], path: str) -> None:
    """Strict keys and shapes, with errors that name the first few offenders."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:5])})")
        raise CheckpointError(
            f"{path} does not match the model: {'; '.join(parts)}. "
            "Is it a FlowMo checkpoint, and are the config overrides right?"
        )
    for k, shape in expected.items():
        if tuple(state_dict[k].shape) != tuple(shape):
            raise CheckpointError(
                f"{path}: shape mismatch for {k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(shape)}. "
                "Check the config overrides (e.g. model.context_dim, model.mup_width)."
            )


def checkpoint_config(ckpt: Mapping, state_dict: Mapping[str, Tensor], overrides: Iterable[str] = ()) -> Config:
    """The config a checkpoint was made with: stored (ours) or inferred from its weights (upstream's)."""
    if isinstance(ckpt.get("config"), Mapping):
        return config_from_dict(ckpt["config"], overrides)
    return infer_config(state_dict, overrides)


def read_config(path: str, which: str = "ema", overrides: Optional[Iterable[str]] = None) -> Config:
    """A checkpoint file's config without building the model (nor loading an LLM): to refuse early."""
    ckpt = read_checkpoint(path)
    return checkpoint_config(ckpt, select_state_dict(ckpt, which, os.fspath(path)), overrides or ())


def llm_record(config: Config) -> Optional[dict]:
    """What a checkpoint records of the LLM of the LLM type (None for other types): `model.llm_path` and the
    architecture hash of the LLM found there (resolved locally, never downloaded)."""
    if not is_llm_quantization(config.model.quantization_type):
        return None
    return {"llm_path": config.model.llm_path, "config_hash": llm_config_hash(find_llm(config.model).llm_config)}


def model_records(config: Config) -> dict:
    """What a FlowMo checkpoint records beside its weights and config: the LLM of the LLM type ("llm")."""
    record = llm_record(config)
    return {"llm": record} if record is not None else {}


def check_llm_record(ckpt: Mapping, config_hash: str, llm_path: str, path: str) -> None:
    """The LLM found at `llm_path` (architecture `config_hash`) must be the one the checkpoint recorded; files
    without a record (not written by us) are not checked."""
    record = ckpt.get("llm")
    if not isinstance(record, Mapping) or record.get("config_hash") in (None, config_hash):
        return
    raise CheckpointError(
        f"{path} was trained with the LLM model.llm_path={record.get('llm_path')!r} (config hash "
        f"{str(record['config_hash'])[:12]}), but model.llm_path={llm_path!r} is a different architecture (config "
        f"hash {config_hash[:12]}): point model.llm_path (e.g. overrides=['model.llm_path=...']) at the LLM it "
        f"was trained with"
    )


def load_llm_for(ckpt: Mapping, config: Config, path: str) -> Optional[LLMInfiller]:
    """The LLM of an LLM-type checkpoint, loaded from `model.llm_path` and checked against its record."""
    if not is_llm_quantization(config.model.quantization_type):
        return None
    infiller = LLMInfiller.from_config(config.model)
    check_llm_record(ckpt, infiller.config_hash, config.model.llm_path, path)
    return infiller


def load_checkpoint(
    path: str, which: str = "ema", device: Any = "cpu", overrides: Optional[Iterable[str]] = None
):
    """Load an upstream or flowmo-fast checkpoint as a FlowMo model in eval mode on `device`, for inference: on
    CUDA its matrix weights are kept in bf16 (`FlowMo.cast_for_inference`; `.float()` before training it)."""
    path = os.fspath(path)
    ckpt = read_checkpoint(path)
    state_dict = select_state_dict(ckpt, which, path)
    return model_from_state(ckpt, checkpoint_config(ckpt, state_dict, overrides or ()), state_dict, path, device)


def model_from_state(records: Mapping, config: Config, state_dict: Mapping[str, Tensor], path: str, device: Any):
    """The FlowMo of `config` with `state_dict` (checked: keys and shapes), in eval mode on `device`, cast for
    inference; `records`: what the file keeps beside the weights (the LLM of the LLM type, checked)."""
    infiller = load_llm_for(records, config, path)  # real weights: built outside the meta device
    with torch.device("meta"):
        model = FlowMo(config, infiller)
    check_state_dict(model, state_dict, path)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device=device, dtype=torch.float32).eval().cast_for_inference()


def cpu_state_dict(model: Union[nn.Module, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    state = model if isinstance(model, Mapping) else model.state_dict()
    return {k: v.detach().cpu() for k, v in state.items()}


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """`write(f)` into a temporary file in the same folder, fsync, then rename: a crash never leaves half a file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    umask = os.umask(0)
    os.umask(umask)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~umask)  # mkstemp makes 0600; give the mode open() would
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def file_sha256(path: str, chunk: int = 1 << 24) -> str:
    """Hex sha256 of a file (checkpoints are GBs: read in chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_save(obj: Any, path: str) -> None:
    """torch.save, atomically (see `atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(
    path: str,
    model: Union[nn.Module, Mapping[str, Tensor]],
    ema_model: Optional[Union[nn.Module, Mapping[str, Tensor]]] = None,
    total_steps: int = 0,
    extra: Optional[Mapping[str, Any]] = None,
    config: Optional[Config] = None,
) -> None:
    """Write the upstream layout (plus `config`, the LLM record of the LLM type, and any `extra` entries such as
    optimizer state) atomically.

    `model` / `ema_model` are modules or state dicts; `config` defaults to `model.config`."""
    config = config if config is not None else model.config
    ckpt = {
        "total_steps": int(total_steps),
        "model_ema_state_dict": cpu_state_dict(ema_model if ema_model is not None else model),
        "model_state_dict": cpu_state_dict(model),
        "config": config.to_dict(),
    }
    ckpt.update(model_records(config))
    ckpt.update(extra or {})
    atomic_save(ckpt, path)
