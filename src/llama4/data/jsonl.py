"""Reading JSONL files (one JSON value per line) with errors that name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator


def iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (`"path:line"`, value) for every non-blank line of `path`.

    A line that is not UTF-8 or not JSON raises ValueError naming the file, the line and the fault.
    """
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not valid UTF-8 (byte {e.start + 1} of the line is "
                                 f"{raw[e.start:e.start + 1]!r}); JSONL files must be UTF-8") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
