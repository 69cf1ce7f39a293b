"""Memory files: the deltas and the raw window of a stream, as safetensors with metadata.

safetensors holds only tensors and a string → string header, so loading a file never runs code.
The tensors are the deltas (one, or memory_slots', oldest first), the window, the tokens queued
behind it (fed, not absorbed yet), the replay buffer and the surprise gate's history. Version 1
files, which hold one delta, still load. The header names the format and version, the base model
it was made for (a fingerprint of its config, parameter names and shapes, and a sample of each
weight's values; and a checksum of every value), the engine config and
the stream's counters. A file is written to a temporary name and renamed, so a crash never leaves
a half-written memory under the real name. Loading checks everything before touching the engine,
so a refused file leaves the memory held before intact.
"""

from __future__ import annotations

import errno
import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from . import interrupts
from .config import AbsorberConfig
from .errors import ConfigError, InputError, MemoryFileError
from .model_identity import is_read_once, model_checksum, model_fingerprint
from .output_files import WrittenUnsynced, output_path, sorted_header, write_whole
from .recital import MARK_TOKENS
from .session import BANK_DTYPE

FORMAT = "absorber-memory"
VERSION = 2
READABLE = ("1", "2")       # version 1: one delta, as "delta.<name>.A"; version 2: "slots.<i>.<name>.A"
def save_memory(session, path) -> None:
    path = output_path(path, "memory file")
    if os.path.isdir(path):
        raise InputError(f"memory file {path!r} is a directory")
    tensors = {f"slots.{i}.{k}": v.cpu().contiguous()
               for i, delta in enumerate(session.slots) for k, v in delta.state_dict().items()}
    tensors["slot_tokens"] = torch.tensor([d.round_tokens for d in session.slots], dtype=torch.int64)
    tensors.update({f"marks.{i}": torch.tensor(d.marks, dtype=torch.int64)      # recital.marks of its X
                    for i, d in enumerate(session.slots) if d.marks is not None})
    held = list(session.engine.scheduler.window(session.key, all=True))
    st = session.stats()
    capacity = st["chunk_tokens"] + st["sync_tokens"]
    tensors["window"] = torch.tensor(held[:capacity], dtype=torch.int64)
    if len(held) > capacity:                         # fed and not yet absorbed: kept too
        tensors["queued"] = torch.tensor(held[capacity:], dtype=torch.int64)
    for i, q in enumerate(session.replay):           # replay_rounds: earlier rounds' probes, in order
        tensors[f"replay.{i}"] = q.cpu().to(torch.int64).contiguous()
    if session.surprise:                             # surprise_gate: recent rounds' first losses
        tensors["surprise"] = torch.tensor(list(session.surprise), dtype=torch.float64)
    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "model_fingerprint": model_fingerprint(session.runner),
        "model_checksum": model_checksum(session.runner, cached=True),
        "model_type": session.runner.model_type,
        "model_dtype": _dtype_name(session.runner.dtype),
        "config": json.dumps(_made_with(session, st).to_dict(), sort_keys=True),
        "tokens_absorbed": str(session.absorbed_tokens),
        "rounds": str(session.rounds),
        "slots": str(len(session.slots)),
    }
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_whole(path, sorted_header(save(tensors, metadata=meta)), prefix=".memory-")
    except OSError as exc:            # a file where a directory should be, no permission, a name too long
        if exc.errno in (errno.ENOSPC, errno.EIO, errno.EDQUOT) or isinstance(exc, WrittenUnsynced):   # the disk's
            raise
        raise InputError(f"cannot write memory file {path!r}: {exc}") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _made_with(session, st: dict) -> AbsorberConfig:
    """The config a stream ran with: the engine's, with the session's own round sizes where it was
    opened with others (what `absorber absorb --resume` rebuilds the engine from), unless no config
    can hold them (a future longer than its Y), where the engine's stands as before."""
    try:
        return session.config.replace(chunk_tokens=st["chunk_tokens"], sync_tokens=st["sync_tokens"])
    except ConfigError:
        return session.config


def read_memory(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        path = os.fsdecode(os.fspath(path))     # safetensors reads str paths only
    except TypeError:
        raise MemoryFileError(f"a memory file must be a path (str or os.PathLike), got {type(path).__name__}") from None
    if not os.path.isfile(path):
        raise MemoryFileError(f"memory file {path!r} " + ("is a directory" if os.path.isdir(path) else "does not exist"))
    # One open file for the header and the tensors: opened twice, a save renamed over the path in
    # between gave one file's header with the other's deltas. The header first: a model's weights
    # given by mistake are not read.
    try:
        with open(path, "rb") as f:
            head, meta = _header(f)
            if meta.get("format") == FORMAT:
                blob = len(head).to_bytes(8, "little") + head + f.read()
                with interrupts.deferred():        # a Ctrl-C in the decode came out as a ValueError: "corrupt"
                    tensors = load(blob)
    except (SafetensorError, OSError, ValueError, RuntimeError, AttributeError, RecursionError) as exc:
        raise MemoryFileError(f"{path} is not a readable memory file (truncated or corrupt?): {exc}") from exc
    if meta.get("format") != FORMAT:
        raise MemoryFileError(f"{path} is not an absorber memory file (format {meta.get('format')!r})")
    if meta.get("version") not in READABLE:
        raise MemoryFileError(f"{path} has memory format version {meta.get('version')!r}; "
                              f"this engine reads versions {', '.join(READABLE)}")
    return tensors, meta


def _header(f) -> tuple[bytes, dict]:
    """(the header's bytes, its metadata) of the safetensors file open in `f`, read up to the tensors."""
    size = int.from_bytes(f.read(8), "little")
    head = f.read(size) if size <= 2**26 else b""
    if len(head) != size:
        raise ValueError(f"its header of {size} bytes is cut short or past any header's size")
    meta = json.loads(head).get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("its header's metadata is not a mapping")
    return head, meta


def check_replaceable(path, what: str) -> None:
    """InputError, before any work, when `path` holds a file no memory may be written over: anything
    but a memory file (of any version) or an empty file. `--memory` named the input text, or a
    model's weights, and the run wrote over it."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    try:
        with open(path, "rb") as f:
            meta = _header(f)[1]
    except (OSError, ValueError, AttributeError, RecursionError):
        meta = {}
    if meta.get("format") != FORMAT:
        raise InputError(f"{what} {path!r} is a file but no absorber memory file: refusing to write over it")


def read_memory_config(path) -> AbsorberConfig:
    """The engine config a memory file was made with (to rebuild a matching engine)."""
    _, meta = read_memory(path)
    try:
        return AbsorberConfig.from_dict(json.loads(meta["config"]))
    except (KeyError, ValueError, ConfigError, RecursionError) as exc:
        raise MemoryFileError(f"{path} has a corrupt header: {exc}") from exc


def load_memory(session, path) -> None:
    tensors, meta = read_memory(path)
    runner = session.runner
    fingerprints = (model_fingerprint(runner), model_fingerprint(runner, legacy=True))
    if meta.get("model_fingerprint") not in fingerprints or (     # files before 2026-12-06: no checksum
            "model_checksum" in meta and meta["model_checksum"] != model_checksum(runner, cached=is_read_once(runner))):
        made_in, ours = meta.get("model_dtype"), _dtype_name(runner.dtype)
        if made_in is not None and made_in != ours and "float16" in (made_in, ours):
            # fp16 rounds an fp32 checkpoint's weights otherwise than bf16 does: the same model, other values
            raise MemoryFileError(f"{path} was made with the model's weights in {made_in}; they are in {ours} here, "
                                  "which rounds them otherwise: load the model in float32 or bfloat16 (--dtype)")
        raise MemoryFileError(f"{path} was made for another base model "
                              f"({meta.get('model_type')!r}, different config or weights)")
    try:
        saved = AbsorberConfig.from_dict(json.loads(meta["config"]))
        absorbed, rounds = _count(meta["tokens_absorbed"]), _count(meta["rounds"])
    except (KeyError, ValueError, ConfigError, RecursionError) as exc:
        raise MemoryFileError(f"{path} has a corrupt header: {exc}") from exc
    mine = session.config
    if (saved.rank, saved.scale) != (mine.rank, mine.scale):
        raise MemoryFileError(f"{path} holds a rank-{saved.rank} delta (scale {saved.scale}); this engine "
                              f"uses rank {mine.rank} (scale {mine.scale})")
    slots = _slot_states(path, tensors, meta, session)
    window = tensors.get("window")
    if window is None or window.dim() != 1 or window.dtype != torch.int64:
        raise MemoryFileError(f"{path} has no valid window tensor")
    st = session.stats()
    capacity = st["chunk_tokens"] + st["sync_tokens"]
    if window.numel() > capacity:
        raise MemoryFileError(f"{path} holds a window of {window.numel()} tokens; this session's window "
                              f"is {capacity}")
    queued = tensors.get("queued", torch.zeros(0, dtype=torch.int64))
    if queued.dim() != 1 or queued.dtype != torch.int64:
        raise MemoryFileError(f"{path} has no valid queue of tokens")
    # The scheduler counts in int64: a file at 2**63 - 1 wrapped negative on its next round and saved
    # a file no load took. 2**53 (JSON's exact integers) is 10^15 tokens: never reached by absorbing.
    if not (0 <= absorbed <= 2**53 and 0 <= rounds <= 2**53):
        raise MemoryFileError(f"{path} has counters out of range (tokens_absorbed {absorbed}, rounds {rounds})")
    replay = [tensors[f"replay.{i}"] for i in range(len(tensors)) if f"replay.{i}" in tensors]
    # A probe is a round's X (at most the window) in the frame's few dozen tokens; a model with
    # absolute positions reads none longer than its table.
    vocab, longest = runner.vocab_size, capacity + 256
    if runner.absolute_positions:
        longest = min(longest, runner.max_positions - len(runner.prefix))
    for q in replay:
        if q.dim() != 1 or q.dtype != torch.int64 or q.numel() == 0 or int(q.min()) < 0 or int(q.max()) >= vocab:
            raise MemoryFileError(f"{path} has a corrupt replay buffer")
        if q.numel() > longest:
            raise MemoryFileError(f"{path} holds a replay probe of {q.numel()} tokens; the model reads {longest}")
    lengths = tensors.get("slot_tokens", torch.zeros(len(slots), dtype=torch.int64))   # absent before recitals
    if (lengths.dtype != torch.int64 or lengths.shape != (len(slots),) or bool((lengths < 0).any())
            or bool((lengths > capacity).any())):
        raise MemoryFileError(f"{path} has corrupt round lengths for its deltas")
    marks = [tensors.get(f"marks.{i}") for i in range(len(slots))]          # absent before 2026-12-06
    for m, n in zip(marks, lengths.tolist()):
        if m is not None and (m.dtype != torch.int64 or m.shape != (-(-n // MARK_TOKENS),)
                              or bool((m < 0).any()) or bool((m > 0xFFFF).any())):
            raise MemoryFileError(f"{path} has corrupt marks of its deltas' rounds")
    surprise = tensors.get("surprise")
    if surprise is not None and (surprise.dim() != 1 or surprise.dtype != torch.float64
                                 or not bool(torch.isfinite(surprise).all()) or bool((surprise < 0).any())):
        raise MemoryFileError(f"{path} has a corrupt surprise history")
    # Everything checked. The new deltas are built aside first: a failure there (out of memory, an
    # interrupt) leaves the session as it was. Then the window (it validates the ids), then the swap,
    # which allocates nothing that could fail halfway.
    device = session.delta.device                   # where the scheduler keeps this session's deltas now
    fresh = []
    for state, length, m in zip(slots, lengths.tolist(), marks):
        delta = session.new_delta()
        delta.to(device)
        delta.load_state_dict(state)
        if session.slots.maxlen > 1 and not delta.is_zero():
            delta.compact(BANK_DTYPE)               # held as a committed round's (session.keep)
            delta.round_tokens, delta.marks = length, None if m is None else m.tolist()
            if delta.is_zero():                     # below BANK_DTYPE's range: a Δ = 0 that trains on
                delta.reset()
            if not all(bool(torch.isfinite(t).all()) for name in delta.shapes for t in delta.factors(name)):
                # finite in fp32, inf once rounded: the bank then held inf and saved files no load took
                raise MemoryFileError(f"{path} holds delta values past the range of {BANK_DTYPE}, "
                                      "in which a bank holds its deltas")
        fresh.append(delta)
    with interrupts.deferred():     # a Ctrl-C between the steps left the file's window with no delta at all
        try:
            session.restore_window(window.tolist() + queued.tolist(), absorbed, rounds)
        except (IndexError, ValueError) as exc:
            raise MemoryFileError(f"{path} has a window this model cannot read: {exc}") from exc
        session.slots.clear()
        session.slots.extend(fresh)
        session.replay.clear()
        if session.config.replay_rounds:
            session.replay.extend(replay[-session.replay.maxlen:])
        session.surprise.clear()
        if surprise is not None:
            session.surprise.extend(surprise.tolist()[-session.surprise.maxlen:])


def _count(text: str) -> int:
    """A header's counter as save_memory writes it: ASCII digits only (int() also took "١٢", " +1_0 ")."""
    if not (isinstance(text, str) and text.isascii() and text.isdigit()):
        raise ValueError(f"not a count: {text!r}")
    return int(text)


def _slot_states(path, tensors: dict, meta: dict, session) -> list[dict]:
    """The file's deltas, oldest first, each checked against this engine's; MemoryFileError if any
    does not fit or there are more than the session keeps (memory_slots)."""
    if meta["version"] == "1":
        prefixes = ["delta."]
    else:
        try:
            count = _count(meta["slots"])
        except (KeyError, ValueError):
            raise MemoryFileError(f"{path} has a corrupt header: no valid slot count") from None
        if not 1 <= count <= session.slots.maxlen:
            raise MemoryFileError(f"{path} holds {count} deltas; this engine keeps 1 to {session.slots.maxlen} "
                                  "(memory_slots)")
        prefixes = [f"slots.{i}." for i in range(count)]
    known = [k for k in tensors if k.startswith(tuple(prefixes))]
    stray = sorted(k for k in tensors if (k.startswith(("delta.", "slots.")) and k not in known))
    if stray:
        raise MemoryFileError(f"{path} holds delta tensors its header does not count: {stray[:4]}")
    states = []
    for prefix in prefixes:
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        bad = sorted(k for k, v in state.items() if not v.dtype.is_floating_point)
        if bad:
            # A copy into the fp32 delta would drop an imaginary part or read 0/1 as weights without a word.
            raise MemoryFileError(f"{path} holds delta tensors that are not floating point: {bad[:4]}")
        try:
            session.delta.check_state(state)
        except (ValueError, RuntimeError, NotImplementedError) as exc:     # a dtype torch cannot convert
            raise MemoryFileError(f"{path} does not fit this engine's delta (other targets?): {exc}") from exc
        states.append(state)
    return states
