// Python bindings of the chunk scheduler: absorber_engine._scheduler.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "errors.h"
#include "scheduler.h"
#include "window.h"

namespace py = pybind11;
using namespace absorber;

namespace {

// A session is named by a Python int (not bool) that fits in 64 bits, or a str.
SessionKey to_key(py::handle h) {
    PyObject* o = h.ptr();
    if (PyBool_Check(o)) throw py::type_error("session must be a str or an int, not bool");
    if (PyLong_Check(o)) {
        int overflow = 0;
        const long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (overflow) throw py::value_error("session id " + py::repr(h).cast<std::string>() + " does not fit in 64 bits");
        if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
        return static_cast<std::int64_t>(v);
    }
    if (PyUnicode_Check(o)) {
        Py_ssize_t size = 0;
        const char* utf8 = PyUnicode_AsUTF8AndSize(o, &size);   // a lone surrogate: UnicodeEncodeError
        if (!utf8) throw py::error_already_set();
        return std::string(utf8, static_cast<std::size_t>(size));
    }
    throw py::type_error("session must be a str or an int, got " + std::string(Py_TYPE(o)->tp_name));
}

py::object key_to_py(const SessionKey& key) {
    if (const auto* i = std::get_if<std::int64_t>(&key)) return py::int_(*i);
    return py::str(std::get<std::string>(key));
}

py::list moves_to_py(const std::vector<Move>& moves) {
    py::list out;
    for (const Move& mv : moves)
        out.append(py::make_tuple(key_to_py(mv.session), mv.kind == MoveKind::ToDevice ? "to_device" : "to_host"));
    return out;
}

using CutPairs = std::vector<std::pair<std::int64_t, std::int64_t>>;

CutPairs pairs_of(const Cuts& cuts) {
    CutPairs out;
    for (std::int64_t k : cuts.pairs) out.emplace_back(k >> 32, k & 0xffffffff);
    return out;
}

}  // namespace

PYBIND11_MODULE(_scheduler, m) {
    m.doc() = "Chunk scheduler of the Absorber engine: raw-token windows and their cut points (X, Y), "
              "and a multi-session Scheduler (batching, fairness, delta residency). See csrc/SCHEDULER.md.";

    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const UnknownSession& e) {
            PyErr_SetString(PyExc_KeyError, e.what());
        }
    });

    py::class_<Round>(m, "Round")
        .def_readonly("id", &Round::id)
        .def_readonly("x", &Round::x)
        .def_readonly("y", &Round::y)
        .def("__repr__", [](const Round& r) {
            return "Round(id=" + std::to_string(r.id) + ", x=" + std::to_string(r.x.size()) +
                   " tokens, y=" + std::to_string(r.y.size()) + " tokens)";
        });

    py::class_<Window>(m, "Window")
        .def(py::init([](std::int64_t n, std::int64_t m, std::int64_t vocab, std::vector<std::int64_t> cut_after,
                         std::int64_t min_cut, CutPairs cut_pairs) {
                 return std::make_unique<Window>(n, m, vocab,
                                                 Cuts::make(std::move(cut_after), std::move(cut_pairs), min_cut, vocab));
             }),
             py::arg("chunk_tokens"), py::arg("sync_tokens"), py::arg("vocab_size"),
             py::arg("cut_after") = std::vector<std::int64_t>{}, py::arg("min_cut") = 1,
             py::arg("cut_pairs") = CutPairs{},
             "cut_after: token ids after which a round's X may end early, once it holds >= min_cut tokens; "
             "cut_pairs: (first, second) ids after whose second, right after the first, it may end too.")
        .def("feed", &Window::feed, py::arg("tokens"), py::call_guard<py::gil_scoped_release>(),
             "Append token ids; all or nothing (an id outside the vocabulary raises IndexError).")
        .def(
            "plan",
            [](Window& w, bool flush) -> py::object {
                Round r;
                bool ok;
                {
                    py::gil_scoped_release release;
                    ok = w.plan(flush, &r);
                }
                if (!ok) return py::none();
                return py::cast(std::move(r));
            },
            py::arg("flush") = false, "The next round (X, Y) to absorb, or None.")
        .def("commit", &Window::commit, py::arg("round_id"), "Slide the window past the planned round's X.")
        .def("window", &Window::window, py::arg("all") = false,
             "The raw tokens generate() attends to (at most n + m); with all, every token held.")
        .def("restore", &Window::restore, py::arg("tokens"), py::arg("absorbed"), py::arg("rounds"))
        .def("clear", &Window::clear)
        .def_property_readonly("held", &Window::held)
        .def_property_readonly("absorbed", &Window::absorbed)
        .def_property_readonly("rounds", &Window::rounds)
        .def_property_readonly("chunk_tokens", &Window::chunk_tokens)
        .def_property_readonly("sync_tokens", &Window::sync_tokens)
        .def_property_readonly("vocab_size", &Window::vocab_size)
        .def_property_readonly("cut_after", [](const Window& w) { return w.cuts().after; })
        .def_property_readonly("cut_pairs", [](const Window& w) { return pairs_of(w.cuts()); })
        .def_property_readonly("min_cut", [](const Window& w) { return w.cuts().min_x; });

    py::class_<ScheduledRound>(m, "BatchRound", "One session's round in a Batch.")
        .def_property_readonly("session", [](const ScheduledRound& r) { return key_to_py(r.session); })
        .def_readonly("id", &ScheduledRound::id)
        .def_readonly("x", &ScheduledRound::x)
        .def_readonly("y", &ScheduledRound::y)
        .def("__repr__", [](const ScheduledRound& r) {
            return "BatchRound(session=" + describe(r.session) + ", id=" + std::to_string(r.id) +
                   ", x=" + std::to_string(r.x.size()) + " tokens, y=" + std::to_string(r.y.size()) + " tokens)";
        });

    py::class_<Batch>(m, "Batch", "Rounds of different sessions sharing one (x_len, y_len) shape.")
        .def_readonly("rounds", &Batch::rounds)
        .def_property_readonly("moves", [](const Batch& b) { return moves_to_py(b.moves); })
        .def_property_readonly("sessions", [](const Batch& b) {
            py::list out;
            for (const auto& r : b.rounds) out.append(key_to_py(r.session));
            return out;
        })
        .def_readonly("x_len", &Batch::x_len)
        .def_readonly("y_len", &Batch::y_len)
        .def("__len__", [](const Batch& b) { return b.rounds.size(); })
        .def("__repr__", [](const Batch& b) {
            return "Batch(" + std::to_string(b.rounds.size()) + " rounds, x_len=" + std::to_string(b.x_len) +
                   ", y_len=" + std::to_string(b.y_len) + ", " + std::to_string(b.moves.size()) + " moves)";
        });

    py::class_<Scheduler>(m, "Scheduler")
        .def(py::init([](std::int64_t vocab, std::int64_t max_resident, std::int64_t n, std::int64_t m,
                         std::vector<std::int64_t> cut_after, std::int64_t min_cut, CutPairs cut_pairs) {
                 return std::make_unique<Scheduler>(vocab, max_resident, n, m,
                                                    Cuts::make(std::move(cut_after), std::move(cut_pairs), min_cut, vocab));
             }),
             py::arg("vocab_size"), py::arg("max_resident"), py::arg("chunk_tokens") = 1024,
             py::arg("sync_tokens") = 2048, py::arg("cut_after") = std::vector<std::int64_t>{},
             py::arg("min_cut") = 1, py::arg("cut_pairs") = CutPairs{})
        .def(
            "open",
            [](Scheduler& s, py::handle session, std::int64_t priority, std::optional<std::int64_t> n,
               std::optional<std::int64_t> mm) {
                const SessionKey key = to_key(session);
                py::gil_scoped_release release;
                s.open(key, priority, n, mm);
            },
            py::arg("session"), py::arg("priority") = 1, py::arg("chunk_tokens") = py::none(),
            py::arg("sync_tokens") = py::none(), "Open a stream; sizes default to the scheduler's.")
        .def(
            "close",
            [](Scheduler& s, py::handle session) {
                const SessionKey key = to_key(session);
                py::gil_scoped_release release;
                s.close(key);
            },
            py::arg("session"))
        .def(
            "feed",
            [](Scheduler& s, py::handle session, const std::vector<std::int64_t>& tokens) {
                const SessionKey key = to_key(session);
                py::gil_scoped_release release;
                s.feed(key, tokens);
            },
            py::arg("session"), py::arg("tokens"), "Append token ids; all or nothing.")
        .def(
            "flush",
            [](Scheduler& s, py::handle session) {
                const SessionKey key = to_key(session);
                py::gil_scoped_release release;
                s.flush(key);
            },
            py::arg("session"), "Absorb everything the session holds, partial rounds included, until it holds none.")
        .def(
            "end_drain",
            [](Scheduler& s, py::handle session) {
                const SessionKey key = to_key(session);
                py::gil_scoped_release release;
                s.end_drain(key);
            },
            py::arg("session"), "Stop draining (no round in flight): what the session holds waits for full rounds again.")
        .def(
            "set_priority",
            [](Scheduler& s, py::handle session, std::int64_t priority) {
                const SessionKey key = to_key(session);
                py::gil_scoped_release release;
                s.set_priority(key, priority);
            },
            py::arg("session"), py::arg("priority"))
        .def(
            "next_batch",
            [](Scheduler& s, std::int64_t max_sessions, bool flush) -> py::object {
                Batch b;
                bool ok;
                {
                    py::gil_scoped_release release;
                    ok = s.next_batch(max_sessions, flush, &b);
                }
                if (!ok) return py::none();
                return py::cast(std::move(b));
            },
            py::arg("max_sessions"), py::arg("flush") = false,
            "The next batch of same-shape rounds from different sessions, or None.")
        .def(
            "commit",
            [](Scheduler& s, py::handle session, std::uint64_t round_id) {
                const SessionKey key = to_key(session);
                py::gil_scoped_release release;
                s.commit(key, round_id);
            },
            py::arg("session"), py::arg("round_id"), "The round was absorbed: slide the session's window.")
        .def(
            "abort",
            [](Scheduler& s, py::handle session, std::uint64_t round_id) {
                const SessionKey key = to_key(session);
                py::gil_scoped_release release;
                s.abort(key, round_id);
            },
            py::arg("session"), py::arg("round_id"), "The round was not absorbed: its tokens stay, to be planned again.")
        .def(
            "touch",
            [](Scheduler& s, py::handle session) {
                const SessionKey key = to_key(session);
                std::vector<Move> moves;
                {
                    py::gil_scoped_release release;
                    moves = s.touch(key);
                }
                return moves_to_py(moves);
            },
            py::arg("session"), "Make the session's delta resident; returns the moves to perform.")
        .def(
            "acquire",
            [](Scheduler& s, py::handle session) {
                const SessionKey key = to_key(session);
                std::vector<Move> moves;
                {
                    py::gil_scoped_release release;
                    moves = s.acquire(key);
                }
                return moves_to_py(moves);
            },
            py::arg("session"), "touch() and pin until release(): e.g. around generate().")
        .def(
            "release",
            [](Scheduler& s, py::handle session) {
                const SessionKey key = to_key(session);
                py::gil_scoped_release release;
                s.release(key);
            },
            py::arg("session"))
        .def(
            "window",
            [](const Scheduler& s, py::handle session, bool all) {
                const SessionKey key = to_key(session);
                py::gil_scoped_release release;
                return s.window(key, all);
            },
            py::arg("session"), py::arg("all") = false,
            "The session's raw tokens generate() attends to (at most n + m); with all, every token it holds.")
        .def(
            "restore",
            [](Scheduler& s, py::handle session, const std::vector<std::int64_t>& tokens, std::int64_t absorbed,
               std::int64_t rounds) {
                const SessionKey key = to_key(session);
                py::gil_scoped_release release;
                s.restore(key, tokens, absorbed, rounds);
            },
            py::arg("session"), py::arg("tokens"), py::arg("absorbed"), py::arg("rounds"))
        .def(
            "clear",
            [](Scheduler& s, py::handle session) {
                const SessionKey key = to_key(session);
                py::gil_scoped_release release;
                s.clear(key);
            },
            py::arg("session"))
        .def(
            "session_stats",
            [](const Scheduler& s, py::handle session) {
                const SessionKey key = to_key(session);
                SessionStats st;
                {
                    py::gil_scoped_release release;
                    st = s.session_stats(key);
                }
                py::dict d;
                d["session"] = key_to_py(st.session);
                d["priority"] = st.priority;
                d["chunk_tokens"] = st.chunk_tokens;
                d["sync_tokens"] = st.sync_tokens;
                d["held"] = st.held;
                d["absorbed"] = st.absorbed;
                d["rounds"] = st.rounds;
                d["waited"] = st.waited;
                d["acquired"] = st.acquired;
                d["resident"] = st.resident;
                d["draining"] = st.draining;
                d["in_flight"] = st.in_flight ? py::object(py::int_(st.in_flight)) : py::object(py::none());
                return d;
            },
            py::arg("session"))
        .def("stats",
             [](const Scheduler& s) {
                 SchedulerStats st;
                 {
                     py::gil_scoped_release release;
                     st = s.stats();
                 }
                 py::dict d;
                 d["sessions"] = st.sessions;
                 d["resident"] = st.resident;
                 d["max_resident"] = st.max_resident;
                 d["in_flight"] = st.in_flight;
                 d["batches"] = st.batches;
                 d["rounds_planned"] = st.rounds_planned;
                 d["rounds_committed"] = st.rounds_committed;
                 d["rounds_aborted"] = st.rounds_aborted;
                 d["tokens_fed"] = st.tokens_fed;
                 d["tokens_absorbed"] = st.tokens_absorbed;
                 d["tokens_held"] = st.tokens_held;
                 d["moves_to_device"] = st.moves_to_device;
                 d["moves_to_host"] = st.moves_to_host;
                 return d;
             })
        .def("sessions",
             [](const Scheduler& s) {
                 std::vector<SessionKey> keys;
                 {
                     py::gil_scoped_release release;
                     keys = s.sessions();
                 }
                 py::list out;
                 for (const auto& k : keys) out.append(key_to_py(k));
                 return out;
             })
        .def("__len__", [](const Scheduler& s) { return s.size(); })
        .def("__contains__",
             [](const Scheduler& s, py::handle session) {
                 PyObject* o = session.ptr();
                 if (PyBool_Check(o) || !(PyLong_Check(o) || PyUnicode_Check(o))) return false;
                 try {
                     return s.contains(to_key(session));
                 } catch (const py::value_error&) {   // an int beyond 64 bits names no session
                     return false;
                 } catch (const py::error_already_set&) {   // nor does a str that is not valid UTF-8
                     return false;
                 }
             })
        .def_property_readonly("vocab_size", &Scheduler::vocab_size)
        .def_property_readonly("max_resident", &Scheduler::max_resident)
        .def_property_readonly("chunk_tokens", &Scheduler::chunk_tokens)
        .def_property_readonly("sync_tokens", &Scheduler::sync_tokens)
        .def_property_readonly("cut_after", [](const Scheduler& s) { return s.cuts().after; })
        .def_property_readonly("cut_pairs", [](const Scheduler& s) { return pairs_of(s.cuts()); })
        .def_property_readonly("min_cut", [](const Scheduler& s) { return s.cuts().min_x; })
        .def_property_readonly_static("MAX_PRIORITY", [](py::object) { return Scheduler::kMaxPriority; });
}
