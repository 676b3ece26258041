"""The Hugging Face Hub, through `huggingface_hub`'s own code: files of a repository fetched once into its cache
(HF_HOME / HF_HUB_CACHE; with HF_HUB_OFFLINE=1 only the cache is read) and a folder uploaded as a repository.

Every failure is one line naming the repository, the file, why, and the command that fixes it. `huggingface_hub`
is imported inside the functions: only the Hub's users pay for it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional, Sequence

# A Hugging Face repository id: "user/repo" (or "org/repo"), no more slashes, nothing a path would start with.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def is_hub_id(name: str) -> bool:
    return HUB_ID.fullmatch(name) is not None and ".." not in name


def fetch_command(repo_id: str, filename: Optional[str] = None) -> str:
    return f"hf download {repo_id}" + (f" {filename}" if filename else "")


def hub_file(repo_id: str, filename: str, command: Optional[str] = None) -> str:
    """The local path of `filename` of `repo_id` in the Hugging Face cache, downloaded on first use
    (`hf_hub_download`). Errors name the repository, the file and the command that fetches it (`command`;
    None: `hf download REPO FILE`)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    command = command or fetch_command(repo_id, filename)
    try:
        return hf_hub_download(repo_id, filename)
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hugging Face Hub could not be reached"
        raise FileNotFoundError(
            f"{filename} (from {repo_id}) is not in the Hugging Face cache {constants.HF_HUB_CACHE} and {why}: "
            f"fetch it with `{command}` where the Hub is reachable (into the same cache), "
            "or pass the path of a downloaded copy"
        ) from None
    except EntryNotFoundError:
        raise FileNotFoundError(f"the Hugging Face repository {repo_id} has no file {filename}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{repo_id} is neither a local file or folder nor a Hugging Face repository you can read (a private or "
            "gated one needs `hf auth login` first); check the name, or give a local path"
        ) from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"the Hugging Face repository {repo_id} has no branch main") from None
    except HfHubHTTPError as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FileNotFoundError(
            f"{filename} could not be fetched from {repo_id} ({first_line}): try `{command}`, "
            "or pass the path of a downloaded copy"
        ) from None


def hub_folder(repo_id: str, filenames: Sequence[str]) -> str:
    """The snapshot folder of `repo_id` in the Hugging Face cache holding `filenames` (each fetched once)."""
    paths = [hub_file(repo_id, name, fetch_command(repo_id)) for name in filenames]
    return os.path.dirname(paths[0])


@dataclass(frozen=True)
class HubUpload:
    """How `push_to_hub` publishes: into a new (or the existing) repository `repo_id`, as one commit."""

    private: bool = False  # for a repository it creates; an existing one keeps its visibility
    token: Optional[str] = None  # None: the login of `hf auth login` (or HF_TOKEN)
    commit_message: str = "Upload with flowmo_fast.save_pretrained"
    revision: Optional[str] = None  # a branch; None: main


def upload_folder(folder: str, repo_id: str, upload: HubUpload) -> str:
    """`folder`'s files as one commit to the model repository `repo_id` (created if missing); returns the
    commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=upload.token)
    api.create_repo(repo_id, repo_type="model", private=upload.private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=folder,
                               commit_message=upload.commit_message, revision=upload.revision)
    return str(getattr(commit, "commit_url", commit))
