"""The options of `absorber serve` (kept apart so the CLI builds its parser without importing the server)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--state-dir", help="sessions are saved here as memory files and loaded at start "
                                       "(default: kept in memory only)")
    p.add_argument("--served-model-name", help="the `model` clients pass (default: the model directory's name)")
    p.add_argument("--max-resident", type=int, help="deltas kept on the device at most (the engine's max_resident)")
    p.add_argument("--max-batch", type=int, help="sessions absorbed or decoded in one batch at most")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more are answered 429")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take, queueing included")
    p.add_argument("--max-body-bytes", type=int, default=8 * 2**20, help="largest request body accepted")
    p.add_argument("--idle-save", type=float, default=2.0, help="seconds a changed session waits idle before it is saved")
