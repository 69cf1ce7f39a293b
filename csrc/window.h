// The raw-token window of one stream and where it is cut (Algorithm 2 of Absorber LLM).
//
// Tokens fed to a stream wait in order. The window is the first n + m of them, n = chunk_tokens
// (X, what the next round absorbs) and m = sync_tokens (Y, the real continuation the round
// synchronizes on). A round is planned only when the window is full, or on flush; committing a
// round drops its X from the front, so the window slides by n and never holds more than n + m
// tokens' worth of KV on the Python side.
//
// Cuts (optional): X ends right after the first boundary token (e.g. a paragraph break) that
// leaves X at least min_x tokens long, instead of at n. A round then holds whole documents or
// paragraphs, and with one delta per round each delta holds one of them: several documents with
// the same kinds of facts mixed in one small delta recall far less (docs/recall.md, "A delta per round").
#pragma once

#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <utility>
#include <vector>

namespace absorber {

// A restored stream's counters: what memory files may hold (2^53, JSON's exact integers, 10^15
// tokens). Beyond it the next commit could overflow them.
inline void check_counts(std::int64_t absorbed, std::int64_t rounds) {
    constexpr std::int64_t most = std::int64_t{1} << 53;
    if (absorbed < 0 || rounds < 0 || absorbed > most || rounds > most)
        throw std::invalid_argument("absorbed and rounds must be in [0, 2^53]");
}

struct Round {
    std::uint64_t id = 0;          // matches the commit to the plan it came from
    std::vector<std::int64_t> x;   // tokens to absorb (n, fewer at a cut or on flush)
    std::vector<std::int64_t> y;   // real continuation after X (m, fewer on flush, may be empty)
};

// Where a round's X may end early: after any token in `after`, or after the second token of a
// pair in `pairs` (a break split over two tokens: SmolLM2 reads "\n\n" inside a text as "\n", "\n"),
// once X holds >= min_x tokens.
struct Cuts {
    std::vector<std::int32_t> after;   // sorted, unique token ids
    std::vector<std::int64_t> pairs;   // sorted, unique keys (first << 32 | second); both empty: X is n tokens
    std::int64_t min_x = 1;

    // Sorted and deduplicated; throws std::out_of_range for ids outside [0, vocab) (checked before
    // the int32 narrowing) and std::invalid_argument for min_x < 1.
    static Cuts make(std::vector<std::int64_t> after, std::vector<std::pair<std::int64_t, std::int64_t>> pairs,
                     std::int64_t min_x, std::int64_t vocab);
    bool empty() const { return after.empty() && pairs.empty(); }
    // Whether X may end right after `token`; `prev` is the token before it in X, or -1 at X's start.
    bool is_boundary(std::int32_t prev, std::int32_t token) const;
    static std::int64_t key(std::int64_t first, std::int64_t second) { return (first << 32) | second; }
};

class Window {
public:
    Window(std::int64_t chunk_tokens, std::int64_t sync_tokens, std::int64_t vocab_size, Cuts cuts = {});

    // Throws std::invalid_argument unless the sizes are ones a Window accepts.
    static void check_sizes(std::int64_t chunk_tokens, std::int64_t sync_tokens, std::int64_t vocab_size);

    // Appends tokens; all or nothing: one id outside [0, vocab_size) rejects the whole call.
    void feed(const std::vector<std::int64_t>& tokens);

    // The next round to absorb, or false when there is none yet. With flush, whatever is held
    // is absorbed too: once at most n + m are held, in one round without a real Y (with cuts, in
    // rounds cut at breaks, each with what follows it as Y).
    bool plan(bool flush, Round* out);

    // Drops the X of the planned round `id`; any other id is refused (stale or never planned).
    void commit(std::uint64_t id);

    // C++ only (the Scheduler's abort): forgets the planned round `id` without sliding, so its
    // tokens stay and the next plan() returns them again. Any other id is refused.
    void abort(std::uint64_t id);

    // C++ only: the (|X|, |Y|) plan(flush) would return now, without planning; false if none.
    bool peek(bool flush, std::int64_t* x, std::int64_t* y) const;

    // The first min(held, n + m) tokens: what generate() and logits() attend to; with `all`, every
    // token held (queued ones too: what a memory file keeps).
    std::vector<std::int64_t> window(bool all = false) const;

    // Replaces the whole state, as when a saved memory is loaded.
    void restore(const std::vector<std::int64_t>& tokens, std::int64_t absorbed, std::int64_t rounds);
    void clear();

    std::int64_t held() const;
    std::int64_t absorbed() const;
    std::int64_t rounds() const;
    std::int64_t chunk_tokens() const { return n_; }
    std::int64_t sync_tokens() const { return m_; }
    std::int64_t vocab_size() const { return vocab_; }
    const Cuts& cuts() const { return cuts_; }

private:
    std::int64_t held_locked() const { return static_cast<std::int64_t>(buf_.size() - head_); }
    void check_ids(const std::vector<std::int64_t>& tokens) const;
    bool shape_locked(bool flush, std::int64_t* x, std::int64_t* y) const;
    void compact_locked();

    // The first X length in [min_x, limit) that ends right after a boundary; `otherwise` if none.
    std::int64_t cut_locked(std::int64_t limit, std::int64_t otherwise) const;

    const std::int64_t n_, m_, vocab_;
    const Cuts cuts_;
    std::vector<std::int32_t> buf_;   // int32: a vocabulary never needs more, and it halves the buffer
    std::size_t head_ = 0;            // first live token; compacted lazily so commit is O(1) amortized
    std::int64_t absorbed_ = 0, rounds_ = 0;
    std::uint64_t next_id_ = 1, planned_id_ = 0;
    std::int64_t planned_x_ = 0;
    mutable std::mutex mu_;
};

}  // namespace absorber
