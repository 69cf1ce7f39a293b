"""Absorber Engine: absorbs a long context or an endless stream into a low-rank weight delta by
causal synchronization (Absorber LLM), so generation runs in constant memory."""

from .config import AbsorberConfig
from .engine import AbsorberEngine
from .session import AbsorbReport
from .errors import (AbsorberError, AbsorptionError, ConfigError, InputError, MemoryFileError,
                     UnsupportedModelError)
from .interop import AbsorbingModel, wrap

__all__ = [
    "AbsorbReport", "AbsorberConfig", "AbsorberEngine", "AbsorberError", "AbsorbingModel", "AbsorptionError",
    "ConfigError", "InputError", "MemoryFileError", "UnsupportedModelError", "wrap",
]
__version__ = "0.1.0"
