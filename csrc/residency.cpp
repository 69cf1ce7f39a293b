#include "residency.h"

#include <stdexcept>
#include <string>

#include "errors.h"

namespace absorber {

Residency::Residency(std::int64_t capacity) : capacity_(capacity) {
    if (capacity_ <= 0)
        throw std::invalid_argument("max_resident must be positive, got " + std::to_string(capacity_));
}

bool Residency::ensure(const SessionKey& key, std::vector<Move>* moves) {
    if (auto it = slots_.find(key); it != slots_.end()) {
        it->second.last_use = ++clock_;
        return true;
    }
    if (size() >= capacity_) {
        auto victim = slots_.end();
        for (auto it = slots_.begin(); it != slots_.end(); ++it)
            if (it->second.pins == 0 && (victim == slots_.end() || it->second.last_use < victim->second.last_use))
                victim = it;
        if (victim == slots_.end()) return false;
        moves->push_back({victim->first, MoveKind::ToHost});
        ++to_host_;
        slots_.erase(victim);
    }
    slots_.emplace(key, Slot{++clock_, 0});
    moves->push_back({key, MoveKind::ToDevice});
    ++to_device_;
    return true;
}

void Residency::pin(const SessionKey& key) {
    auto it = slots_.find(key);
    if (it == slots_.end()) throw StateError("internal: pinning session " + describe(key) + ", which is not resident");
    ++it->second.pins;
}

void Residency::unpin(const SessionKey& key) {
    auto it = slots_.find(key);
    if (it == slots_.end() || it->second.pins <= 0)
        throw StateError("internal: unpinning session " + describe(key) + ", which is not pinned");
    --it->second.pins;
}

void Residency::forget(const SessionKey& key) { slots_.erase(key); }

}  // namespace absorber
