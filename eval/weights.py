"""Where the metric networks' weight files come from: an explicit path, the torch hub cache, or a download.

Each file has a flag and an environment variable for an explicit path. Otherwise we use
`$TORCH_HOME/hub/checkpoints/<file name>` (torch.hub's cache, where a download also lands). When the file is
missing and cannot be downloaded, `WeightsUnavailable` names the file, the URL and where to put it.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch

DOWNLOAD_TIMEOUT_S = 60  # per socket operation: an unreachable network fails instead of hanging


class WeightsUnavailable(RuntimeError):
    """A metric network's weight file is neither given, nor cached, nor downloadable; or it is not usable."""


@dataclass(frozen=True)
class WeightsFile:
    what: str
    url: str
    flag: str
    env: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def cache_path(self) -> str:
        return os.path.join(torch.hub.get_dir(), "checkpoints", self.filename)


# pytorch-fid's port of the TF FID Inception (the file upstream's evaluate.py downloads).
INCEPTION = WeightsFile(
    "FID Inception network",
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    "--inception-weights",
    "FLOWMO_INCEPTION_WEIGHTS",
)
# The torchvision ImageNet backbones the lpips package loads (its linear heads ship inside the package).
LPIPS_ALEX = WeightsFile(
    "LPIPS AlexNet backbone (torchvision)",
    "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "--lpips-alex-weights",
    "FLOWMO_LPIPS_ALEX_WEIGHTS",
)
LPIPS_VGG = WeightsFile(
    "LPIPS VGG16 backbone (torchvision)",
    "https://download.pytorch.org/models/vgg16-397923af.pth",
    "--lpips-vgg-weights",
    "FLOWMO_LPIPS_VGG_WEIGHTS",
)


def locate(spec: WeightsFile, explicit: Optional[str] = None, progress: bool = True) -> str:
    """Path of the weight file: `explicit`, else $<env>, else the hub cache (downloading into it if needed)."""
    source = spec.flag if explicit else spec.env
    path = explicit or os.environ.get(spec.env)
    if path:
        if not os.path.isfile(path):
            raise WeightsUnavailable(f"{spec.what}: {path} (given by {source}) does not exist")
        return path
    cached = spec.cache_path()
    if os.path.isfile(cached):
        return cached
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(spec.url, cached, progress=progress)  # temp file, then rename
    except Exception as e:  # URLError, HTTPError, timeouts, SSL errors: all mean "not reachable"
        raise WeightsUnavailable(
            f"{spec.what}: {spec.filename} is not in {os.path.dirname(cached)} and downloading it failed "
            f"({type(e).__name__}: {e}). On a machine with internet download {spec.url} and put it at {cached} "
            f"(the hub cache under $TORCH_HOME), or pass {spec.flag} PATH, or set {spec.env}=PATH."
        ) from e
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return cached
