"""Configs in JSON files: a file's object of AbsorberConfig fields, read with an error that names the
file and what is wrong with it (missing, not UTF-8, not JSON, nested too deep, not an object)."""

from __future__ import annotations

import json

from .config import AbsorberConfig
from .errors import ConfigError


def read_json_object(path, error=ConfigError, missing: str | None = None, kind: str = "config") -> dict:
    """The JSON object in a UTF-8 file, or `error` naming the file and what is wrong (`missing`:
    the message when there is no such file)."""
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except FileNotFoundError:
        raise error(missing or f"{path} does not exist") from None
    except (OSError, ValueError, RecursionError) as e:      # RecursionError: JSON nested thousands deep
        raise error(f"{path} is not a readable JSON {kind}: {e}") from None
    if not isinstance(values, dict):
        raise error(f"{path} must hold a JSON object, got {type(values).__name__}")
    return values


def read_config_json(path) -> dict:
    """The JSON object of config fields in a file, or ConfigError naming the file and what is wrong."""
    return read_json_object(path, ConfigError, f"config file {path} does not exist")


def load_config_file(path) -> AbsorberConfig:
    values = read_config_json(path)
    try:
        return AbsorberConfig.from_dict(values)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
