"""The `absorber` command line: each command, and the errors mapped to its exit codes (cli_args.py:
the arguments, and the exit codes' table)."""

from __future__ import annotations

import os
import sys
import time

from .cli_args import (CONFIG_FLAGS, DELEGATED, EXIT_ABSORB, EXIT_DISK, EXIT_INPUT, EXIT_INTERRUPT, EXIT_MEMORY,
                       EXIT_MODEL, EXIT_OK, build_parser)


def _delegate(name: str, argv: list[str]) -> int:
    import importlib
    from pathlib import Path

    module = DELEGATED[name][0]
    clone = Path(__file__).resolve().parents[1]
    if not (clone / module.split(".")[0]).is_dir():
        print(f"absorber {name} runs from a clone of the repository ({module.split('.')[0]}/ is not beside "
              f"{Path(__file__).parent})", file=sys.stderr)
        return EXIT_INPUT
    if str(clone) not in sys.path:
        sys.path.insert(0, str(clone))
    return importlib.import_module(module).main(argv)


def _config_from_args(args, base=None):
    from .config import AbsorberConfig
    from .model_store import recommended_config

    if base is None and getattr(args, "model", None):
        from .model_store import resolve

        base = recommended_config(resolve(args.model))   # the model's own measured budget, if it ships one
    values = dict(base.to_dict()) if base is not None else {}
    if getattr(args, "config", None):
        from .config_file import read_config_json

        values.update(read_config_json(args.config))
    for name in CONFIG_FLAGS:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    return AbsorberConfig.from_dict(values)


def _load_engine(args, config=None, memory: str | None = None):
    from .engine import AbsorberEngine
    from .memory_file import read_memory_config

    if not args.model:
        from .errors import InputError

        raise InputError("no model: pass --model DIR (or set $ABSORBER_MODEL)")
    _quiet_loading(args)
    if memory is not None and config is None:
        config = read_memory_config(memory)
    eng = AbsorberEngine.from_pretrained(args.model, config=config, dtype=args.dtype, device=args.device)
    if memory is not None:
        eng.load_memory(memory)
    return eng


def _quiet_loading(args) -> None:
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()          # transformers' own weight-loading bar


def _progress(total: int, quiet: bool, desc: str):
    if quiet:
        return None, None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="tok", desc=desc, file=sys.stderr, dynamic_ncols=True)
    return bar, bar.update


def _summary(report, eng, seconds: float) -> str:
    held = eng.held_bytes()
    return "\n".join([
        f"tokens absorbed : {report.absorbed} of {report.tokens} read ({eng.absorbed_tokens} in the stream so far)",
        f"rounds / steps  : {report.rounds} / {report.steps}"
        + (f" ({report.gated} rounds skipped by the surprise gate)" if report.gated else "")
        + (f" ({report.unrecited} rounds kept short of reciting their text: recite_exact ran out)"
           if report.unrecited else ""),
        f"final loss      : {report.final_loss:.6g}" if report.rounds else "final loss      : - (no round ran)",
        f"time            : {seconds:.2f} s",
        f"held memory     : delta {held['delta'] / 2**20:.2f} MiB + window {eng.held_tokens} tokens",
    ])


def cmd_absorb(args) -> int:
    from .errors import AbsorptionError
    from .memory_file import check_replaceable, read_memory_config
    from .output_files import check_writable

    # A resumed stream goes on with the config its memory was made with; flags still override it
    config = _config_from_args(args, base=read_memory_config(args.resume) if args.resume else None)
    check_writable(args.memory, "--memory")          # before the model loads and the rounds run
    check_replaceable(args.memory, "--memory")
    eng = _load_engine(args, config=config)
    if args.resume:
        eng.load_memory(args.resume)
    from .distributed import read_stream

    data = read_stream(args.input, args.ids, args.encoding)
    data = eng.to_ids(data, allow_empty=True, session=eng.default)    # a bad id: refused before any round
    n_tokens = len(data)
    bar, update = _progress(n_tokens, args.quiet, "absorbing")
    start, absorbed_before = time.perf_counter(), eng.absorbed_tokens
    code = EXIT_OK
    try:
        report = eng.absorb(data, flush=not args.keep_window, progress=update)
    except (AbsorptionError, KeyboardInterrupt) as exc:
        what = f"{exc}, " if isinstance(exc, AbsorptionError) else "interrupted "
        said = f"absorber: {what}after {getattr(exc, 'tokens_taken', 0)} of the input's {n_tokens} tokens were taken in"
        # No round completed: another stream's memory at --memory (no --resume) stays as it was.
        if eng.absorbed_tokens == absorbed_before and os.path.exists(args.memory) and not (
                args.resume and os.path.samefile(args.resume, args.memory)):
            print(f"{said}; no round completed: {args.memory} is left as it was", file=sys.stderr)
        else:
            print(f"{said}; saving the memory of the completed rounds to {args.memory}", file=sys.stderr)
            _save(eng, args.memory)
        return EXIT_ABSORB if isinstance(exc, AbsorptionError) else EXIT_INTERRUPT
    except Exception:                  # out of memory, a bug: the rounds this call completed are worth keeping
        if eng.absorbed_tokens > absorbed_before:
            print(f"absorber: a round failed; saving the memory of the completed rounds to {args.memory}",
                  file=sys.stderr)
            _save(eng, args.memory)
        raise
    finally:
        if bar is not None:
            bar.close()
    _save(eng, args.memory)
    print(_summary(report, eng, time.perf_counter() - start))
    print(f"memory written  : {args.memory}")
    return code


def _save(eng, path) -> None:
    """The run's memory written whole: a Ctrl-C or SIGTERM while it writes waits for the file (it
    landed mid-save and the run's rounds were lost, the exit code still saying they were saved)."""
    from . import interrupts

    with interrupts.deferred():
        eng.save_memory(path)


def cmd_generate(args) -> int:
    eng = _load_engine(args, memory=args.memory)
    from .distributed import parse_ids

    prompt = parse_ids(args.prompt, "--prompt") if args.ids else args.prompt
    out = eng.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, stop=args.stop, seed=args.seed, recite=args.recite)
    print(" ".join(map(str, out)) if args.ids else out)
    return EXIT_OK


def cmd_export_peft(args) -> int:
    eng = _load_engine(args, memory=args.memory)
    eng.export_peft(args.out)
    if not args.quiet:
        print(f"PEFT LoRA adapter written to {args.out} (rank {eng.config.rank}, {len(eng.delta.shapes)} modules); "
              f"load it with peft.PeftModel.from_pretrained(base_model, {args.out!r})")
    return EXIT_OK


def cmd_absorb_many(args) -> int:
    from .distributed import absorb_many_processes
    from .errors import InputError
    from .output_files import check_writable

    config = _config_from_args(args)
    try:                                             # before the model loads and the rounds run
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out-dir {args.out_dir!r} cannot be made: {exc}") from None
    check_writable(os.path.join(args.out_dir, "memory.absorber"), "--out-dir")
    _quiet_loading(args)
    reports = absorb_many_processes(args.model, args.inputs, args.out_dir, config, nproc=args.nproc,
                                    dtype=args.dtype, device=args.device, as_ids=args.ids, quiet=args.quiet)
    for path, rep in sorted(reports.items()):
        print(f"{path}: {rep['tokens']} tokens, {rep['rounds']} rounds, final loss {rep['final_loss']:.6g}, "
              f"{rep['seconds']:.1f} s, held {rep['held_bytes'] / 2**20:.2f} MiB -> {rep['memory']}")
    return EXIT_OK


def cmd_serve(args) -> int:
    from .serve.launch import serve

    return serve(args, _config_from_args(args), _load_engine)


COMMANDS = {"absorb": cmd_absorb, "generate": cmd_generate, "export-peft": cmd_export_peft,
            "absorb-many": cmd_absorb_many, "serve": cmd_serve}


def main(argv=None) -> int:
    from . import interrupts
    from .errors import (AbsorptionError, ConfigError, InputError, MemoryFileError, UnsupportedModelError)

    argv = list(sys.argv[1:] if argv is None else argv)
    delegated = bool(argv) and argv[0] in DELEGATED
    args = None if delegated else build_parser().parse_args(argv)
    try:                                    # the delegated commands' errors are mapped the same way
        if delegated or args.command == "serve":            # uvicorn handles SIGTERM itself
            return _delegate(argv[0], argv[1:]) if delegated else COMMANDS[args.command](args)
        with interrupts.terminate_as_interrupt():
            return COMMANDS[args.command](args)
    except (InputError, ConfigError) as exc:
        print(f"absorber: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except UnsupportedModelError as exc:
        print(f"absorber: {exc}", file=sys.stderr)
        return EXIT_MODEL
    except MemoryFileError as exc:
        print(f"absorber: {exc}", file=sys.stderr)
        return EXIT_MEMORY
    except AbsorptionError as exc:
        print(f"absorber: {exc}", file=sys.stderr)
        return EXIT_ABSORB
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
        print(f"absorber: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as exc:              # a full disk, an I/O error: no bug, and no bad argument
        print(f"absorber: {exc}", file=sys.stderr)
        return EXIT_DISK
    except KeyboardInterrupt:
        print("absorber: interrupted", file=sys.stderr)
        return EXIT_INTERRUPT


if __name__ == "__main__":
    sys.exit(main())
