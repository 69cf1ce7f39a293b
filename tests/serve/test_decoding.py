"""The worker's decoding hands each request's `recite` to the engine: requests that differ in it
never share a generate_batch call (recite applies to a whole call)."""

import pytest

pytest.importorskip("fastapi")

from absorber_engine.serve.decoding import Decoder  # noqa: E402
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
