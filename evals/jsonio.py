"""Writing the evaluations' JSON files: valid JSON, and never half a file."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _no_nan(value):
    """`value` with every NaN or infinity as None: json writes them as bare NaN / Infinity, which
    no strict JSON reader (jq, JSON.parse) accepts."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_nan(v) for v in value]
    return value


def write_json(path, value) -> None:
    """`value` as JSON at `path`, written to a file beside it first and then renamed over it, so an
    interrupted run leaves the old file or the new one, not a truncated one."""
    path = Path(path)
    text = json.dumps(_no_nan(value), indent=1, allow_nan=False) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")     # opened as usual: the umask applies
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
