"""The worker's decoding hands each request's `recite` to the engine: requests that differ in it
never share a generate_batch call (recite applies to a whole call)."""

import pytest

pytest.importorskip("fastapi")

from absorber_engine.errors import InputError  # noqa: E402
from absorber_engine.serve.decoding import Decoder  # noqa: E402
from absorber_engine.serve.errors import APIError  # noqa: E402
from absorber_engine.serve.jobs import Job, Plan, Sampling  # noqa: E402
from absorber_engine.serve.prompts import Prompt  # noqa: E402


class _Engine:
    def __init__(self):
        self.calls = []

    def generate_batch(self, prompts, max_new_tokens, temperature, top_p, stop, seed, on_token=None, recite=False):
        self.calls.append((sorted(prompts), recite))
        for key in prompts:
            if on_token is not None:
                on_token(key, 7)
        return {key: [7] for key in prompts}


class _Prompts:
    def decode(self, ids):
        return " ".join(map(str, ids))


def _plan(key, recite, sink=None):
    job = Job("generate", prompt=Prompt([1, 2], 2, set()), sink=sink,
              sampling=Sampling(max_tokens=1, temperature=0.0, top_p=1.0, seed=None, stops=[], recite=recite))
    return Plan(job, None, key, [], [1, 2])


class _Sink:
    closed = False

    def __init__(self):
        self.events = []

    def put(self, kind, value):
        self.events.append((kind, value))


def test_recite_splits_batches_and_reaches_the_engine():
    engine = _Engine()
    dec = Decoder(engine, _Prompts(), None)
    plans = [_plan("a", False), _plan("b", True), _plan("c", False), _plan("d", True)]
    dec.together(plans)
    assert sorted(engine.calls) == [(["a", "c"], False), (["b", "d"], True)]
    assert all(p.job.future.result()["text"] == "7" for p in plans)
    engine.calls.clear()
    dec.alone(_plan("e", True))
    sink = _Sink()
    dec.stream(_plan("f", True, sink))
    assert engine.calls == [(["e"], True), (["f"], True)] and ("text", "7") in sink.events


class _Counting:
    """Emits 1, 2, 3, ... per row as the engine does: a row ends when on_token returns False."""

    def __init__(self):
        self.emitted = {}

    def generate_batch(self, prompts, max_new_tokens, temperature, top_p, stop, seed, on_token=None, recite=False):
        out = {}
        for key in prompts:
            out[key] = []
            for t in range(1, max_new_tokens + 1):
                out[key].append(t)
                if on_token is not None and on_token(key, t) is False:
                    break
            self.emitted[key] = len(out[key])
        return out


def _timed_plan(key, max_tokens, stops=(), deadline=float("inf")):
    job = Job("generate", prompt=Prompt([1, 2], 2, set()), deadline=deadline,
              sampling=Sampling(max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=None, stops=list(stops)))
    return Plan(job, None, key, [], [1, 2])


def test_answers_sent_whole_stop_decoding_at_their_length_a_stop_sequence_or_when_nobody_waits():
    engine = _Counting()
    dec = Decoder(engine, _Prompts(), None)
    late, gone = _timed_plan("late", 9, deadline=0.0), _timed_plan("gone", 9)
    gone.job.future.cancel()                     # the request's route gave up (a 504 was sent)
    plans = [_timed_plan("short", 2), _timed_plan("long", 9), _timed_plan("stops", 9, stops=["3 4"]), late, gone]
    dec.together(plans)
    assert engine.emitted == {"short": 2, "long": 9, "stops": 4, "late": 1, "gone": 1}
    assert plans[2].job.future.result()["text"] == "1 2 " and plans[2].job.future.result()["finish_reason"] == "stop"
    assert plans[0].job.future.result()["finish_reason"] == "length"
    dec.alone(_timed_plan("alone", 9, deadline=0.0))
    assert engine.emitted["alone"] == 1


class _OneBadRow(_Counting):
    def generate_batch(self, prompts, *args, **kwargs):
        if "bad" in prompts:
            raise InputError("window (500) + recital = 600 tokens exceeds the model's 512 positions")
        return super().generate_batch(prompts, *args, **kwargs)


def test_one_rows_error_fails_that_request_alone():
    dec = Decoder(_OneBadRow(), _Prompts(), None)
    plans = [_timed_plan("good", 3), _timed_plan("bad", 3), _timed_plan("also good", 3)]
    dec.together(plans)
    assert plans[0].job.future.result()["text"] == plans[2].job.future.result()["text"] == "1 2 3"
    with pytest.raises(APIError, match="positions"):
        plans[1].job.future.result()
