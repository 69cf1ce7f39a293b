#include "scheduler.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "errors.h"

namespace absorber {
namespace {

void check_priority(std::int64_t p) {
    if (p < 0 || p > Scheduler::kMaxPriority)
        throw std::invalid_argument("priority must be in [0, " + std::to_string(Scheduler::kMaxPriority) +
                                    "], got " + std::to_string(p));
}

}  // namespace

Scheduler::Scheduler(std::int64_t vocab_size, std::int64_t max_resident, std::int64_t chunk_tokens,
                     std::int64_t sync_tokens, Cuts cuts)
    : vocab_(vocab_size), n_(chunk_tokens), m_(sync_tokens), cuts_(std::move(cuts)), residency_(max_resident) {
    Window(n_, m_, vocab_, cuts_);   // the same checks a session's window will make, once, up front
}

Scheduler::Session& Scheduler::find_locked(const SessionKey& key) {
    auto it = sessions_.find(key);
    if (it == sessions_.end()) throw UnknownSession("session " + describe(key) + " is not open (never opened, or closed)");
    return it->second;
}

const Scheduler::Session& Scheduler::find_locked(const SessionKey& key) const {
    return const_cast<Scheduler*>(this)->find_locked(key);
}

void Scheduler::check_ids(const std::vector<std::int64_t>& tokens) const {
    for (std::size_t i = 0; i < tokens.size(); ++i)
        if (tokens[i] < 0 || tokens[i] >= vocab_)
            throw std::out_of_range("token id " + std::to_string(tokens[i]) + " at position " + std::to_string(i) +
                                    " is outside the vocabulary [0, " + std::to_string(vocab_) + ")");
}

void Scheduler::open(const SessionKey& key, std::int64_t priority, std::optional<std::int64_t> chunk_tokens,
                     std::optional<std::int64_t> sync_tokens) {
    check_priority(priority);
    auto window = std::make_unique<Window>(chunk_tokens.value_or(n_), sync_tokens.value_or(m_), vocab_, cuts_);
    std::lock_guard<std::mutex> lock(mu_);
    if (sessions_.count(key)) throw std::invalid_argument("session " + describe(key) + " is already open");
    Session s;
    s.key = key;
    s.seq = next_seq_++;
    s.priority = priority;
    s.window = std::move(window);
    sessions_.emplace(key, std::move(s));
}

void Scheduler::close(const SessionKey& key) {
    std::lock_guard<std::mutex> lock(mu_);
    Session& s = find_locked(key);
    if (s.in_flight)
        throw StateError("session " + describe(key) + " has round " + std::to_string(s.in_flight) +
                         " in flight: commit or abort it before closing");
    if (s.acquired)
        throw StateError("session " + describe(key) + " is acquired: release it before closing");
    residency_.forget(key);
    sessions_.erase(key);
}

void Scheduler::feed(const SessionKey& key, const std::vector<std::int64_t>& tokens) {
    check_ids(tokens);   // before the lock and before any change: all or nothing
    std::lock_guard<std::mutex> lock(mu_);
    find_locked(key).window->feed(tokens);
    fed_ += static_cast<std::int64_t>(tokens.size());
}

void Scheduler::flush(const SessionKey& key) {
    std::lock_guard<std::mutex> lock(mu_);
    Session& s = find_locked(key);
    if (s.window->held() > 0) s.draining = true;
}

// A flush whose round failed stops draining, the window as it is: one step under the lock, so a
// feed from another thread is never lost (as it was between reading the window and restoring it).
void Scheduler::end_drain(const SessionKey& key) {
    std::lock_guard<std::mutex> lock(mu_);
    Session& s = find_locked(key);
    if (!s.in_flight) s.draining = false;
}

void Scheduler::set_priority(const SessionKey& key, std::int64_t priority) {
    check_priority(priority);
    std::lock_guard<std::mutex> lock(mu_);
    find_locked(key).priority = priority;
}

bool Scheduler::next_batch(std::int64_t max_sessions, bool flush, Batch* out) {
    if (max_sessions <= 0) throw std::invalid_argument("max_sessions must be positive, got " + std::to_string(max_sessions));
    std::lock_guard<std::mutex> lock(mu_);

    struct Candidate {
        Session* s;
        std::int64_t x, y, score;
        bool chosen;
    };
    std::vector<Candidate> cands;
    for (auto& kv : sessions_) {
        Session& s = kv.second;
        std::int64_t x = 0, y = 0;
        if (s.in_flight || !s.window->peek(flush || s.draining, &x, &y)) continue;
        cands.push_back({&s, x, y, s.priority + s.waited, false});
    }
    if (cands.empty()) return false;
    std::sort(cands.begin(), cands.end(), [](const Candidate& a, const Candidate& b) {
        if (a.score != b.score) return a.score > b.score;
        if (a.s->waited != b.s->waited) return a.s->waited > b.s->waited;
        return a.s->seq < b.s->seq;
    });

    const std::int64_t cap = std::min(max_sessions, residency_.capacity());
    std::vector<Move> moves;
    std::int64_t taken = 0;
    for (Candidate& c : cands) {
        if (taken >= cap) break;
        if (taken > 0 && (c.x != out->x_len || c.y != out->y_len)) continue;
        if (!residency_.ensure(c.s->key, &moves)) continue;   // every slot pinned: cannot run now
        residency_.pin(c.s->key);
        if (taken == 0) {
            out->x_len = c.x;
            out->y_len = c.y;
        }
        c.chosen = true;
        ++taken;
    }
    if (taken == 0) return false;

    for (Candidate& c : cands) {
        Session& s = *c.s;
        if (!c.chosen) {
            ++s.waited;
            continue;
        }
        Round r;
        s.window->plan(flush || s.draining, &r);
        s.in_flight = next_round_++;
        s.window_round = r.id;
        s.waited = 0;
        out->rounds.push_back({s.key, s.in_flight, std::move(r.x), std::move(r.y)});
    }
    // Rounds in walk order (head first), as the selection made them.
    out->moves = std::move(moves);
    ++batches_;
    planned_ += taken;
    return true;
}

Scheduler::Session& Scheduler::take_round_locked(const SessionKey& key, std::uint64_t round_id) {
    Session& s = find_locked(key);
    if (s.in_flight == 0 || round_id != s.in_flight)
        throw std::invalid_argument("round " + std::to_string(round_id) + " is not in flight for session " +
                                    describe(key) + " (stale, already committed or aborted, or never planned)");
    return s;
}

void Scheduler::commit(const SessionKey& key, std::uint64_t round_id) {
    std::lock_guard<std::mutex> lock(mu_);
    Session& s = take_round_locked(key, round_id);
    const std::int64_t before = s.window->absorbed();
    s.window->commit(s.window_round);
    absorbed_ += s.window->absorbed() - before;
    s.in_flight = s.window_round = 0;
    residency_.unpin(key);
    ++committed_;
    if (s.draining && s.window->held() == 0) s.draining = false;
}

void Scheduler::abort(const SessionKey& key, std::uint64_t round_id) {
    std::lock_guard<std::mutex> lock(mu_);
    Session& s = take_round_locked(key, round_id);
    s.window->abort(s.window_round);
    s.in_flight = s.window_round = 0;
    residency_.unpin(key);
    ++aborted_;
}

std::vector<Move> Scheduler::make_resident_locked(Session& s) {
    std::vector<Move> moves;
    if (!residency_.ensure(s.key, &moves))
        throw StateError("cannot make session " + describe(s.key) + " resident: all " +
                         std::to_string(residency_.capacity()) +
                         " resident deltas are pinned (in-flight rounds or acquired sessions)");
    return moves;
}

std::vector<Move> Scheduler::touch(const SessionKey& key) {
    std::lock_guard<std::mutex> lock(mu_);
    return make_resident_locked(find_locked(key));
}

std::vector<Move> Scheduler::acquire(const SessionKey& key) {
    std::lock_guard<std::mutex> lock(mu_);
    Session& s = find_locked(key);
    std::vector<Move> moves = make_resident_locked(s);
    residency_.pin(key);
    ++s.acquired;
    return moves;
}

void Scheduler::release(const SessionKey& key) {
    std::lock_guard<std::mutex> lock(mu_);
    Session& s = find_locked(key);
    if (s.acquired == 0) throw StateError("session " + describe(key) + " is not acquired");
    residency_.unpin(key);
    --s.acquired;
}

std::vector<std::int64_t> Scheduler::window(const SessionKey& key, bool all) const {
    std::lock_guard<std::mutex> lock(mu_);
    return find_locked(key).window->window(all);
}

void Scheduler::restore(const SessionKey& key, const std::vector<std::int64_t>& tokens, std::int64_t absorbed,
                        std::int64_t rounds) {
    check_counts(absorbed, rounds);
    check_ids(tokens);
    std::lock_guard<std::mutex> lock(mu_);
    Session& s = find_locked(key);
    if (s.in_flight)
        throw StateError("session " + describe(key) + " has round " + std::to_string(s.in_flight) +
                         " in flight: commit or abort it before restoring");
    s.window->restore(tokens, absorbed, rounds);
    s.draining = false;
}

void Scheduler::clear(const SessionKey& key) { restore(key, {}, 0, 0); }

SessionStats Scheduler::session_stats(const SessionKey& key) const {
    std::lock_guard<std::mutex> lock(mu_);
    const Session& s = find_locked(key);
    SessionStats st;
    st.session = s.key;
    st.priority = s.priority;
    st.chunk_tokens = s.window->chunk_tokens();
    st.sync_tokens = s.window->sync_tokens();
    st.held = s.window->held();
    st.absorbed = s.window->absorbed();
    st.rounds = s.window->rounds();
    st.waited = s.waited;
    st.acquired = s.acquired;
    st.resident = residency_.resident(key);
    st.draining = s.draining;
    st.in_flight = s.in_flight;
    return st;
}

SchedulerStats Scheduler::stats() const {
    std::lock_guard<std::mutex> lock(mu_);
    SchedulerStats st;
    st.sessions = static_cast<std::int64_t>(sessions_.size());
    st.resident = residency_.size();
    st.max_resident = residency_.capacity();
    for (const auto& kv : sessions_) {
        st.in_flight += kv.second.in_flight ? 1 : 0;
        st.tokens_held += kv.second.window->held();
    }
    st.batches = batches_;
    st.rounds_planned = planned_;
    st.rounds_committed = committed_;
    st.rounds_aborted = aborted_;
    st.tokens_fed = fed_;
    st.tokens_absorbed = absorbed_;
    st.moves_to_device = residency_.moves_to_device();
    st.moves_to_host = residency_.moves_to_host();
    return st;
}

std::vector<SessionKey> Scheduler::sessions() const {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<const Session*> all;
    for (const auto& kv : sessions_) all.push_back(&kv.second);
    std::sort(all.begin(), all.end(), [](const Session* a, const Session* b) { return a->seq < b->seq; });
    std::vector<SessionKey> keys;
    for (const Session* s : all) keys.push_back(s->key);
    return keys;
}

bool Scheduler::contains(const SessionKey& key) const {
    std::lock_guard<std::mutex> lock(mu_);
    return sessions_.count(key) != 0;
}

std::int64_t Scheduler::size() const {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<std::int64_t>(sessions_.size());
}

}  // namespace absorber
