"""What every harness asserts, and the pieces they share: memory snapshots, a byte reader that turns
a fuzzer's raw bytes into structured choices, and the list of crashes known but not fixed yet."""

from __future__ import annotations

import re
import struct
import traceback
from dataclasses import dataclass

import torch


class ContractViolation(AssertionError):
    """A call broke the contract without crashing: wrong error type, memory changed, engine unusable."""


# ---------------------------------------------------------------------------- memory snapshots

def snapshot(session) -> tuple:
    """The memory a session holds: every delta tensor's bytes, the window and the counters."""
    delta = {k: (v.dtype, tuple(v.shape), v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
             for k, v in session.delta.state_dict().items()}
    return delta, list(session.window_tokens()), session.absorbed_tokens


def violate(message: str):
    """Raises the violation, or KnownCrash when it is one of KNOWN."""
    exc = ContractViolation(message)
    entry = known(exc)
    raise (KnownCrash(entry, exc) if entry else exc)


def assert_unchanged(session, before: tuple, what: str) -> None:
    after = snapshot(session)
    if after[0] != before[0]:
        changed = sorted(k for k in before[0] if after[0].get(k) != before[0][k])
        violate(f"{what}: the delta changed ({changed[:3]})")
    if after[1] != before[1]:
        violate(f"{what}: the window changed ({len(before[1])} -> {len(after[1])} tokens)")
    if after[2] != before[2]:
        violate(f"{what}: absorbed_tokens changed ({before[2]} -> {after[2]})")


def assert_usable(engine, probe: list[int], expected: torch.Tensor | None, what: str) -> torch.Tensor:
    """The engine still answers; with `expected`, exactly as before the call."""
    got = engine.logits(probe)
    if expected is not None and not torch.equal(got, expected):
        violate(f"{what}: logits of the probe changed")
    return got


# ---------------------------------------------------------------------------- raw bytes -> choices

class Reader:
    """Consumes a byte string into choices; when the bytes run out every draw returns its smallest
    choice, so any input (the empty one too) decodes to something."""

    def __init__(self, data: bytes):
        self.data, self.pos = bytes(data), 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def int_in(self, lo: int, hi: int) -> int:
        span = hi - lo + 1
        nbytes = max(1, (span.bit_length() + 7) // 8)
        v = 0
        for _ in range(nbytes):
            v = (v << 8) | self.byte()
        return lo + v % span

    def choice(self, options):
        return options[self.int_in(0, len(options) - 1)]

    def bool(self) -> bool:
        return self.byte() & 1 == 1

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def blob(self, limit: int) -> bytes:
        return self.take(self.int_in(0, limit))

    def rest(self) -> bytes:
        return self.take(self.remaining())

    def float(self) -> float:
        return struct.unpack("<d", self.take(8).ljust(8, b"\0"))[0]

    def text(self, limit: int) -> str:
        return self.blob(limit).decode("utf-8", "replace")

    def int_any(self) -> int:
        """Small ints mostly, the edges of every integer width sometimes."""
        kind = self.int_in(0, 3)
        if kind == 0:
            return self.int_in(-4, 40)
        if kind == 1:
            return self.int_in(0, 5000)
        return self.choice(EDGE_INTS)


EDGE_INTS = (0, 1, -1, 2**31 - 1, 2**31, -2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, -2**63, -2**63 - 1,
             2**64, 2**70, 10**30, -10**30, 10**400)
EDGE_FLOATS = (0.0, -0.0, 1.0, 0.5, 1e-300, 5e-324, 1e300, float("inf"), float("-inf"), float("nan"), -1.0, 1.5)


# ---------------------------------------------------------------------------- crashes known, not fixed here

@dataclass(frozen=True)
class Known:
    """A crash whose cause lies in code this harness's owner may not change (the regression test in
    tests/test_bad_input.py is an xfail, strict); matched on the exception type, the message, and
    patterns of the file and function of the innermost project frame (patterns, because that code
    is being reorganised)."""

    name: str
    exc: type
    file: str
    function: str
    message: str
    fix: str

    def matches(self, exc: BaseException) -> bool:
        if not isinstance(exc, self.exc) or not re.search(self.message, str(exc)):
            return False
        if self.exc is ContractViolation:          # raised by a harness: the message says it all
            return True
        frame = project_frame(exc)
        return (frame is not None and re.search(self.file + "$", frame[0]) is not None
                and re.fullmatch(self.function, frame[1]) is not None)


# Each has an xfail(strict=True) regression test in tests/test_bad_input.py; whoever fixes one
# deletes its entry here, so the fuzzers hold the fix.
KNOWN: list[Known] = []     # every crash found so far is fixed at its cause


def project_frame(exc: BaseException):
    """(file, function, line) of the innermost frame inside absorber_engine, or None."""
    found = None
    for fs in traceback.extract_tb(exc.__traceback__):
        if "/absorber_engine/" in fs.filename.replace("\\", "/"):
            found = (fs.filename.replace("\\", "/"), fs.name, fs.lineno)
    return found


def known(exc: BaseException) -> Known | None:
    return next((k for k in KNOWN if k.matches(exc)), None)


def signature(exc: BaseException) -> str:
    """One line per distinct crash: the type and where in the project it was raised."""
    frame = project_frame(exc)
    where = f"{frame[0].rsplit('/', 1)[-1]}:{frame[1]}" if frame else "outside absorber_engine"
    return f"{type(exc).__name__} at {where}"


class KnownCrash(Exception):
    """Raised by a harness in place of a crash listed in KNOWN: drivers count it apart, and the
    rest of that input's checks are skipped."""

    def __init__(self, entry: Known, exc: BaseException):
        super().__init__(f"known: {entry.name} ({type(exc).__name__}: {exc})")
        self.entry, self.exc = entry, exc


def attempt(call, allowed=None):
    """('ok', result) or ('refused', the typed error); a listed crash becomes KnownCrash, any other
    exception propagates as the crash it is."""
    from absorber_engine.errors import AbsorberError

    try:
        return "ok", call()
    except (allowed or AbsorberError) as exc:
        return "refused", exc
    except Exception as exc:
        entry = known(exc)
        if entry is None:
            raise
        raise KnownCrash(entry, exc) from exc


# ---------------------------------------------------------------------------- crashes found and fixed

# What the harnesses found in the code they may change, where it was fixed, and the regression
# test that holds the minimized input (tests/test_bad_input.py unless named otherwise).
FIXED = [
    {"target": "cli_input", "crash": "LookupError: --encoding rot13/base64/zlib/hex (byte codecs)",
     "fixed_in": "distributed.read_stream", "test": "test_cli_inputs_found_by_fuzzing[byte codec]"},
    {"target": "cli_input", "crash": "UnicodeError: --encoding punycode/undefined (not UnicodeDecodeError)",
     "fixed_in": "distributed.read_stream", "test": "test_cli_inputs_found_by_fuzzing[codec raising UnicodeError]"},
    {"target": "cli_input", "crash": "ValueError: --encoding with a NUL byte", "fixed_in": "distributed.read_stream",
     "test": "test_cli_inputs_found_by_fuzzing[NUL in the encoding]"},
    {"target": "cli_input", "crash": "TypeError from the tokenizer: --encoding unicode_escape giving lone surrogates",
     "fixed_in": "distributed.read_stream", "test": "test_cli_inputs_found_by_fuzzing[lone surrogate]"},
    {"target": "cli_input", "crash": "IsADirectoryError / ValueError: --input a directory or a path with NUL",
     "fixed_in": "distributed.read_stream", "test": "test_cli_input_that_is_a_directory"},
    {"target": "cli_input", "crash": "ValueError: generate --ids --prompt with junk (int() in cli)",
     "fixed_in": "cli.cmd_generate via distributed.parse_ids", "test": "test_cli_arguments_found_by_fuzzing[junk prompt ids]"},
    {"target": "cli_input", "crash": "ValueError: token-id file with 5000 digits (int() digit limit)",
     "fixed_in": "distributed.parse_ids", "test": "test_cli_inputs_found_by_fuzzing[huge id]"},
    {"target": "cli_input", "crash": "JSONDecodeError / UnicodeDecodeError / RecursionError / TypeError: --config "
     "not JSON, not UTF-8, nested 3000 deep, or null", "fixed_in": "config_file.read_config_json (used by cli)",
     "test": "test_cli_arguments_found_by_fuzzing[config ...]"},
    {"target": "config_dict", "crash": "TypeError: from_dict with non-string keys (sorting mixed types)",
     "fixed_in": "config.AbsorberConfig.from_dict", "test": "test_configs_found_by_fuzzing[non-string key]"},
    {"target": "config_dict", "crash": "TypeError: targets / probe_kinds / future_prompt of the wrong type "
     "(int, None)", "fixed_in": "config.AbsorberConfig.__post_init__/validate",
     "test": "test_configs_found_by_fuzzing[targets = 5]"},
    {"target": "config_dict", "crash": "OverflowError: a float field given 10**400", "fixed_in": "config.validate",
     "test": "test_configs_found_by_fuzzing[lr = 10**400]"},
    {"target": "config_dict", "crash": "TypeError / ValueError in the scheduler or torch: chunk_tokens, max_resident, "
     "seed past int64 (engine built, then crashed)", "fixed_in": "config.validate (upper bounds)",
     "test": "test_configs_found_by_fuzzing[chunk_tokens = 2**64]"},
    {"target": "config_dict", "crash": "objective / backend unhashable or non-str; prefix_bos and friends not bool",
     "fixed_in": "config.validate", "test": "test_configs_found_by_fuzzing[prefix_bos = 'no']"},
    {"target": "memory_file", "crash": "TypeError in the scheduler: tokens_absorbed past int64",
     "fixed_in": "memory_file.load_memory", "test": "test_memory_files_found_by_fuzzing[counter past int64]"},
    {"target": "memory_file", "crash": "complex / bool delta tensors accepted (imaginary part dropped silently)",
     "fixed_in": "memory_file.load_memory", "test": "test_memory_files_found_by_fuzzing[complex delta]"},
    {"target": "export_targets", "crash": "TypeError / ValueError / IsADirectoryError / FileExistsError / "
     "NotADirectoryError / OSError(ELOOP, ENAMETOOLONG): memory or adapter targets that cannot be written",
     "fixed_in": "memory_file.save_memory, peft_export.export_peft", "test": "test_output_targets_found_by_fuzzing"},
    {"target": "model_dir", "crash": "OSError / StrictDataclassFieldValidationError / ValueError / KeyError / "
     "TypeError: config.json missing, not JSON, wrong-typed or unknown model_type",
     "fixed_in": "model_store.load_pretrained", "test": "test_model_directories_found_by_fuzzing"},
    {"target": "model_dir", "crash": "SafetensorError / RuntimeError / EOFError / UnpicklingError: weights missing, "
     "cut short, garbage or not matching config.json", "fixed_in": "model_store._check_weights",
     "test": "test_model_directories_found_by_fuzzing"},
    {"target": "model_dir", "crash": "14 GB allocated (then killed): config.json asking for 10**6 layers",
     "fixed_in": "model_store._check_weights", "test": "test_model_directories_found_by_fuzzing[absurd layers]"},
    {"target": "model_dir", "crash": "struct.error: GGUF file cut short", "fixed_in": "model_store._convert_gguf",
     "test": "test_gguf_cut_short_after_its_header"},
    {"target": "engine_args", "crash": "RuntimeError / ValueError / TypeError from torch.manual_seed: a seed that is "
     "no int64 (2**70, 'a', True, 1.5)", "fixed_in": "inputs.py (commit 9b7a708)",
     "test": "test_generate_seed_that_is_no_int64"},
    {"target": "engine_args", "crash": "TypeError: stop = 3.5, [None], [object()]", "fixed_in": "inputs.stop_ids (9b7a708)",
     "test": "test_generate_stop_that_is_no_ids"},
    {"target": "engine_args", "crash": "TypeError / ValueError in torch.as_tensor: numpy arrays of strings, objects or "
     "big-endian ints", "fixed_in": "inputs.as_id_list (9b7a708)",
     "test": "test_numpy_arrays_that_are_no_ids, test_big_endian_numpy_ids_read_like_native_ones"},
    {"target": "engine_args", "crash": "TypeError from the tokenizer: text with lone surrogates",
     "fixed_in": "inputs.to_ids (9b7a708)", "test": "test_text_with_lone_surrogates"},
    {"target": "engine_args", "crash": "TypeError after a committed round (memory changed): progress = 5",
     "fixed_in": "engine.absorb (9b7a708)", "test": "test_progress_that_is_not_callable"},
    {"target": "engine_args", "crash": "RuntimeError in torch.multinomial / OverflowError: temperature 1e-300, 5e-324, "
     "10**400, top_p 1e-300", "fixed_in": "inputs.check_sampling, generate.sample_next (9b7a708; now in sampling.py)",
     "test": "test_sampling_at_extremes"},
    {"target": "config_dict", "crash": "a refused AbsorberEngine() left its deltas on the model (future_prompt text "
     "without a tokenizer)", "fixed_in": "the engine restructure (c1b93fc) checks before attaching",
     "test": "test_engine_refused_after_attaching_leaves_the_model_plain"},
]
