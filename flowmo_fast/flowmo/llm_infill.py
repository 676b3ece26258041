"""The frozen code LLM of `model.quantization_type=qwen2.5-coder-0.5b[_span_P]`: it infills a span of the code.

No quantizer: the encoder's code [B, T, D] stays continuous, D = `model.context_dim` = the LLM's hidden size.
A span of n = int(P * T) consecutive code tokens at start s (P = 0.3, or P from the `_span_P` form) is
replaced by the LLM's fill-in-the-middle reading of it. The LLM gets the input embeddings

    [<|fim_prefix|>] + code[:s] + [<|fim_suffix|>] + code[s+n:] + [<|fim_middle|>] + code[s:s+n]    (T + 3)

(the markers embedded by the LLM's own table) and its last hidden states (after the final norm) at the
positions of the middle part replace code[s:s+n]: slot j takes the state at the position of code token s + j.
That is the convention of the fork that introduced the type (the issue's "positions of the middle part").
Causal attention lets that position see code[s+j] itself, so the span is a function of the whole code through
the frozen LLM; a blind next-token prediction would take the state one position earlier instead.

The LLM is frozen (eval mode, requires_grad False) and kept out of the module tree: no state_dict, optimizer,
EMA or `train()` reaches it, while `.to()` / `.cuda()` / `.double()` on an enclosing module move it too.
Gradients flow through it into the code. On CUDA it is stored in bf16 and runs under autocast; float32 on the CPU.

transformers and huggingface_hub are optional (`pip install -e ".[llm]"`), imported inside the functions that
need them, and never download: `model.llm_path` must be a local model folder or a hub id already in the local
Hugging Face cache.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from flowmo_fast.autocast import autocast_dtype, autocast_for
from flowmo_fast.config import ModelConfig, check_llm_settings
from flowmo_fast.llm_settings import (
    DEFAULT_LLM_PATH,
    LLM_QUANTIZATION,
    QWEN_CODER_FIM_IDS,
    FimIds,
    LLMQuantization,
    parse_fim_ids,
    parse_llm_quantization,
)

FIM_TOKENS = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>")
N_MARKERS = 3  # prefix, suffix and middle markers: the LLM input is code_length + 3 long
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
# What identifies the LLM's architecture in `llm_config_hash`: stable across transformers versions and paths.
ARCHITECTURE_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "hidden_act", "tie_word_embeddings",
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class LLMNotFoundError(FileNotFoundError):
    """`model.llm_path` names no local model folder and no hub id in the local Hugging Face cache."""


class Infilled(NamedTuple):
    code: Tensor  # [B, T, D]: the code with code[s:s+n] replaced by the LLM's infilling, per sample
    span: Tensor  # [B, n, D]: the LLM's infilling


# ---------------------------------------------------------------------------------------------- settings


def check_llm_fits(llm_config, context_dim: int, code_length: int, fim_ids: FimIds, where: str = "the LLM") -> None:
    """The code must be the LLM's width, its FIM sequence within the LLM's positions, the markers in its vocab."""
    if context_dim != llm_config.hidden_size:
        raise ValueError(
            f"model.context_dim={context_dim} but {where} has hidden size {llm_config.hidden_size}: "
            f"set model.context_dim={llm_config.hidden_size}"
        )
    max_positions = llm_config.max_position_embeddings
    if code_length + N_MARKERS > max_positions:
        raise ValueError(
            f"model.code_length={code_length}: the LLM input is code_length + {N_MARKERS} tokens but {where} has "
            f"max_position_embeddings={max_positions}: set model.code_length <= {max_positions - N_MARKERS}"
        )
    ids = (fim_ids.prefix, fim_ids.middle, fim_ids.suffix)
    if not all(0 <= i < llm_config.vocab_size for i in ids):
        raise ValueError(
            f"FIM marker ids (prefix, middle, suffix) = {ids} lie outside the vocabulary of {where} "
            f"(vocab_size={llm_config.vocab_size}): set model.llm_fim_ids to its marker ids"
        )


def llm_config_hash(llm_config) -> str:
    """sha256 of the LLM's architecture (ARCHITECTURE_KEYS and the RoPE base), for checkpoints to record.

    Not of `to_json_string()`: that also holds the transformers version, the load path and defaults that
    change between transformers releases. It identifies the architecture, not the weights."""
    fields = {key: getattr(llm_config, key, None) for key in ARCHITECTURE_KEYS}
    rope = getattr(llm_config, "rope_parameters", None) or {}  # transformers >= 5 moved rope_theta there
    fields["rope_theta"] = getattr(llm_config, "rope_theta", None) or rope.get("rope_theta")
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- loading


def _import_optional(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(
            f"model.quantization_type={LLM_QUANTIZATION} needs {name}: pip install -e \".[llm]\"  ({e})"
        ) from e


def _how_to_get(llm_path: str) -> str:
    hub_id = llm_path if _HUB_ID.fullmatch(llm_path) else DEFAULT_LLM_PATH
    return (
        f"On a machine with internet run `hf download {hub_id}` (older huggingface_hub: `huggingface-cli "
        f"download {hub_id}`), copy its cache folder (~/.cache/huggingface/hub) here and point HF_HOME (or "
        f"HF_HUB_CACHE) at it; or pass model.llm_path=/path/to/a/model/folder (one written by save_pretrained)."
    )


def resolve_llm_path(llm_path: str) -> Path:
    """`model.llm_path` -> a local model folder: the folder itself, or the hub id's snapshot in the local
    Hugging Face cache. Never downloads; imports huggingface_hub only (not transformers), so a missing LLM is
    reported within seconds, before any model is built."""
    folder = Path(llm_path).expanduser()
    if folder.is_dir():
        return _check_model_folder(folder, llm_path)
    if not _HUB_ID.fullmatch(llm_path):
        raise LLMNotFoundError(f"model.llm_path={llm_path!r}: no such folder, nor a hub id. {_how_to_get(llm_path)}")
    hub = _import_optional("huggingface_hub")
    try:
        snapshot = Path(hub.snapshot_download(llm_path, local_files_only=True))
    except FileNotFoundError:  # huggingface_hub's LocalEntryNotFoundError
        raise LLMNotFoundError(
            f"model.llm_path={llm_path!r}: no such folder, and the hub id is not in the local Hugging Face cache "
            f"({hub.constants.HF_HUB_CACHE}); it is never downloaded at run time. {_how_to_get(llm_path)}"
        ) from None
    return _check_model_folder(snapshot, llm_path)


def _check_model_folder(folder: Path, llm_path: str) -> Path:
    if not (folder / "config.json").is_file():
        raise LLMNotFoundError(
            f"model.llm_path={llm_path!r} ({folder}) is not a Hugging Face model folder: no config.json. "
            f"{_how_to_get(llm_path)}"
        )
    if not any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise LLMNotFoundError(
            f"model.llm_path={llm_path!r} ({folder}) has no weights ({' or '.join(WEIGHT_PATTERNS)}); the "
            f"download may be incomplete. {_how_to_get(llm_path)}"
        )
    return folder


def fim_ids_for(folder: Path, explicit: Optional[FimIds] = None) -> FimIds:
    """The marker ids: `explicit` (model.llm_fim_ids) if given, else the tokenizer saved with the model,
    else (a folder without a tokenizer) Qwen2.5-Coder's."""
    if explicit is not None:
        return explicit
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return QWEN_CODER_FIM_IDS
    tokenizer = _import_optional("transformers").AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    ids = tokenizer.convert_tokens_to_ids(list(FIM_TOKENS))
    missing = [token for token, i in zip(FIM_TOKENS, ids) if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(
            f"the tokenizer in {folder} has no {', '.join(missing)}: not a fill-in-the-middle model; set "
            f"model.llm_fim_ids=prefix,middle,suffix to its marker ids"
        )
    return FimIds(*ids)


def load_llm_config(folder: Path):
    return _import_optional("transformers").AutoConfig.from_pretrained(str(folder), local_files_only=True)


def load_llm(folder: Path, llm_config=None) -> nn.Module:
    """The base model (no LM head) in float32, eval mode, frozen."""
    transformers = _import_optional("transformers")
    llm = transformers.AutoModel.from_pretrained(str(folder), config=llm_config, local_files_only=True)
    return llm.float().eval().requires_grad_(False)


class FoundLLM(NamedTuple):
    folder: Path  # the local model folder
    llm_config: object  # its transformers config
    fim_ids: FimIds


def find_llm(model_config: "ModelConfig") -> FoundLLM:
    """Everything about `model.llm_path` short of loading its weights: the folder (local only), its config, the
    FIM ids, and the checks that it fits the config. Commands call it first to fail before any work."""
    check_llm_settings(model_config)
    folder = resolve_llm_path(model_config.llm_path)
    llm_config = load_llm_config(folder)
    fim_ids = fim_ids_for(folder, parse_fim_ids(model_config.llm_fim_ids))
    m = model_config
    check_llm_fits(llm_config, m.context_dim, m.code_length, fim_ids, f"model.llm_path={m.llm_path!r}")
    return FoundLLM(folder, llm_config, fim_ids)


# ---------------------------------------------------------------------------------------------- spans


def span_starts(
    batch: int, code_length: int, n: int, generator: Optional[torch.Generator] = None, device=None
) -> Tensor:
    """[batch] int64 span starts, uniform in [0, code_length - n], drawn on the generator's own device (the
    global RNG of `device` if None) and moved to `device`: the training generator keeps resume exact."""
    if not 1 <= n <= code_length:
        raise ValueError(f"span length {n} must lie in [1, code_length={code_length}]")
    where = generator.device if generator is not None else device
    return torch.randint(0, code_length - n + 1, (batch,), generator=generator, device=where).to(device)


def span_starts_per_image(generators: Sequence[torch.Generator], code_length: int, n: int, device=None) -> Tensor:
    """[len(generators)] int64: one start per image from its own generator (evaluation, reconstruction), so a
    result does not depend on how images are batched."""
    return torch.cat([span_starts(1, code_length, n, g, device) for g in generators])


def fim_sequence(code: Tensor, markers: Tensor, starts: Tensor, n: int) -> Tensor:
    """The LLM input [B, T + 3, D] from code [B, T, D], markers [B, 3, D] (prefix, suffix, middle), starts [B]:
    [prefix] code[:s] [suffix] code[s+n:] [middle] code[s:s+n] per sample, as one gather. Every sample is
    T + 3 long (no padding) and its middle part always takes the last n positions."""
    _, t, d = code.shape
    p = torch.arange(t + N_MARKERS, device=code.device)[None]  # [1, T+3] input positions
    s = starts.to(code.device)[:, None]  # [B, 1]
    prefix_row, suffix_row, middle_row = t, t + 1, t + 2  # rows of `source` holding the markers
    index = torch.where(p <= s, p - 1, p + n - 2)  # code[:s] at 1..s, code[s+n:] at s+2..T-n+1
    index = torch.where(p == 0, prefix_row, index)
    index = torch.where(p == s + 1, suffix_row, index)
    index = torch.where(p == t - n + 2, middle_row, index)
    index = torch.where(p > t - n + 2, s + p - (t - n + 3), index)  # code[s:s+n] at T-n+3..T+2
    source = torch.cat([code, markers], dim=1)  # [B, T+3, D]
    return source.gather(1, index[..., None].expand(-1, -1, d))


def gather_span(code: Tensor, starts: Tensor, n: int) -> Tensor:
    """code[s:s+n] per sample: [B, T, D], starts [B] -> [B, n, D] (e.g. the encoder's own code for infill_mse)."""
    index = starts.to(code.device)[:, None] + torch.arange(n, device=code.device)  # [B, n]
    return code.gather(1, index[..., None].expand(-1, -1, code.shape[-1]))


def replace_span(code: Tensor, span: Tensor, starts: Tensor) -> Tensor:
    """code [B, T, D] with code[s:s+n] replaced by span [B, n, D] per sample."""
    _, t, d = code.shape
    n = span.shape[1]
    offset = torch.arange(t, device=code.device)[None] - starts.to(code.device)[:, None]  # [B, T]
    inside = (offset >= 0) & (offset < n)
    from_span = span.gather(1, offset.clamp(0, n - 1)[..., None].expand(-1, -1, d))  # [B, T, D]
    return torch.where(inside[..., None], from_span, code)


# ---------------------------------------------------------------------------------------------- module


class _OutOfTree:
    """Holds a module where nn.Module does not look: state_dict, parameters(), train() and hooks skip it."""

    def __init__(self, module: nn.Module):
        self.module = module


class LLMInfiller(nn.Module):
    """Replaces a span of the code by the frozen LLM's infilling (see the module docstring). It has no
    parameters of its own and holds the LLM out of the module tree, so FlowMo checkpoints never hold LLM tensors."""

    def __init__(self, llm: nn.Module, fim_ids: FimIds, spec: LLMQuantization = LLMQuantization()):
        super().__init__()
        llm = getattr(llm, "base_model", llm)  # a *ForCausalLM -> its base model: hidden states, no LM head
        self._frozen = _OutOfTree(llm.eval().requires_grad_(False))
        self.fim_ids = fim_ids
        # built once, moved with the module: no host-to-device copy per call (not in the state dict)
        marker_ids = torch.tensor([fim_ids.prefix, fim_ids.suffix, fim_ids.middle])
        self.register_buffer("marker_ids", marker_ids, persistent=False)
        self._keep_llm_dtype()
        self.spec = spec
        self.config_hash = llm_config_hash(llm.config)

    @classmethod
    def from_config(cls, model_config: "ModelConfig") -> "LLMInfiller":
        """Find `model.llm_path` (local only) and check it fits the config (`find_llm`), then load it."""
        found = find_llm(model_config)
        spec = parse_llm_quantization(model_config.quantization_type)
        return cls(load_llm(found.folder, found.llm_config), found.fim_ids, spec)

    @property
    def llm(self) -> nn.Module:
        return self._frozen.module

    def span_length(self, code_length: int) -> int:
        return self.spec.span_length(code_length)

    def _apply(self, fn, recurse: bool = True):
        """`.to()`, `.cuda()`, `.double()`, ... reach the out-of-tree LLM too (then `_keep_llm_dtype`)."""
        self.llm._apply(fn)
        self._keep_llm_dtype()
        return super()._apply(fn, recurse)

    def _keep_llm_dtype(self) -> None:
        """The frozen LLM in the dtype autocast runs it in on its device (bf16 on CUDA, whatever `.to()` says
        elsewhere): stored in float32 there, each forward would recast its weights and keep the copies for
        backward."""
        dtype = autocast_dtype(self.llm.get_input_embeddings().weight.device)
        if dtype is not None:
            self.llm.to(dtype)

    def infill(self, code: Tensor, starts: Tensor) -> Infilled:
        """code [B, T, D], starts [B] int64 in [0, T - n] (n = span_length(T)) -> Infilled(code [B, T, D]
        with code[s:s+n] replaced, span [B, n, D]). Slot j is the LLM's last hidden state at the position of
        code token s + j. Starts are not range-checked (that would wait on the device): draw them with
        span_starts / span_starts_per_image."""
        b, t, d = code.shape
        n = self.span_length(t)
        self._check_inputs(code, starts)
        embedding = self.llm.get_input_embeddings()
        markers = embedding(self.marker_ids).expand(b, -1, -1)  # [B, 3, D]
        embeds = fim_sequence(code.to(embedding.weight.dtype), markers, starts, n)  # [B, T+3, D]
        with autocast_for(code.device):
            hidden = self.llm(inputs_embeds=embeds, use_cache=False).last_hidden_state  # [B, T+3, D]
        span = hidden[:, t + N_MARKERS - n:].to(code.dtype)  # [B, n, D]
        return Infilled(replace_span(code, span, starts), span)

    forward = infill

    def _check_inputs(self, code: Tensor, starts: Tensor) -> None:
        if code.ndim != 3:
            raise ValueError(f"code must be [B, T, D], got {tuple(code.shape)}")
        b, t, d = code.shape
        check_llm_fits(self.llm.config, d, t, self.fim_ids)
        if starts.shape != (b,) or starts.dtype != torch.int64:
            raise ValueError(f"starts must be int64 [B={b}], got {starts.dtype} {tuple(starts.shape)}")
        llm_device = self.llm.get_input_embeddings().weight.device
        if llm_device != code.device:
            raise ValueError(f"the LLM is on {llm_device} but the code on {code.device}: move the model with .to()")
