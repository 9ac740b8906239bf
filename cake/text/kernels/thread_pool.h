// The kernels' thread pool: work sharing without a join barrier.
//
// at::parallel_for (OpenMP) ends every loop with a barrier that waits for each thread to
// arrive; when another process holds one of the two cores, that wait lasts a scheduler time
// slice, a few ms, hundreds of times per token. Here threads claim chunks from a shared
// ticket, and the caller waits only for chunks that were claimed: a worker that has not woken
// up yet costs nothing. Idle workers spin ~0.2 ms (the gaps inside a decode step), then sleep.
//
// The ticket is one 64-bit word: job generation (32 bits) | chunk count (16) | next chunk (16).
// A claim is one compare-and-swap on it, so a thread left over from an earlier job can never
// claim a chunk of a job that is not current, or a chunk past its end: everything the claim
// decides on is in the word it swaps. The job's function and context are read only after a
// successful claim, and the caller does not return (its stack frame holds them) before every
// claimed chunk has finished. Free of torch so that tests/pool_stress.cpp can build it under
// ThreadSanitizer (`make tsan`).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define CAKE_POOL_PAUSE() _mm_pause()
#else
#define CAKE_POOL_PAUSE() ((void)0)
#endif

namespace cake {

class Pool {
 public:
  // Never destroyed: at process exit a thread may still be inside a kernel (Python's daemon
  // threads run on while static destructors do), and joining or freeing the workers under it
  // would crash it.
  static Pool& get() {
    static Pool* pool = new Pool;
    return *pool;
  }

  static constexpr int64_t kMaxChunks = 0xffff;

  // f(begin, end) over [0, n) in chunks of at least `grain`, on the caller and up to
  // threads - 1 workers.
  template <typename F>
  void run(int64_t n, int64_t grain, int threads, const F& f) {
    if (n <= 0) return;
    grain = std::max<int64_t>({grain, 1, (n + kMaxChunks - 1) / kMaxChunks});
    const int64_t chunks = (n + grain - 1) / grain;
    if (chunks <= 1 || threads <= 1 || in_worker_) {
      f(0, n);
      return;
    }
    std::lock_guard<std::mutex> one_job(run_mutex_);  // callers on several threads take turns
    resize(threads - 1);
    auto body = [&](int64_t c) { f(c * grain, std::min(n, (c + 1) * grain)); };
    fn_ = [](const void* ctx, int64_t c) { (*(const decltype(body)*)ctx)(c); };
    ctx_ = &body;
    const uint64_t gen = ++gen_ & 0xffffffffu;
    done_.store(0, std::memory_order_relaxed);
    // Publish: orders fn_, ctx_ and done_ before any claim of this job (seq_cst: a worker
    // going to sleep either sees this job or is counted in sleepers_ below).
    ticket_.store(gen << 32 | (uint64_t)chunks << 16, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    work(gen);
    while (done_.load(std::memory_order_acquire) < chunks) pause();
  }

 private:
  static inline thread_local bool in_worker_ = false;

  // Waiting threads spin briefly, yielding now and then: on a busy machine a waiting thread
  // may share a core with the thread it waits for.
  static void pause() {
    static thread_local unsigned spins = 0;
    if (++spins % 64 == 0) {
      std::this_thread::yield();
      return;
    }
    CAKE_POOL_PAUSE();
  }

  // Claim and run chunks of job `gen` until none is left.
  void work(uint64_t gen) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    for (;;) {
      const uint64_t c = t & 0xffff, total = (t >> 16) & 0xffff;
      if ((t >> 32) != gen || c >= total) return;
      if (!ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel,
                                         std::memory_order_acquire))
        continue;  // t now holds the current ticket
      fn_(ctx_, (int64_t)c);
      done_.fetch_add(1, std::memory_order_acq_rel);
      t = ticket_.load(std::memory_order_acquire);
    }
  }

  void resize(int n) {
    while ((int)workers_.size() < n) workers_.emplace_back([this] { loop(); });
  }

  void loop() {
    in_worker_ = true;
    uint64_t seen = 0;
    for (;;) {
      auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
      uint64_t gen;
      for (int i = 0;; ++i) {
        gen = ticket_.load(std::memory_order_acquire) >> 32;
        if (gen != seen) break;
        pause();
        if ((i & 255) == 0 && std::chrono::steady_clock::now() > spin_until) {
          std::unique_lock<std::mutex> lock(sleep_mutex_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          wake_.wait_for(lock, std::chrono::milliseconds(100), [&] {
            return (ticket_.load(std::memory_order_seq_cst) >> 32) != seen;
          });
          sleepers_.fetch_sub(1, std::memory_order_seq_cst);
          spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
        }
      }
      seen = gen;
      work(gen);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex run_mutex_, sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleepers_{0};
  uint64_t gen_ = 0;  // written under run_mutex_ only
  // The current job; written before the ticket publishes it, read after a claim of it.
  void (*fn_)(const void*, int64_t) = nullptr;
  const void* ctx_ = nullptr;
};

}  // namespace cake
