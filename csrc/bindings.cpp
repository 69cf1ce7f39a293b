// Python bindings of the chunk scheduler: absorber_engine._scheduler.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "window.h"

namespace py = pybind11;
using absorber::Round;
using absorber::Window;

PYBIND11_MODULE(_scheduler, m) {
    m.doc() = "Chunk scheduler of the Absorber engine: raw-token windows and their cut points (X, Y).";

    py::class_<Round>(m, "Round")
        .def_readonly("id", &Round::id)
        .def_readonly("x", &Round::x)
        .def_readonly("y", &Round::y)
        .def("__repr__", [](const Round& r) {
            return "Round(id=" + std::to_string(r.id) + ", x=" + std::to_string(r.x.size()) +
                   " tokens, y=" + std::to_string(r.y.size()) + " tokens)";
        });

    py::class_<Window>(m, "Window")
        .def(py::init<std::int64_t, std::int64_t, std::int64_t>(), py::arg("chunk_tokens"),
             py::arg("sync_tokens"), py::arg("vocab_size"))
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
        .def("window", &Window::window, "The raw tokens generate() attends to (at most n + m).")
        .def("restore", &Window::restore, py::arg("tokens"), py::arg("absorbed"), py::arg("rounds"))
        .def("clear", &Window::clear)
        .def_property_readonly("held", &Window::held)
        .def_property_readonly("absorbed", &Window::absorbed)
        .def_property_readonly("rounds", &Window::rounds)
        .def_property_readonly("chunk_tokens", &Window::chunk_tokens)
        .def_property_readonly("sync_tokens", &Window::sync_tokens)
        .def_property_readonly("vocab_size", &Window::vocab_size);
}
