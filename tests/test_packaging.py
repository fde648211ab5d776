"""What pyproject.toml promises matches what the code imports."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_python_version_and_runtime_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    src = "\n".join(p.read_text() for p in (ROOT / "src" / "llama4").rglob("*.py"))
    if re.search(r"^\s*import tomllib", src, re.M) and "tomli" not in src:
        assert project["requires-python"].startswith(">=3.11"), "tomllib is 3.11+"
    # `llama4 demo` and `data synth` write/read videos: PyAV must come with the package, not an extra.
    assert any(d.split(">")[0].split("=")[0].strip() == "av" for d in project["dependencies"])
    assert "3.11" in (ROOT / "README.md").read_text()
