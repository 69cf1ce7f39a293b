// Exception types of the scheduler and the Python exception each becomes (bindings.cpp).
//
//   std::invalid_argument -> ValueError    bad sizes, priorities, duplicate open, stale round ids
//   std::out_of_range     -> IndexError    a token id outside [0, vocab_size)
//   UnknownSession        -> KeyError      a session that is not open (never opened, or closed)
//   StateError            -> RuntimeError  a valid call the current state refuses (e.g. close
//                                          while a round is in flight, no resident slot free)
#pragma once

#include <stdexcept>

namespace absorber {

struct UnknownSession : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct StateError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

}  // namespace absorber
