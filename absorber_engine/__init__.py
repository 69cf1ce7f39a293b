"""Absorber Engine: absorbs a long context or an endless stream into a low-rank weight delta by
causal synchronization (Absorber LLM), so generation runs in constant memory."""

from .config import AbsorberConfig
from .engine import AbsorbReport, AbsorberEngine
from .errors import (AbsorberError, AbsorptionError, ConfigError, InputError, MemoryFileError,
                     UnsupportedModelError)

__all__ = [
    "AbsorbReport", "AbsorberConfig", "AbsorberEngine", "AbsorberError", "AbsorptionError", "ConfigError",
    "InputError", "MemoryFileError", "UnsupportedModelError",
]
__version__ = "0.1.0"
