// Multi-threaded stress of the Scheduler without Python, meant to run under ThreadSanitizer
// (tests/csrc/test_scheduler.py builds it with -fsanitize=thread). Not part of the extension:
// setup.py only compiles csrc/*.cpp.
//
// Feeders push known streams in small pieces, a planner runs batches (committing most rounds,
// aborting some), a churn thread opens and closes other sessions, an observer reads stats and
// acquires/releases. At the end every stream must have been absorbed exactly, in order.
#include <atomic>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../errors.h"
#include "../scheduler.h"

using namespace absorber;

int main() {
    constexpr std::int64_t kVocab = 997;
    Scheduler s(kVocab, 3, 5, 3);
    constexpr int kFeeders = 4, kPer = 3;
    std::vector<std::string> keys;
    std::map<std::string, std::vector<std::int64_t>> streams, absorbed;
    std::mt19937_64 rng(7);
    for (int i = 0; i < kFeeders * kPer; ++i) {
        const std::string k = "s" + std::to_string(i);
        keys.push_back(k);
        s.open(k, static_cast<std::int64_t>(rng() % 4), (i % 3 == 0) ? 7 : 5, std::nullopt);
        auto& st = streams[k];
        st.resize(3000 + rng() % 2000);
        for (auto& t : st) t = static_cast<std::int64_t>(rng() % kVocab);
        absorbed[k];
    }
    std::atomic<bool> done{false};
    std::atomic<int> failures{0};

    std::vector<std::thread> feeders;
    for (int f = 0; f < kFeeders; ++f)
        feeders.emplace_back([&, f] {
            std::mt19937_64 r(100 + f);
            std::map<std::string, std::size_t> pos;
            for (int j = 0; j < kPer; ++j) pos[keys[f * kPer + j]] = 0;
            while (!pos.empty()) {
                auto it = pos.begin();
                std::advance(it, static_cast<long>(r() % pos.size()));
                const auto& st = streams.at(it->first);
                const std::size_t n = std::min<std::size_t>(1 + r() % 11, st.size() - it->second);
                s.feed(it->first, std::vector<std::int64_t>(st.begin() + static_cast<long>(it->second),
                                                           st.begin() + static_cast<long>(it->second + n)));
                it->second += n;
                if (it->second == st.size()) pos.erase(it);
            }
        });

    std::thread planner([&] {
        std::mt19937_64 r(99);
        std::int64_t n_batch = 0;
        for (;;) {
            const bool finishing = done.load();
            Batch b;
            if (!s.next_batch(1 + static_cast<std::int64_t>(r() % 3), finishing, &b)) {
                if (finishing) return;
                continue;
            }
            ++n_batch;
            for (auto& rd : b.rounds) {
                const auto& key = std::get<std::string>(rd.session);
                if (rd.x.size() != static_cast<std::size_t>(b.x_len)) failures++;
                if (n_batch % 7 == 0) {
                    s.abort(rd.session, rd.id);
                } else {
                    auto& a = absorbed.at(key);   // only this thread touches `absorbed`
                    a.insert(a.end(), rd.x.begin(), rd.x.end());
                    s.commit(rd.session, rd.id);
                }
            }
        }
    });

    std::thread churn([&] {
        for (std::int64_t i = 0; !done.load(); ++i) {
            s.open(10000 + i % 64, 1, std::nullopt, std::nullopt);
            if (i >= 32) {
                s.session_stats(10000 + (i - 32) % 64);
                s.close(10000 + (i - 32) % 64);
            }
        }
    });

    std::thread observer([&] {
        std::mt19937_64 r(5);
        while (!done.load()) {
            const auto& k = keys[r() % keys.size()];
            s.stats();
            s.session_stats(k);
            try {
                s.acquire(k);
                s.window(k);
                s.release(k);
            } catch (const StateError&) {   // every slot pinned right now
            }
        }
    });

    for (auto& t : feeders) t.join();
    done = true;
    churn.join();
    observer.join();
    planner.join();

    for (const auto& k : keys) {
        if (absorbed.at(k) != streams.at(k)) {
            std::printf("stream %s: absorbed %zu of %zu tokens, or out of order\n", k.c_str(), absorbed.at(k).size(),
                        streams.at(k).size());
            failures++;
        }
    }
    const auto st = s.stats();
    std::int64_t total = 0;
    for (const auto& kv : streams) total += static_cast<std::int64_t>(kv.second.size());
    if (st.tokens_fed != total || st.tokens_absorbed != total || st.tokens_held != 0 || st.resident > 3) {
        std::printf("accounting: fed %lld absorbed %lld held %lld of %lld\n", static_cast<long long>(st.tokens_fed),
                    static_cast<long long>(st.tokens_absorbed), static_cast<long long>(st.tokens_held),
                    static_cast<long long>(total));
        failures++;
    }
    if (failures.load()) return 1;
    std::printf("OK %lld tokens, %lld rounds, %lld aborted\n", static_cast<long long>(total),
                static_cast<long long>(st.rounds_committed), static_cast<long long>(st.rounds_aborted));
    return 0;
}
