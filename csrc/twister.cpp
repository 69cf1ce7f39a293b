// The sampler's Exp(1) draw (absorber_engine.sampling), as torch's CPU exponential_ makes it:
// negative_uniform53 runs the Mersenne Twister (MT19937) from a generator's state, as torch's CPU
// generator does, and pairs its words into the doubles torch starts from (the low 53 bits of two
// consecutive words, the first high, times 2^-53), negated for the caller's vectorized log1p;
// exponential_from negates that log1p and rounds it to float32 as torch's scalar loop would. The
// words are most of the draw's time: this loop makes them about four times as fast as numpy's
// random_raw plus its whole-array shifts (256,000 words: 0.19 against 0.81 ms).
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>

namespace py = pybind11;

namespace {

constexpr int N = 624, M = 397;
constexpr std::uint32_t MATRIX_A = 0x9908b0dfu, UPPER = 0x80000000u, LOWER = 0x7fffffffu;

inline std::uint32_t mix(std::uint32_t a, std::uint32_t b, std::uint32_t far) {
    const std::uint32_t y = (a & UPPER) | (b & LOWER);
    return far ^ (y >> 1) ^ ((y & 1u) ? MATRIX_A : 0u);
}

void twist(std::uint32_t* mt) {
    int i = 0;
    for (; i < N - M; ++i) mt[i] = mix(mt[i], mt[i + 1], mt[i + M]);
    for (; i < N - 1; ++i) mt[i] = mix(mt[i], mt[i + 1], mt[i + M - N]);
    mt[N - 1] = mix(mt[N - 1], mt[0], mt[M - 1]);
}

inline std::uint32_t temper(std::uint32_t y) {
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    return y ^ (y >> 18);
}

// key: the 624 state words (uint32, updated in place); pos: the next word's index, 624 meaning
// "twist first" (numpy's convention); out: float64 buffer, one value per pair of words.
// Returns the position after the last word used. The words are tempered a run at a time into a
// buffer (a loop the compiler vectorizes), then paired: no per-word branch on the position.
int negative_uniform53(py::buffer key, int pos, py::buffer out) {
    py::buffer_info k = key.request(true), o = out.request(true);
    if (k.format != py::format_descriptor<std::uint32_t>::format() || k.size != N || k.ndim != 1 || k.strides[0] != 4)
        throw std::invalid_argument("key must be 624 contiguous uint32 words");
    if (o.format != py::format_descriptor<double>::format() || o.ndim != 1 || o.strides[0] != 8)
        throw std::invalid_argument("out must be a contiguous float64 vector");
    if (pos < 0 || pos > N) throw std::invalid_argument("pos must be in [0, 624]");
    auto* mt = static_cast<std::uint32_t*>(k.ptr);
    auto* u = static_cast<double*>(o.ptr);
    constexpr std::uint64_t low53 = (std::uint64_t{1} << 53) - 1;
    std::uint32_t words[N + 1];                  // one run of tempered words, plus a carried odd one
    int held = 0;                                // words in the buffer not yet paired
    py::ssize_t done = 0;
    while (done < o.size) {
        if (pos == N) { twist(mt); pos = 0; }
        const py::ssize_t want = 2 * (o.size - done) - held;
        const int run = static_cast<int>(want < N - pos ? want : N - pos);
        for (int j = 0; j < run; ++j) words[held + j] = temper(mt[pos + j]);
        pos += run;
        const int ready = held + run, pairs = ready / 2;
        for (int j = 0; j < pairs; ++j) {
            const std::uint64_t bits = ((std::uint64_t{words[2 * j]} << 32) | words[2 * j + 1]) & low53;
            u[done + j] = -static_cast<double>(bits) * 0x1p-53;
        }
        done += pairs;
        held = ready - 2 * pairs;
        if (held) words[0] = words[ready - 1];   // a pair split by a twist: its first word waits
    }
    return pos;
}

// q[i] = float(-r[i]), r = log1p(u) from torch's vectorized kernel, except where that can round to
// another float than exponential_'s C-library log1p, which differs from it by an ulp on about one
// double in twelve: a double whose bits below float32's 24 lie within 8 of the midpoint (2^28) of
// two floats (1 value in 1.8e9 drawn came out different) is taken from std::log1p(u[i]) instead.
void exponential_from(py::buffer u_in, py::buffer r_in, py::buffer q_out) {
    py::buffer_info u = u_in.request(), r = r_in.request(), q = q_out.request(true);
    const auto f64 = py::format_descriptor<double>::format();
    if (u.format != f64 || r.format != f64 || q.format != py::format_descriptor<float>::format() ||
        u.ndim != 1 || r.ndim != 1 || q.ndim != 1 || u.strides[0] != 8 || r.strides[0] != 8 || q.strides[0] != 4 ||
        r.size != u.size || q.size != u.size)
        throw std::invalid_argument("u and r must be contiguous float64 vectors, q a float32 one, all of one length");
    const auto* uu = static_cast<const double*>(u.ptr);
    const auto* rr = static_cast<const double*>(r.ptr);
    auto* qq = static_cast<float*>(q.ptr);
    constexpr std::uint64_t low29 = (std::uint64_t{1} << 29) - 1, from = (std::uint64_t{1} << 28) - 8;
    for (py::ssize_t i = 0; i < u.size; ++i) {
        std::uint64_t bits;
        std::memcpy(&bits, rr + i, sizeof bits);
        const double v = ((bits - from) & low29) <= 16 ? std::log1p(uu[i]) : rr[i];
        qq[i] = static_cast<float>(-v);
    }
}

}  // namespace

PYBIND11_MODULE(_twister, m) {
    m.doc() = "MT19937 words as torch's CPU generator draws them, for the vectorized sampler";
    m.def("negative_uniform53", &negative_uniform53, py::arg("key"), py::arg("pos"), py::arg("out"),
          "Fills out with -(53 bits of two words) * 2^-53 from the state `key` at `pos`; returns the new pos.");
    m.def("exponential_from", &exponential_from, py::arg("u"), py::arg("r"), py::arg("q"),
          "Fills q (float32) with -r, r = log1p(u), as exponential_ rounds it: the C library's log1p where it matters.");
}
