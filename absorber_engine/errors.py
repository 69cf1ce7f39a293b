"""The engine's exceptions. Each subclasses the builtin a caller would naturally catch."""


class AbsorberError(Exception):
    """Base of every error the engine raises on purpose."""


class ConfigError(AbsorberError, ValueError):
    """An AbsorberConfig field has a value the engine cannot run with."""


class InputError(AbsorberError, ValueError):
    """Text or token ids given to absorb(), logits() or generate() cannot be used."""


class UnsupportedModelError(AbsorberError, TypeError):
    """The model is not a causal LM architecture the engine knows how to attach a delta to."""


class MemoryFileError(AbsorberError, ValueError):
    """A memory file is corrupt, truncated, of an unknown version, or made for another base model."""


class AbsorptionError(AbsorberError, RuntimeError):
    """A round's loss became NaN/inf or diverged; the memory held before the round was kept."""
