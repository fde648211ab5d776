"""Which media URLs a request may name: data: URLs always, local files only under allowed directories.

A server must not read arbitrary files for whoever can reach it, nor fetch from the network on their
behalf. `file://` URLs (and bare paths) are resolved, symlinks included, and must land inside one of
the `--allowed-media-dir` directories; without any, only data: URLs work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence
from urllib.parse import unquote

from .protocol import APIError


def media_urls(messages: Sequence[dict]) -> list[tuple[str, str]]:
    """(url, param) for each image_url / video_url part."""
    found = []
    for i, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("image_url", "video_url"):
                value = part.get(kind)
                url = value.get("url") if isinstance(value, dict) else value
                param = f"messages.{i}.content.{j}.{kind}"
                if not isinstance(url, str):
                    raise APIError(400, f"{param}: expected {{'url': str}}, got {value!r:.80}", param=param)
                found.append((url, param))
    return found


def check_media(messages: Sequence[dict], allowed_dirs: Sequence[Path]) -> None:
    """APIError 400 for any media URL this server will not open."""
    roots = [Path(d).resolve() for d in allowed_dirs]
    for url, param in media_urls(messages):
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            continue
        if scheme in ("http", "https", "ftp", "ftps", "ws", "wss"):
            raise APIError(400, f"{param}: network URLs are not fetched ({url[:60]!r}); send the image as a "
                                f"data: URL", param=param, code="url_not_allowed")
        if scheme not in ("file", ""):
            raise APIError(400, f"{param}: unsupported URL scheme {scheme!r}; use a data: URL", param=param,
                           code="url_not_allowed")
        raw = unquote(url[len("file://"):] if url.startswith("file://") else url[len("file:"):] if scheme else url)
        if not roots:
            raise APIError(400, f"{param}: local files are not served (start the server with --allowed-media-dir "
                                f"DIR to allow file:// URLs under DIR); send a data: URL", param=param,
                           code="url_not_allowed")
        path = Path(raw).resolve()
        if not any(path.is_relative_to(r) for r in roots):
            raise APIError(400, f"{param}: {raw!r} is outside the allowed media directories", param=param,
                           code="url_not_allowed")
