"""Resolve ``path_or_name`` to a local checkpoint directory, downloading from the hub when asked to."""

from __future__ import annotations

import re
from pathlib import Path

from visualglm.config import HUB_IDS

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Files a checkpoint directory needs; large unrelated files (e.g. other formats) are not downloaded.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.py"]


class CheckpointNotFound(FileNotFoundError):
    """Neither a local checkpoint directory nor something that could be downloaded."""


def resolve_checkpoint_dir(path_or_name: str | Path) -> Path:
    """A local directory for a path, a known model name (``chatglm-6b``) or a hub id (``THUDM/chatglm-6b``)."""
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointNotFound(f"{path} is a file; pass the checkpoint directory that holds config.json")
    name = str(path_or_name)
    repo_id = HUB_IDS.get(name, name)
    if not _HUB_ID.match(repo_id) or name.startswith((".", "/", "~")):
        raise CheckpointNotFound(f"checkpoint directory {name!r} does not exist")
    return _download(repo_id)


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointNotFound(
            f"{repo_id!r} is not a local directory. To download it from the Hugging Face hub install the "
            "hub extra (pip install 'visualglm[hub]'), or download it elsewhere and pass the local "
            "directory path instead.") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, etag_timeout=10))
    except Exception as exc:  # offline, unknown repo, gated repo, ...: all end the same way for the user
        cause = " ".join(str(exc).split())  # the hub's messages span lines; ours is one line
        raise CheckpointNotFound(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {cause}). "
            "If this machine is offline, download the checkpoint elsewhere (e.g. `huggingface-cli download "
            f"{repo_id} --local-dir DIR`) and pass the local directory path.") from None
