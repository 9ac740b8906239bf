// Stress harness for cake's kernel thread pool (cake/text/kernels/thread_pool.h), meant to be
// built with -fsanitize=thread (`make tsan`). Several caller threads run many jobs of random
// sizes and grains; every job checks that each index ran exactly once and that all of them had
// finished when run() returned (its stack frame and buffers are gone right after). Chunks
// sometimes yield or sleep, as when other processes take the cores.
// Usage: pool_stress [seconds] [callers] [pool threads]; exits non-zero on any failure.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <vector>

#include "../../cake/text/kernels/thread_pool.h"

int main(int argc, char** argv) {
  const double seconds = argc > 1 ? std::atof(argv[1]) : 5.0;
  const int callers = argc > 2 ? std::atoi(argv[2]) : 3;
  const int threads = argc > 3 ? std::atoi(argv[3]) : 4;
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  std::atomic<long> jobs{0}, failures{0};
  std::vector<std::thread> ts;
  for (int k = 0; k < callers; ++k) {
    ts.emplace_back([&, k] {
      std::mt19937 rng(1234 + k);
      while (std::chrono::steady_clock::now() < until) {
        const int64_t n = 1 + rng() % 3000, grain = 1 + rng() % 64;
        const unsigned slow = rng() % 8;
        std::vector<int> hits(n, 0);  // plain ints: TSan reports any chunk run twice at once
        std::vector<int64_t> sum(1, 0);
        std::atomic<int64_t> ran{0};
        cake::Pool::get().run(n, grain, threads, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) hits[i] += 1;
          if (slow == 0) std::this_thread::yield();
          if (slow == 1 && b == 0) std::this_thread::sleep_for(std::chrono::microseconds(50));
          ran.fetch_add(e - b, std::memory_order_relaxed);
        });
        for (int64_t i = 0; i < n; ++i) sum[0] += hits[i] == 1 ? 0 : 1;
        if (sum[0] != 0 || ran.load() != n) {
          failures.fetch_add(1);
          std::fprintf(stderr, "job n=%lld grain=%lld: %lld indices not run exactly once\n",
                       (long long)n, (long long)grain, (long long)sum[0]);
        }
        jobs.fetch_add(1);
      }
    });
  }
  for (auto& t : ts) t.join();
  std::printf("pool_stress: %ld jobs, %ld failures\n", jobs.load(), failures.load());
  return failures.load() == 0 && jobs.load() > 0 ? 0 : 1;
}
