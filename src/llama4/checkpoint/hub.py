"""Hub ids (`meta-llama/Llama-4-Scout-17B-16E-Instruct`) resolved from the local Hugging Face cache.

Nothing is downloaded: `huggingface_hub.snapshot_download(..., local_files_only=True)` only finds a
snapshot that is already in the cache (`$HF_HUB_CACHE`, `$HF_HOME/hub`, or ~/.cache/huggingface/hub).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_checkpoint(path: str | os.PathLike, *, revision: str | None = None) -> Path:
    """`path` itself when it is a directory, else the cached snapshot of the Hub id `path`."""
    p = Path(path)
    if p.is_dir() or not HUB_ID.fullmatch(str(path)) or p.exists():
        return p
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise FileNotFoundError(f"{path}: no such checkpoint directory (and huggingface_hub, which would look the "
                                f"Hub id up in the local cache, is not installed)") from None
    try:
        return Path(snapshot_download(str(path), revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{path}: no such directory, and the Hub id is not in the local Hugging Face cache ({HF_HUB_CACHE}). "
            f"llama4 never downloads; fetch it first, e.g. `huggingface-cli download {path}`, or pass a "
            f"directory") from None
