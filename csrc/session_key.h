// How a session is named: the caller's own int or str (1 and "1" are different sessions).
#pragma once

#include <cstdint>
#include <string>
#include <variant>

namespace absorber {

using SessionKey = std::variant<std::int64_t, std::string>;

// For error messages: 42 or 'alice'.
inline std::string describe(const SessionKey& key) {
    if (const auto* i = std::get_if<std::int64_t>(&key)) return std::to_string(*i);
    return "'" + std::get<std::string>(key) + "'";
}

}  // namespace absorber
