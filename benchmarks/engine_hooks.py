"""Reads what the engine does per step without changing it: the losses of every round.

AbsorbReport has only each round's final loss; the benchmarks and the parity test also want every
step's loss. The engine looks its round function up in `absorber_engine.round.ROUNDS` at every
round, so wrapping that entry for the duration of a `with` block records each RoundResult.
"""

from __future__ import annotations

import contextlib

from absorber_engine.round import ROUNDS


@contextlib.contextmanager
def record_round_losses(objective: str = "absorber"):
    """Yields a list that receives, per round run inside the block, the list of its step losses."""
    rounds: list[list[float]] = []
    real = ROUNDS[objective]

    def recording(*args, **kwargs):
        result = real(*args, **kwargs)
        # One RoundResult per round, or a list of them (one per stream) when rounds are batched.
        for r in result if isinstance(result, (list, tuple)) else [result]:
            rounds.append(list(r.losses))
        return result

    ROUNDS[objective] = recording
    try:
        yield rounds
    finally:
        ROUNDS[objective] = real
