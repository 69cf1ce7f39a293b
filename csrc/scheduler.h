// Many streams, one device: sessions, the absorption queue, batching and delta residency.
//
// Each session owns a Window (window.h) with its own n (chunk_tokens) and m (sync_tokens).
// next_batch() picks rounds from different sessions that share one (|X|, |Y|) shape, so one
// batched student pass can take them all; each returned round is in flight until the caller
// commits it (the window slides) or aborts it (the tokens stay and are planned again).
//
// Order: a session is eligible when it is open, has no round in flight, and its window has a
// round (full, or partial when flushing). Its score is priority + waited, where waited counts the
// non-empty batches that passed it over while it was eligible and resets when it is served.
// Eligible sessions are walked by (score desc, waited desc, open order); the first one that can be
// made resident is the head and sets the shape; the walk then adds same-shape sessions until the
// batch holds min(max_sessions, max_resident). Fairness bound and residency: SCHEDULER.md.
//
// Thread-safe: every public method takes one mutex (each Window also locks its own).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

#include "residency.h"
#include "session_key.h"
#include "window.h"

namespace absorber {

struct ScheduledRound {
    SessionKey session;
    std::uint64_t id = 0;          // unique across the scheduler; commit/abort name it
    std::vector<std::int64_t> x;   // tokens to absorb
    std::vector<std::int64_t> y;   // real continuation synchronized on
};

struct Batch {
    std::vector<ScheduledRound> rounds;   // from different sessions, all of one shape
    std::vector<Move> moves;              // to perform, in order, before running the batch
    std::int64_t x_len = 0, y_len = 0;
};

struct SessionStats {
    SessionKey session;
    std::int64_t priority = 0, chunk_tokens = 0, sync_tokens = 0;
    std::int64_t held = 0, absorbed = 0, rounds = 0, waited = 0, acquired = 0;
    bool resident = false, draining = false;
    std::uint64_t in_flight = 0;   // round id, 0 when none
};

struct SchedulerStats {
    std::int64_t sessions = 0, resident = 0, max_resident = 0, in_flight = 0, batches = 0;
    std::int64_t rounds_planned = 0, rounds_committed = 0, rounds_aborted = 0;
    std::int64_t tokens_fed = 0, tokens_absorbed = 0, tokens_held = 0;
    std::int64_t moves_to_device = 0, moves_to_host = 0;
};

class Scheduler {
public:
    static constexpr std::int64_t kMaxPriority = 1000;

    // `cuts` apply to every session's window (one tokenizer per scheduler).
    Scheduler(std::int64_t vocab_size, std::int64_t max_resident, std::int64_t chunk_tokens,
              std::int64_t sync_tokens, Cuts cuts = {});

    void open(const SessionKey& key, std::int64_t priority, std::optional<std::int64_t> chunk_tokens,
              std::optional<std::int64_t> sync_tokens);
    void close(const SessionKey& key);
    void feed(const SessionKey& key, const std::vector<std::int64_t>& tokens);
    void flush(const SessionKey& key);
    void end_drain(const SessionKey& key);
    void set_priority(const SessionKey& key, std::int64_t priority);

    bool next_batch(std::int64_t max_sessions, bool flush, Batch* out);
    void commit(const SessionKey& key, std::uint64_t round_id);
    void abort(const SessionKey& key, std::uint64_t round_id);

    std::vector<Move> touch(const SessionKey& key);
    std::vector<Move> acquire(const SessionKey& key);
    void release(const SessionKey& key);

    std::vector<std::int64_t> window(const SessionKey& key, bool all = false) const;
    void restore(const SessionKey& key, const std::vector<std::int64_t>& tokens, std::int64_t absorbed,
                 std::int64_t rounds);
    void clear(const SessionKey& key);

    SessionStats session_stats(const SessionKey& key) const;
    SchedulerStats stats() const;
    std::vector<SessionKey> sessions() const;   // in open order
    bool contains(const SessionKey& key) const;
    std::int64_t size() const;

    std::int64_t vocab_size() const { return vocab_; }
    std::int64_t max_resident() const { return residency_.capacity(); }
    std::int64_t chunk_tokens() const { return n_; }
    std::int64_t sync_tokens() const { return m_; }
    const Cuts& cuts() const { return cuts_; }

private:
    struct Session {
        SessionKey key;
        std::uint64_t seq = 0;
        std::int64_t priority = 0;
        std::unique_ptr<Window> window;
        std::int64_t waited = 0;
        std::int64_t acquired = 0;
        bool draining = false;
        std::uint64_t in_flight = 0;      // the scheduler's round id, 0 when none
        std::uint64_t window_round = 0;   // the Window's id of the same round
    };

    Session& find_locked(const SessionKey& key);
    const Session& find_locked(const SessionKey& key) const;
    Session& take_round_locked(const SessionKey& key, std::uint64_t round_id);
    std::vector<Move> make_resident_locked(Session& s);
    void check_ids(const std::vector<std::int64_t>& tokens) const;

    const std::int64_t vocab_, n_, m_;
    const Cuts cuts_;
    mutable std::mutex mu_;
    std::unordered_map<SessionKey, Session> sessions_;
    Residency residency_;
    std::uint64_t next_seq_ = 1, next_round_ = 1;
    std::int64_t batches_ = 0, planned_ = 0, committed_ = 0, aborted_ = 0, fed_ = 0, absorbed_ = 0;
};

}  // namespace absorber
