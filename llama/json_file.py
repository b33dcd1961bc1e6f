"""Reading the small JSON files that describe models and adapters, with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path


def read_json_object(path: str | Path, error: type[ValueError], what: str) -> dict:
    """The JSON object in `path`, or `error("<path>: <problem>")` (missing, not JSON, not an object)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a JSON object")
    return raw
