"""The published FlowMo checkpoints by name: "flowmo_lo" and "flowmo_hi" are upstream's `flowmo_lo.pth` /
`flowmo_hi.pth` in the Hugging Face repository ksarge/FlowMo, fetched once into the Hugging Face cache
(HF_HOME / HF_HUB_CACHE; HF_HUB_OFFLINE=1 uses only what is cached). Anything else is a checkpoint file.

One resolver for the library (`from_pretrained`, `Tokenizer.from_checkpoint`) and every command's `--ckpt` /
`--resume-from-ckpt`.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Optional, Union

from flowmo_fast.formats.checkpoint import load_checkpoint

HF_REPO = "ksarge/FlowMo"
PUBLISHED = {"flowmo_lo": "flowmo_lo.pth", "flowmo_hi": "flowmo_hi.pth"}  # name -> file in HF_REPO


def resolve_checkpoint(name_or_path: Union[str, os.PathLike]) -> str:
    """The local file of a checkpoint: a published name -> its file in the Hugging Face cache (downloaded on
    first use); an existing path as it is (a file of that name wins over the published one, as in transformers)."""
    path = os.fspath(name_or_path)
    if os.path.exists(path):
        return path
    if path in PUBLISHED:
        return hub_file(PUBLISHED[path])
    raise FileNotFoundError(
        f"checkpoint not found: {path} (give a checkpoint file, or a published checkpoint by name: "
        f"{', '.join(PUBLISHED)})"
    )


def fetch_command(filename: str) -> str:
    return f"hf download {HF_REPO} {filename}"


def hub_file(filename: str) -> str:
    """`filename` of HF_REPO through huggingface_hub: its cache, its offline mode; errors name the file and the
    command that fetches it."""
    from huggingface_hub import constants, hf_hub_download  # imported here: only names need the hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return hf_hub_download(HF_REPO, filename)
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hugging Face Hub could not be reached"
        raise FileNotFoundError(
            f"{filename} (from {HF_REPO}) is not in the Hugging Face cache {constants.HF_HUB_CACHE} and {why}: "
            f"fetch it with `{fetch_command(filename)}` where the Hub is reachable (into the same cache), "
            "or pass the path of a downloaded copy"
        ) from None
    except HfHubHTTPError as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FileNotFoundError(
            f"{filename} could not be fetched from {HF_REPO} ({first_line}): try `{fetch_command(filename)}`, "
            "or pass the path of a downloaded copy"
        ) from None


def from_pretrained(
    name_or_path: Union[str, os.PathLike], which: str = "ema", device: Any = "cpu",
    overrides: Optional[Iterable[str]] = None,
):
    """A FlowMo model in eval mode on `device`: "flowmo_lo" / "flowmo_hi" (the published checkpoints, from the
    Hugging Face cache) or a checkpoint file (`load_checkpoint`: upstream's or ours). `which`: "ema" or "model"."""
    return load_checkpoint(resolve_checkpoint(name_or_path), which=which, device=device, overrides=overrides)
