// The sampler's draw (absorber_engine.sampling), as torch.multinomial(probs, 1) makes it on a CPU:
// argmax(p / q), q ~ Exp(1) from exponential_. Words runs the Mersenne Twister (MT19937) from a
// generator's state, as torch's CPU generator does, and pairs its words into the doubles u torch
// starts from (the low 53 bits of two consecutive words, the first high, times 2^-53); this loop
// makes them about four times as fast as numpy's random_raw plus its whole-array shifts (256,000
// words: 0.19 against 0.81 ms). q = -log1p(-u) in float32, as exponential_'s scalar loop rounds it,
// is taken only where it can decide the argmax (multinomial_from).
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

// Function clones for wider vector units, picked at load time (GCC and Clang on x86-64 Linux).
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define ABSORBER_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ABSORBER_VECTOR_CLONES
#endif

namespace {

constexpr int N = 624, M = 397;
constexpr std::uint32_t MATRIX_A = 0x9908b0dfu, UPPER = 0x80000000u, LOWER = 0x7fffffffu;

inline std::uint32_t mix(std::uint32_t a, std::uint32_t b, std::uint32_t far) {
    const std::uint32_t y = (a & UPPER) | (b & LOWER);
    return far ^ (y >> 1) ^ ((y & 1u) ? MATRIX_A : 0u);
}

// Each loop reads words at least M - 1 = 396 or N - M = 227 places ahead or behind of the one it
// writes, and only ones not yet rewritten or rewritten already: vectors of any width keep that order.
// The clones are chosen once by the CPU (AVX-512, AVX2, or the build's baseline).
ABSORBER_VECTOR_CLONES
void twist(std::uint32_t* mt) {
#pragma GCC ivdep
    for (int i = 0; i < N - M; ++i) mt[i] = mix(mt[i], mt[i + 1], mt[i + M]);
#pragma GCC ivdep
    for (int i = N - M; i < N - 1; ++i) mt[i] = mix(mt[i], mt[i + 1], mt[i + M - N]);
    mt[N - 1] = mix(mt[N - 1], mt[0], mt[M - 1]);
}

inline std::uint32_t temper(std::uint32_t y) {
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    return y ^ (y >> 18);
}

// The words of a generator's state, drawn in order: key the 624 state words (updated in place),
// pos the next word's index, 624 meaning "twist first" (numpy's convention).
class Words {
  public:
    Words(std::uint32_t* mt, int pos) : mt_(mt), pos_(pos) {}
    int pos() const { return pos_; }

    // Fills u with n doubles, each the low 53 bits of two consecutive words (the first high) times
    // 2^-53, times `sign`. The words are tempered a run at a time into a buffer (a loop the compiler
    // vectorizes), then paired: no per-word branch on the position.
    ABSORBER_VECTOR_CLONES
    void uniform53(double* u, py::ssize_t n, double sign) {
        const double scale = sign * 0x1p-53;
        int held = 0;                                // words in the buffer not yet paired
        py::ssize_t done = 0;
        while (done < n) {
            if (pos_ == N) { twist(mt_); pos_ = 0; }
            const py::ssize_t want = 2 * (n - done) - held;
            const int run = static_cast<int>(want < N - pos_ ? want : N - pos_);
            for (int j = 0; j < run; ++j) words_[held + j] = temper(mt_[pos_ + j]);
            pos_ += run;
            const int ready = held + run, pairs = ready / 2;
            for (int j = 0; j < pairs; ++j) {
                // The 53 bits as hi * 2^32 + lo: two exact doubles from 32-bit conversions, which
                // vector units have (64-bit ones only AVX-512's), and a sum below 2^53, exact too.
                const double hi = static_cast<double>(static_cast<std::int32_t>(words_[2 * j] & 0x1fffffu));
                const double lo = static_cast<double>(static_cast<std::int32_t>(words_[2 * j + 1] ^ 0x80000000u)) + 0x1p31;
                u[done + j] = (hi * 0x1p32 + lo) * scale;
            }
            done += pairs;
            held = ready - 2 * pairs;
            if (held) words_[0] = words_[ready - 1];   // a pair split by a twist: its first word waits
        }
    }

  private:
    std::uint32_t* mt_;
    int pos_;
    std::uint32_t words_[N + 1];                  // one run of tempered words, plus a carried odd one
};

std::uint32_t* state_words(py::buffer_info& k, int pos) {
    if (k.format != py::format_descriptor<std::uint32_t>::format() || k.size != N || k.ndim != 1 || k.strides[0] != 4)
        throw std::invalid_argument("key must be 624 contiguous uint32 words");
    if (pos < 0 || pos > N) throw std::invalid_argument("pos must be in [0, 624]");
    return static_cast<std::uint32_t*>(k.ptr);
}

// p / q in float32 for q = exponential_'s float(-log1p(-u)): what torch.multinomial's argmax reads.
inline float ratio(float p, double u) { return p / static_cast<float>(-std::log1p(-u)); }

// One row's argmax of p / q in one pass, the best exact ratio so far as the floor: a token whose
// bound, with room to spare, is below it is skipped (a branch the CPU predicts: nearly every token
// is skipped; blocks of 64 tested at once as vectors were slower). u = 0 (q = 0) is never skipped:
// floor * u is 0, or NaN under the floor of +inf that a NaN ratio (0 / 0, which wins over all after
// it) leaves.
std::int64_t argmax_row(const float* p, const double* u, py::ssize_t V) {
    py::ssize_t arg = -1;
    float best = 0.0f;
    double floor = -1.0;
    for (py::ssize_t i = 0; i < V; ++i) {
        if (static_cast<double>(p[i]) * (1.0 + 0x1p-20) < floor * u[i]) continue;
        const float v = ratio(p[i], u[i]);
        if (arg < 0 || (!std::isnan(best) && (std::isnan(v) || v > best))) {
            arg = i;
            best = v;
            floor = std::isnan(v) ? INFINITY : v;
        }
    }
    return arg;
}

// torch.multinomial(probs, 1) for float32 probs (rows, V), C-contiguous: argmax over each row of
// p / q, q ~ Exp(1) drawn as exponential_ draws it (a double u of two words, q = -log1p(-u) in
// float32), in row-major order; ids gets one index per row; returns the position after the words used.
//
// Why not every q: the logarithm is most of a draw's time, and only the largest p / q matters.
// -log1p(-u) >= u, so p / u bounds p / q from above (in float32: within 2^-22 of it, after the
// log's ulp and two roundings); a token whose bound, with room to spare, stays below the exact
// ratio found so far cannot be the argmax, nor tie with it (ties go to the first index, NaN beats
// everything, as in torch's argmax). A few dozen tokens a row take the log.
int multinomial_from(py::buffer key, int pos, py::buffer probs_in, py::buffer ids_out) {
    py::buffer_info k = key.request(true), p = probs_in.request(), o = ids_out.request(true);
    std::uint32_t* mt = state_words(k, pos);
    if (p.format != py::format_descriptor<float>::format() || p.ndim != 2 || p.strides[1] != 4 ||
        p.strides[0] != 4 * p.shape[1] || p.shape[1] < 1)
        throw std::invalid_argument("probs must be a C-contiguous float32 matrix with at least one column");
    // numpy's int64 is "l" on LP64 systems, "q" elsewhere: both are 8-byte signed integers.
    if ((o.format != "l" && o.format != "q") || o.itemsize != 8 || o.ndim != 1 || o.strides[0] != 8 ||
        o.size != p.shape[0])
        throw std::invalid_argument("ids must be a contiguous int64 vector of one id per row");
    const py::ssize_t rows = p.shape[0], V = p.shape[1];
    const auto* probs = static_cast<const float*>(p.ptr);
    auto* ids = static_cast<std::int64_t*>(o.ptr);
    if (rows == 0) return pos;
    // torch.multinomial's refusals, checked before any word is drawn: a row of zeros gave id 0 and
    // one of negative values id -1 (about 0.1 ms a row of 49,152 beside a decode step's tens).
    for (py::ssize_t r = 0; r < rows; ++r) {
        bool bad = false, positive = false;         // no branch in the loop: it vectorizes
        for (py::ssize_t i = 0; i < V; ++i) {
            const float v = probs[r * V + i];
            bad |= !(v >= 0.0f) | (v == INFINITY);
            positive |= v > 0.0f;
        }
        if (bad) throw std::invalid_argument("probs row " + std::to_string(r) + " holds a negative, inf or NaN value");
        if (!positive) throw std::invalid_argument("probs row " + std::to_string(r) + " has no positive value");
    }
    std::vector<double> u(static_cast<std::size_t>(V));
    Words words(mt, pos);
    for (py::ssize_t r = 0; r < rows; ++r) {
        const float* pr = probs + r * V;
        words.uniform53(u.data(), V, 1.0);
        ids[r] = argmax_row(pr, u.data(), V);
    }
    return words.pos();
}

}  // namespace

PYBIND11_MODULE(_twister, m) {
    m.doc() = "torch.multinomial's one-sample draw from a CPU generator's Mersenne Twister, for the sampler";
    m.def("multinomial_from", &multinomial_from, py::arg("key"), py::arg("pos"), py::arg("probs"), py::arg("ids"),
          "torch.multinomial(probs, 1) drawn from the state `key` at `pos` into ids; returns the new pos.");
}
