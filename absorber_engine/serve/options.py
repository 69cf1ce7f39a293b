"""The options of `absorber serve` (kept apart so the CLI builds its parser without importing the server).
Each is checked as it is parsed (exit 2 with the reason), before the model loads: a timeout of 0
or NaN, a queue of 0 (unbounded) or a port past 65535 used to be taken as given."""

from __future__ import annotations

import argparse
import math


def _number(kind, low: float, high: float = math.inf, low_open: bool = False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not (math.isfinite(value) and (value > low if low_open else value >= low) and value <= high):
            span = f"{'above' if low_open else 'at least'} {low:g}" + (f" and at most {high:g}" if high < math.inf else "")
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {span}")
        return value
    return parse


def _text(what: str):
    def parse(text: str):
        if not text.strip():              # '' meant no state directory at all: sessions lost at the first restart
            raise argparse.ArgumentTypeError(f"{what} is empty")
        return text
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=_number(int, 0, 65535), default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--state-dir", type=_text("the state directory"), help="sessions are saved here as memory files and loaded at start "
                                       "(default: kept in memory only)")
    p.add_argument("--served-model-name", type=_text("the served model name"), help="the `model` clients pass (default: the model directory's name)")
    p.add_argument("--max-resident", type=_number(int, 1),
                   help="deltas kept on the device at most (the engine's max_resident)")
    p.add_argument("--max-batch", type=_number(int, 1), help="sessions absorbed or decoded in one batch at most")
    p.add_argument("--max-queue", type=_number(int, 1), default=64,
                   help="requests waiting at most; more are answered 429")
    p.add_argument("--timeout", type=_number(float, 0, low_open=True), default=300.0,
                   help="seconds a request may take, queueing included")
    p.add_argument("--max-body-bytes", type=_number(int, 1), default=8 * 2**20, help="largest request body accepted")
    p.add_argument("--idle-save", type=_number(float, 0), default=2.0,
                   help="seconds a changed session waits idle before it is saved")
