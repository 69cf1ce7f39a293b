"""Stateful property tests: random operation sequences run against the C++ Window and Scheduler
and against a small pure-Python model of the same rules (below); they must agree at every step,
return values, raised exception types and all observable state alike."""

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from absorber_engine._scheduler import Scheduler, Window

MAX_PRIORITY = 1000
VOCAB = 7

# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class ModelWindow:
    def __init__(self, n, m, vocab):
        if n <= 0:
            raise ValueError("chunk_tokens")
        if m < 0:
            raise ValueError("sync_tokens")
        if vocab <= 0 or vocab >= 2**31:
            raise ValueError("vocab_size")
        if n > 2**40 or m > 2**40:
            raise ValueError("too large")
        self.n, self.m, self.vocab = n, m, vocab
        self.tokens, self.absorbed, self.rounds = [], 0, 0
        self.next_id, self.planned_id, self.planned_x = 1, 0, 0

    def check(self, tokens):
        if any(t < 0 or t >= self.vocab for t in tokens):
            raise IndexError("token id")

    def feed(self, tokens):
        self.check(tokens)
        self.tokens += tokens

    def shape(self, flush):
        held = len(self.tokens)
        if flush and 0 < held <= self.n + self.m:
            return held, 0          # draining keeps no raw window: the rest is one round, all X
        if held >= self.n + self.m:
            return self.n, self.m
        return None

    def plan(self, flush):
        shape = self.shape(flush)
        if shape is None:
            return None
        x, y = shape
        rid = self.next_id
        self.next_id += 1
        self.planned_id, self.planned_x = rid, x
        return rid, self.tokens[:x], self.tokens[x:x + y]

    def _take(self, rid):
        if self.planned_id == 0 or rid != self.planned_id:
            raise ValueError("not the planned round")

    def commit(self, rid):
        self._take(rid)
        self.tokens = self.tokens[self.planned_x:]
        self.absorbed += self.planned_x
        self.rounds += 1
        self.planned_id = self.planned_x = 0

    def abort(self, rid):
        self._take(rid)
        self.planned_id = self.planned_x = 0

    def window(self):
        return self.tokens[:self.n + self.m]

    def restore(self, tokens, absorbed, rounds):
        if absorbed < 0 or rounds < 0:
            raise ValueError("absorbed and rounds")
        self.check(tokens)
        self.tokens, self.absorbed, self.rounds = list(tokens), absorbed, rounds
        self.planned_id = self.planned_x = 0


class ModelSession:
    def __init__(self, key, seq, priority, window):
        self.key, self.seq, self.priority, self.window = key, seq, priority, window
        self.waited = self.acquired = 0
        self.draining = False
        self.in_flight = self.window_round = 0


def tkey(key):
    return (type(key).__name__, key)  # 1 and "1" are different sessions


class ModelScheduler:
    def __init__(self, vocab, k, n, m):
        if k <= 0:
            raise ValueError("max_resident")
        ModelWindow(n, m, vocab)
        self.vocab, self.k, self.n, self.m = vocab, k, n, m
        self.sessions = {}  # tkey -> ModelSession
        self.slots = {}  # tkey -> [last_use, pins]: the resident sessions
        self.clock = 0
        self.next_seq = self.next_round = 1
        self.batches = self.planned = self.committed = self.aborted = self.fed = self.absorbed = 0
        self.to_device = self.to_host = 0

    # residency: LRU over unpinned resident sessions
    def ensure(self, key, moves):
        t = tkey(key)
        if t in self.slots:
            self.clock += 1
            self.slots[t][0] = self.clock
            return True
        if len(self.slots) >= self.k:
            free = [(use, v) for v, (use, pins) in self.slots.items() if pins == 0]
            if not free:
                return False
            victim = min(free)[1]
            moves.append((victim[1], "to_host"))
            self.to_host += 1
            del self.slots[victim]
        self.clock += 1
        self.slots[t] = [self.clock, 0]
        moves.append((key, "to_device"))
        self.to_device += 1
        return True

    def find(self, key):
        try:
            return self.sessions[tkey(key)]
        except KeyError:
            raise KeyError("not open") from None

    @staticmethod
    def check_priority(p):
        if p < 0 or p > MAX_PRIORITY:
            raise ValueError("priority")

    def check(self, tokens):
        if any(t < 0 or t >= self.vocab for t in tokens):
            raise IndexError("token id")

    def open(self, key, priority=1, chunk_tokens=None, sync_tokens=None):
        self.check_priority(priority)
        w = ModelWindow(self.n if chunk_tokens is None else chunk_tokens,
                        self.m if sync_tokens is None else sync_tokens, self.vocab)
        if tkey(key) in self.sessions:
            raise ValueError("already open")
        self.sessions[tkey(key)] = ModelSession(key, self.next_seq, priority, w)
        self.next_seq += 1

    def close(self, key):
        s = self.find(key)
        if s.in_flight:
            raise RuntimeError("in flight")
        if s.acquired:
            raise RuntimeError("acquired")
        self.slots.pop(tkey(key), None)
        del self.sessions[tkey(key)]

    def feed(self, key, tokens):
        self.check(tokens)
        self.find(key).window.feed(tokens)
        self.fed += len(tokens)

    def flush(self, key):
        s = self.find(key)
        if s.window.tokens:
            s.draining = True

    def set_priority(self, key, p):
        self.check_priority(p)
        self.find(key).priority = p

    def next_batch(self, max_sessions, flush=False):
        if max_sessions <= 0:
            raise ValueError("max_sessions")
        cands = []
        for s in self.sessions.values():
            shape = None if s.in_flight else s.window.shape(flush or s.draining)
            if shape is not None:
                cands.append((s, shape))
        if not cands:
            return None
        cands.sort(key=lambda c: (-(c[0].priority + c[0].waited), -c[0].waited, c[0].seq))
        cap = min(max_sessions, self.k)
        moves, chosen, shape = [], [], None
        for s, sh in cands:
            if len(chosen) >= cap:
                break
            if chosen and sh != shape:
                continue
            if not self.ensure(s.key, moves):
                continue
            self.slots[tkey(s.key)][1] += 1
            if not chosen:
                shape = sh
            chosen.append(s)
        if not chosen:
            return None
        rounds = []
        for s, _ in cands:
            if s not in chosen:
                s.waited += 1
                continue
            wid, x, y = s.window.plan(flush or s.draining)
            s.in_flight, s.window_round, s.waited = self.next_round, wid, 0
            self.next_round += 1
            rounds.append((s.key, s.in_flight, x, y))
        self.batches += 1
        self.planned += len(chosen)
        return {"rounds": rounds, "moves": moves, "x_len": shape[0], "y_len": shape[1]}

    def _take(self, key, rid):
        s = self.find(key)
        if s.in_flight == 0 or rid != s.in_flight:
            raise ValueError("not in flight")
        return s

    def commit(self, key, rid):
        s = self._take(key, rid)
        before = s.window.absorbed
        s.window.commit(s.window_round)
        self.absorbed += s.window.absorbed - before
        s.in_flight = s.window_round = 0
        self.slots[tkey(key)][1] -= 1
        self.committed += 1
        if s.draining and not s.window.tokens:
            s.draining = False

    def abort(self, key, rid):
        s = self._take(key, rid)
        s.window.abort(s.window_round)
        s.in_flight = s.window_round = 0
        self.slots[tkey(key)][1] -= 1
        self.aborted += 1

    def touch(self, key):
        self.find(key)
        moves = []
        if not self.ensure(key, moves):
            raise RuntimeError("pinned")
        return moves

    def acquire(self, key):
        s = self.find(key)
        moves = self.touch(key)
        self.slots[tkey(key)][1] += 1
        s.acquired += 1
        return moves

    def release(self, key):
        s = self.find(key)
        if s.acquired == 0:
            raise RuntimeError("not acquired")
        self.slots[tkey(key)][1] -= 1
        s.acquired -= 1

    def window(self, key):
        return self.find(key).window.window()

    def restore(self, key, tokens, absorbed, rounds):
        if absorbed < 0 or rounds < 0:
            raise ValueError("absorbed and rounds")
        self.check(tokens)
        s = self.find(key)
        if s.in_flight:
            raise RuntimeError("in flight")
        s.window.restore(tokens, absorbed, rounds)
        s.draining = False

    def clear(self, key):
        self.restore(key, [], 0, 0)

    def session_stats(self, key):
        s = self.find(key)
        w = s.window
        return {"session": s.key, "priority": s.priority, "chunk_tokens": w.n, "sync_tokens": w.m,
                "held": len(w.tokens), "absorbed": w.absorbed, "rounds": w.rounds, "waited": s.waited,
                "acquired": s.acquired, "resident": tkey(key) in self.slots, "draining": s.draining,
                "in_flight": s.in_flight or None}

    def stats(self):
        return {"sessions": len(self.sessions), "resident": len(self.slots), "max_resident": self.k,
                "in_flight": sum(1 for s in self.sessions.values() if s.in_flight),
                "batches": self.batches, "rounds_planned": self.planned,
                "rounds_committed": self.committed, "rounds_aborted": self.aborted,
                "tokens_fed": self.fed, "tokens_absorbed": self.absorbed,
                "tokens_held": sum(len(s.window.tokens) for s in self.sessions.values()),
                "moves_to_device": self.to_device, "moves_to_host": self.to_host}

    def sessions_list(self):
        return [s.key for s in sorted(self.sessions.values(), key=lambda s: s.seq)]


# ----------------------------------------------------------------------------------------------
# Running both side by side
# ----------------------------------------------------------------------------------------------


def outcome(fn):
    """('ok', value) or ('raise', exception type): what a call did."""
    try:
        return ("ok", fn())
    except (ValueError, KeyError, IndexError, RuntimeError, TypeError) as e:
        return ("raise", type(e))


def batch_view(b):
    if b is None:
        return None
    return {"rounds": [(r.session, r.id, r.x, r.y) for r in b.rounds], "moves": b.moves,
            "x_len": b.x_len, "y_len": b.y_len}


def same_key(a, b):
    return type(a) is type(b) and a == b


KEYS = [0, 1, "1", "a", "b", "c"]
tokens = st.lists(st.integers(0, VOCAB - 1), max_size=12) | st.lists(st.integers(-2, VOCAB + 1), max_size=4)
priorities = st.integers(0, 4) | st.sampled_from([-1, MAX_PRIORITY, MAX_PRIORITY + 1])
sizes = st.sampled_from([(None, None)] * 4 + [(1, 0), (2, 1), (3, 1), (0, 1), (2, -1)])


class SchedulerMachine(RuleBasedStateMachine):
    """Most calls name an open session, and most sessions share the default shape, so batches
    of several rounds, evictions, drains and aborts all happen; the rest probe the errors."""

    @initialize(k=st.integers(1, 3), n=st.integers(1, 3), m=st.integers(0, 2),
                opened=st.lists(st.tuples(st.sampled_from(KEYS), st.integers(0, 3)), max_size=5))
    def setup(self, k, n, m, opened):
        self.real = Scheduler(VOCAB, k, n, m)
        self.model = ModelScheduler(VOCAB, k, n, m)
        for key, p in opened:
            self.both("open", key, priority=p)

    def both(self, name, *args, view=lambda v: v, **kw):
        got = outcome(lambda: view(getattr(self.real, name)(*args, **kw)))
        want = outcome(lambda: getattr(self.model, name)(*args, **kw))
        assert got == want, (name, args, kw, got, want)
        return got

    def key(self, data):
        open_keys = [s.key for s in self.model.sessions.values()]
        if open_keys and data.draw(st.integers(0, 9)) < 8:
            return data.draw(st.sampled_from(open_keys))
        return data.draw(st.sampled_from(KEYS))

    @rule(key=st.sampled_from(KEYS), p=priorities, size=sizes)
    def open(self, key, p, size):
        self.both("open", key, priority=p, chunk_tokens=size[0], sync_tokens=size[1])

    @rule(data=st.data())
    def close(self, data):
        self.both("close", self.key(data))

    @rule(data=st.data(), toks=tokens)
    def feed(self, data, toks):
        self.both("feed", self.key(data), toks)

    @rule(data=st.data())
    def flush(self, data):
        self.both("flush", self.key(data))

    @rule(data=st.data(), p=priorities)
    def set_priority(self, data, p):
        self.both("set_priority", self.key(data), p)

    @rule(max_sessions=st.integers(0, 4), flush=st.booleans())
    def next_batch(self, max_sessions, flush):
        self.both("next_batch", max_sessions, flush=flush, view=batch_view)

    # Two weighted rules, so streams fill up and batches are served as the engine would.
    @precondition(lambda self: self.model.sessions)
    @rule(data=st.data(), toks=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=16))
    def feed_open(self, data, toks):
        self.both("feed", data.draw(st.sampled_from([s.key for s in self.model.sessions.values()])), toks)

    @rule(max_sessions=st.integers(1, 4), flush=st.booleans(), aborts=st.lists(st.booleans(), max_size=4))
    def serve(self, max_sessions, flush, aborts):
        got = self.both("next_batch", max_sessions, flush=flush, view=batch_view)
        if got[0] == "ok" and got[1] is not None:
            for i, (key, rid, _, _) in enumerate(got[1]["rounds"]):
                self.both("abort" if i < len(aborts) and aborts[i] else "commit", key, rid)

    def round_id(self, data, key):
        s = self.model.sessions.get(tkey(key))
        choices = [1, 2, 999]
        if s is not None and s.in_flight:
            choices += [s.in_flight] * 4 + [s.in_flight + 1, s.in_flight - 1]
        return data.draw(st.sampled_from(choices))

    @rule(data=st.data())
    def commit(self, data):
        key = self.key(data)
        self.both("commit", key, self.round_id(data, key))

    @rule(data=st.data())
    def abort(self, data):
        key = self.key(data)
        self.both("abort", key, self.round_id(data, key))

    @precondition(lambda self: any(s.in_flight for s in self.model.sessions.values()))
    @rule(data=st.data(), commit=st.integers(0, 3))
    def finish_a_round(self, data, commit):
        s = data.draw(st.sampled_from([s for s in self.model.sessions.values() if s.in_flight]))
        self.both("commit" if commit else "abort", s.key, s.in_flight)

    @rule(data=st.data())
    def touch(self, data):
        self.both("touch", self.key(data))

    @rule(data=st.data())
    def acquire(self, data):
        self.both("acquire", self.key(data))

    @rule(data=st.data())
    def release(self, data):
        self.both("release", self.key(data))

    @rule(data=st.data(), toks=tokens, absorbed=st.integers(-1, 50), rounds=st.integers(-1, 5), clear=st.booleans())
    def restore(self, data, toks, absorbed, rounds, clear):
        if clear:
            self.both("clear", self.key(data))
        else:
            self.both("restore", self.key(data), toks, absorbed, rounds)

    @invariant()
    def agree(self):
        real, model = self.real, self.model
        got, want = real.sessions(), model.sessions_list()
        assert len(got) == len(want) and all(map(same_key, got, want)), (got, want)
        assert real.stats() == model.stats()
        for key in KEYS:
            assert (key in real) == (tkey(key) in model.sessions)
            self.both("session_stats", key)
            self.both("window", key)
        assert real.stats()["resident"] <= real.max_resident


class WindowMachine(RuleBasedStateMachine):
    @initialize(n=st.integers(1, 4), m=st.integers(0, 3))
    def setup(self, n, m):
        self.real, self.model = Window(n, m, VOCAB), ModelWindow(n, m, VOCAB)

    @rule(toks=tokens)
    def feed(self, toks):
        assert outcome(lambda: self.real.feed(toks)) == outcome(lambda: self.model.feed(toks))

    @rule(flush=st.booleans())
    def plan(self, flush):
        def view(r):
            return None if r is None else (r.id, r.x, r.y)
        assert outcome(lambda: view(self.real.plan(flush))) == outcome(lambda: self.model.plan(flush))

    @rule(data=st.data())
    def commit(self, data):
        rid = data.draw(st.sampled_from([self.model.planned_id, self.model.planned_id, self.model.next_id - 2,
                                         self.model.next_id, 0, 1]))
        rid = max(rid, 0)
        assert outcome(lambda: self.real.commit(rid)) == outcome(lambda: self.model.commit(rid))

    @rule(toks=tokens, absorbed=st.integers(-1, 9), rounds=st.integers(-1, 3))
    def restore(self, toks, absorbed, rounds):
        assert (outcome(lambda: self.real.restore(toks, absorbed, rounds))
                == outcome(lambda: self.model.restore(toks, absorbed, rounds)))

    @rule()
    def clear(self):
        self.real.clear()
        self.model.restore([], 0, 0)

    @invariant()
    def agree(self):
        r, m = self.real, self.model
        assert (r.held, r.absorbed, r.rounds, r.window()) == (len(m.tokens), m.absorbed, m.rounds, m.window())


common = settings(max_examples=150, stateful_step_count=80, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow])
TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = common
TestWindow = WindowMachine.TestCase
TestWindow.settings = settings(common, max_examples=100)


def test_model_rejects_what_the_scheduler_rejects_at_construction():
    for args in [(VOCAB, 0, 2, 1), (VOCAB, 1, 0, 1), (VOCAB, 1, 2, -1), (0, 1, 2, 1)]:
        assert outcome(lambda: Scheduler(*args))[0] == "raise"
        assert outcome(lambda: ModelScheduler(*args)) == ("raise", ValueError)
