// Which sessions' deltas are resident on the device: at most `capacity` at a time.
//
// Policy: least recently used. ensure(key) makes a session resident; when every slot is taken it
// evicts the resident session with the oldest use that is not pinned (pins: an in-flight round,
// or the caller's acquire()). Every successful ensure() counts as a use. The moves it reports are
// what the caller must do to the tensors, in order: an eviction's "to_host" always precedes the
// "to_device" it makes room for, so the device never holds more than `capacity` deltas.
//
// Not thread-safe on its own: the Scheduler calls it under its lock.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

#include "session_key.h"

namespace absorber {

enum class MoveKind { ToDevice, ToHost };

struct Move {
    SessionKey session;
    MoveKind kind;
};

class Residency {
public:
    explicit Residency(std::int64_t capacity);

    // Makes `key` resident and marks it used. Appends the moves this takes to `moves`. Returns
    // false, changing nothing, when it is not resident and every slot is pinned.
    bool ensure(const SessionKey& key, std::vector<Move>* moves);

    // Pins count: a pinned session is never evicted. pin() requires a resident session.
    void pin(const SessionKey& key);
    void unpin(const SessionKey& key);

    // Drops the session (closed): its slot, if it had one, is free again.
    void forget(const SessionKey& key);

    bool resident(const SessionKey& key) const { return slots_.count(key) != 0; }
    std::int64_t size() const { return static_cast<std::int64_t>(slots_.size()); }
    std::int64_t capacity() const { return capacity_; }
    std::int64_t moves_to_device() const { return to_device_; }
    std::int64_t moves_to_host() const { return to_host_; }

private:
    struct Slot {
        std::uint64_t last_use = 0;
        std::int64_t pins = 0;
    };
    std::int64_t capacity_;
    std::unordered_map<SessionKey, Slot> slots_;
    std::uint64_t clock_ = 0;
    std::int64_t to_device_ = 0, to_host_ = 0;
};

}  // namespace absorber
