"""Many independent streams spread over processes with torch.distributed.

Each rank loads the model once, takes every world_size-th stream, absorbs each from a clean memory
and writes its memory file; the ranks then gather their reports. Streams never interact, so the
result is the same whatever the number of ranks (each stream's rounds are seeded by the config
seed and the round's index, not by which rank runs it).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from . import errors
from .config import AbsorberConfig
from .errors import AbsorberError, AbsorptionError, InputError
from .memory_file import check_replaceable
from .output_files import check_writable


def memory_paths(inputs: list[str], out_dir: str) -> dict[str, str]:
    """One memory file per input, named after it; two inputs with the same name are refused, and so
    is a name where no memory can be written (a directory) or must not be (a file that is no memory)."""
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for path in inputs:
        name = Path(path).stem + ".safetensors"
        if name in seen:
            raise InputError(f"inputs {seen[name]!r} and {path!r} would write the same memory file {name}")
        seen[name] = path
        out[path] = check_writable(Path(out_dir) / name, "--out-dir's file")
        check_replaceable(out[path], "--out-dir's file")          # an input named model.txt: the model's weights
    return out


def read_stream(path: str, as_ids: bool = False, encoding: str = "utf-8"):
    """A text file (or stdin for "-"), or with as_ids its whitespace-separated token ids. Bytes that
    are not valid `encoding` are an InputError naming the byte offset, never a crash."""
    import codecs
    import sys

    try:
        info = codecs.lookup(encoding)
    except (LookupError, TypeError, ValueError):
        raise InputError(f"unknown text encoding {encoding!r}") from None
    # Codecs such as base64, rot13 or zlib are registered but turn bytes into bytes, not text.
    if not getattr(info, "_is_text_encoding", True):
        raise InputError(f"{encoding!r} is not a text encoding")
    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(f"input file {path} does not exist") from None
    except (OSError, ValueError) as exc:             # a directory, no permission, a NUL in the name
        raise InputError(f"cannot read input {path!r}: {exc}") from None
    try:
        data = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid {encoding} at byte offset {exc.start} "
                         f"(byte 0x{raw[exc.start]:02x}); pass --encoding for other text encodings") from None
    except UnicodeError as exc:                       # codecs such as punycode raise the base class
        raise InputError(f"{path}: not valid {encoding}: {exc}") from None
    try:
        # Escape codecs (unicode_escape, raw_unicode_escape) can produce lone surrogates, which no
        # tokenizer encodes: refuse them here, naming where they are.
        data.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{path}: decoding as {encoding} gives a lone surrogate at character {exc.start}") from None
    if not as_ids:
        return data
    return parse_ids(data, path)


def parse_ids(text: str, where: str) -> list[int]:
    """Whitespace-separated token ids written in ASCII digits (what int() also accepts, Unicode
    digits and underscores, would pass typos through as ids)."""
    ids = []
    for i, word in enumerate(text.split()):
        digits = word[1:] if word[:1] in "+-" else word
        if not (digits.isascii() and digits.isdigit()):
            raise InputError(f"{where}: token-id input must be whitespace-separated integers; "
                             f"item {i} is {word[:40]!r}")
        if len(digits) > 18:                          # past int64, and past int()'s digit limit further on
            raise InputError(f"{where}: item {i} ({word[:24]}...) is no token id: {len(digits)} digits")
        ids.append(int(word))
    return ids


def absorb_streams(engine, inputs: list[str], targets: dict[str, str], as_ids: bool = False) -> dict[str, dict]:
    """Absorbs each input file as its own stream (flushed) with `engine`; returns a report per input.
    An error names the input it came from (with many inputs, which one is otherwise a guess)."""
    reports = {}
    for path in inputs:
        engine.reset()
        try:
            report = engine.absorb(read_stream(path, as_ids), flush=True)
            engine.save_memory(targets[path])
        except AbsorberError as exc:
            raise type(exc)(f"{path}: {exc}" if path not in str(exc) else str(exc)) from exc
        reports[path] = {"tokens": report.tokens, "rounds": report.rounds, "steps": report.steps,
                         "final_loss": report.final_loss, "seconds": report.seconds, "memory": targets[path],
                         "held_bytes": engine.held_bytes()["delta"]}
    return reports


def absorb_many(engine, inputs: list[str], out_dir: str, as_ids: bool = False) -> dict[str, dict]:
    """The streams this rank owns (all of them without a process group), and everyone's reports."""
    targets = memory_paths(inputs, out_dir)
    os.makedirs(out_dir, exist_ok=True)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = absorb_streams(engine, inputs[rank::world], targets, as_ids)
    if world == 1:
        return mine
    gathered: list[dict] = [None] * world
    dist.all_gather_object(gathered, mine)
    merged = {k: v for part in gathered for k, v in part.items()}
    return {path: merged[path] for path in inputs}       # the inputs' order, whatever the ranks


def _worker(rank, world, init_file, model_dir, inputs, out_dir, config_dict, dtype, device, as_ids, result_file,
            quiet=False):
    try:
        if quiet:                         # a process of its own: the parent's setting does not reach it
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        _absorb_rank(rank, world, init_file, model_dir, inputs, out_dir, config_dict, dtype, device, as_ids,
                     result_file)
    except AbsorberError as exc:          # for the parent to raise as it would with one process
        Path(f"{result_file}.error{rank}").write_text(json.dumps({"type": type(exc).__name__, "message": str(exc)}))
        raise


def _absorb_rank(rank, world, init_file, model_dir, inputs, out_dir, config_dict, dtype, device, as_ids, result_file):
    from .engine import AbsorberEngine

    use_cuda = device is not None and str(device).startswith("cuda")
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world)
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dev = f"cuda:{rank}" if use_cuda else device
        eng = AbsorberEngine.from_pretrained(model_dir, config=AbsorberConfig.from_dict(config_dict), dtype=dtype,
                                             device=dev)
        reports = absorb_many(eng, inputs, out_dir, as_ids)
        if rank == 0:
            Path(result_file).write_text(json.dumps(reports))
        # Every rank past its last collective before any tears the group down: a rank that exits
        # while a peer's gloo threads still talk to it aborted (SIGABRT) now and then in the suite.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # The rank's work is on disk: leave without the interpreter's teardown. Its rare SIGABRT in the
    # suite ("terminate called without an active exception", after the barrier) is what a C++ thread
    # still joinable prints when a static object is destroyed at exit; none of ours is. An error
    # above still takes the normal path, so spawn reports its traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def absorb_many_processes(model_dir: str, inputs: list[str], out_dir: str, config: AbsorberConfig,
                          nproc: int = 1, dtype=None, device=None, as_ids: bool = False,
                          quiet: bool = False) -> dict[str, dict]:
    """Starts `nproc` ranks on this machine (gloo on CPU, nccl on GPUs) and absorbs `inputs` over them;
    `quiet`: no weight-loading progress bars in the ranks."""
    from .engine import AbsorberEngine

    if not isinstance(nproc, int) or nproc < 1:
        raise InputError(f"nproc must be a positive integer, got {nproc!r}")
    if not inputs:
        raise InputError("no input files to absorb")
    missing = [p for p in inputs if not os.path.isfile(p)]
    if missing:
        raise InputError(f"input files not found: {missing}")
    memory_paths(inputs, out_dir)                   # refuse clashing names before starting anything
    nproc = min(nproc, len(inputs))
    if nproc > 1 and device is not None and str(device).startswith("cuda"):
        # nccl takes one GPU a rank: rank r runs on cuda:r, so a named GPU or fewer GPUs than ranks
        # would put two ranks on one device, which nccl refuses mid-way.
        if str(device) != "cuda":
            raise InputError(f"device {device!r} names one GPU for {nproc} processes: pass 'cuda' (rank r on cuda:r)")
        if nproc > torch.cuda.device_count():
            raise InputError(f"{nproc} processes need {nproc} GPUs; {torch.cuda.device_count()} are visible")
    if nproc == 1:
        eng = AbsorberEngine.from_pretrained(model_dir, config=config, dtype=dtype, device=device)
        return absorb_many(eng, inputs, out_dir, as_ids)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "result.json")
        ranks = mp.spawn(_worker, args=(nproc, init_file, model_dir, list(inputs), out_dir, config.to_dict(), dtype,
                                        device, as_ids, result_file, quiet), nprocs=nproc, join=False)
        try:
            while not ranks.join():       # back as each rank ends; True once every rank has
                continue
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            raise _rank_error(result_file, nproc, exc) from exc
        finally:                          # Ctrl-C, or a failed rank: none is left absorbing on its own
            _stop(ranks.processes)
        return json.loads(Path(result_file).read_text())


def _rank_error(result_file: str, nproc: int, exc: Exception) -> Exception:
    """The error a failed rank wrote, of its own type (the first rank's that wrote one), else an
    AbsorptionError naming what spawn said."""
    for rank in range(nproc):
        path = Path(f"{result_file}.error{rank}")
        if path.exists():
            err = json.loads(path.read_text())
            kind = getattr(errors, err["type"], None)
            if isinstance(kind, type) and issubclass(kind, AbsorberError):
                return kind(err["message"])
    lines = str(exc).strip().splitlines() or [repr(exc)]      # "-- Process r terminated ...", ..., the error
    return AbsorptionError(f"a process absorbing the inputs failed ({lines[0].strip('-: ')}): {lines[-1]}")


def _stop(processes, grace: float = 5.0) -> None:
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    for proc in processes:
        proc.join(grace)
        if proc.is_alive():
            proc.kill()
            proc.join()
