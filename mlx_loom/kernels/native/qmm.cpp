// The AffineQMM primitive: op construction, CPU evaluation (kernel dispatch + a small thread
// pool), and the ISA choice.
//
// MLX runs CPU primitives as tasks on its stream thread. eval_cpu only allocates the output and
// enqueues one task; inside it the rows of w are split across a parked pool of worker threads
// (the stream thread takes the first share). Workers spin briefly after each call (a decode step
// issues hundreds of matmuls back to back), then yield, then sleep on a condition variable.
#include "qmm.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <sstream>
#include <utility>
#include <stdexcept>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "native_util.h"
#include "qmm_kernels.h"

namespace loom {

// ---------------------------------------------------------------------------------------------
// ISA dispatch

using RowsFn = void (*)(const QmmArgs&, int, int, float*);

struct Kernel {
  std::string isa;
  RowsFn rows;
  bool interleaved_x;  // its 4-bit direct path reads QmmArgs::xi
  int direct_max_m;    // rows of x up to which it takes the direct path
};

// Every kernel family this CPU can run, fastest first. MLX_LOOM_NATIVE_SCALAR (any value) keeps
// only the portable one; MLX_LOOM_NATIVE_ISA=<name> starts on that family if it is available.
static const std::vector<Kernel>& available_kernels() {
  static const std::vector<Kernel> kernels = [] {
    std::vector<Kernel> k;
    const bool scalar_only = std::getenv("MLX_LOOM_NATIVE_SCALAR") != nullptr;
#if defined(__x86_64__) || defined(_M_X64)
    const bool avx2 = !scalar_only && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx2 && __builtin_cpu_supports("avx512f")) k.push_back({"avx512", qmm_rows_avx512, true, kDirectMaxMAvx512});
    if (avx2) k.push_back({"avx2", qmm_rows_avx2, false, kDirectMaxM});
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
    if (!scalar_only) k.push_back({"neon", qmm_rows_neon, false, kDirectMaxM});
#endif
    k.push_back({"scalar", qmm_rows_scalar, false, kDirectMaxM});
    return k;
  }();
  return kernels;
}

static std::atomic<int> g_kernel{-1};  // index into available_kernels(); -1 = not chosen yet

static const Kernel& kernel() {
  const auto& ks = available_kernels();
  int i = g_kernel.load(std::memory_order_acquire);
  if (i < 0) {
    i = 0;
    if (const char* want = std::getenv("MLX_LOOM_NATIVE_ISA"))
      for (size_t j = 0; j < ks.size(); ++j)
        if (ks[j].isa == want) i = static_cast<int>(j);
    g_kernel.store(i, std::memory_order_release);
  }
  return ks[i];
}

std::string kernel_isa() {
  return kernel().isa;
}

std::vector<std::string> kernel_isas() {
  std::vector<std::string> names;
  for (const auto& k : available_kernels()) names.push_back(k.isa);
  return names;
}

void set_kernel_isa(const std::string& isa) {
  const auto& ks = available_kernels();
  for (size_t j = 0; j < ks.size(); ++j)
    if (ks[j].isa == isa) {
      g_kernel.store(static_cast<int>(j), std::memory_order_release);
      return;
    }
  throw std::invalid_argument("[affine_qmm] kernel family '" + isa + "' is not available on this CPU");
}

// ---------------------------------------------------------------------------------------------
// Thread pool

static inline void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

static int default_threads() {
  if (const char* env = std::getenv("MLX_LOOM_NATIVE_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  int n = 0;
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
#endif
  if (n <= 0) n = static_cast<int>(std::thread::hardware_concurrency());
  return std::clamp(n, 1, 64);
}

class Pool {
 public:
  explicit Pool(int threads) : threads_(threads) {
    for (int i = 1; i < threads_; ++i) workers_.emplace_back([this] { work(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      wake_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const {
    return threads_;
  }

  // fn(i) for i in [0, n). Tasks are claimed dynamically by the caller and the workers, so a
  // worker the OS has not scheduled yet (another process on the core) never stalls the call:
  // the caller just runs its share too.
  void run(int n, const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (!busy.owns_lock() || n <= 1 || threads_ <= 1) {  // another stream thread is using the pool: inline
      for (int i = 0; i < n; ++i) fn(i);
      return;
    }
    fn_.store(&fn, std::memory_order_relaxed);
    n_.store(n, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = ++gen_;
    claim_.store(gen << 32, std::memory_order_release);  // this generation, next task 0
    {
      std::lock_guard<std::mutex> lock(mu_);
      wake_.fetch_add(1, std::memory_order_release);
    }
    if (sleepers_.load() > 0) cv_.notify_all();
    drain(gen);
    while (done_.load(std::memory_order_acquire) < n) cpu_relax();
  }

 private:
  // Claim and run tasks of generation gen until none is left (or a newer generation started).
  void drain(uint64_t gen) {
    for (;;) {
      uint64_t c = claim_.load(std::memory_order_acquire);
      if ((c >> 32) != (gen & 0xffffffffu) || static_cast<uint32_t>(c) >= static_cast<uint32_t>(n_.load(std::memory_order_relaxed)))
        return;
      if (!claim_.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel)) continue;
      (*fn_.load(std::memory_order_relaxed))(static_cast<int>(static_cast<uint32_t>(c)));  // fn_ is stable until every task is done
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void work() {
    uint64_t seen = 0;
    using clock = std::chrono::steady_clock;
    for (;;) {
      auto start = clock::now();
      unsigned spins = 0;
      uint64_t w;
      while ((w = wake_.load(std::memory_order_acquire)) == seen) {
        if (++spins < 2000) {
          cpu_relax();
          continue;
        }
        if (clock::now() - start < std::chrono::microseconds(spin_us_)) {
          std::this_thread::yield();  // let a BLAS thread or the interpreter have the core
          continue;
        }
        std::unique_lock<std::mutex> lock(mu_);
        sleepers_.fetch_add(1);
        cv_.wait(lock, [&] { return wake_.load() != seen; });
        sleepers_.fetch_sub(1);
        start = clock::now();
        spins = 0;
      }
      seen = w;
      if (stop_) return;
      drain(claim_.load(std::memory_order_acquire) >> 32);
    }
  }

  const int threads_;
  const int spin_us_ = [] {
    const char* env = std::getenv("MLX_LOOM_NATIVE_SPIN_US");
    return env ? std::max(0, std::atoi(env)) : 300;
  }();
  std::vector<std::thread> workers_;
  std::mutex mu_, run_mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> wake_{0};
  std::atomic<uint64_t> claim_{0};  // (generation << 32) | next task
  std::atomic<int> done_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<const std::function<void(int)>*> fn_{nullptr};
  std::atomic<int> n_{0};
  uint64_t gen_ = 0;  // caller side only
  bool stop_ = false;
};

static std::mutex g_pool_mu;
static std::unique_ptr<Pool> g_pool;
static int g_threads = 0;  // 0 = default

static Pool& pool() {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  if (!g_pool) g_pool = std::make_unique<Pool>(g_threads > 0 ? g_threads : default_threads());
  return *g_pool;
}

int num_threads() {
  return pool().size();
}

void set_num_threads(int n) {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  g_threads = std::max(0, n);
  g_pool.reset();  // rebuilt on next use
}

// ---------------------------------------------------------------------------------------------
// The op

mx::array affine_qmm(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int group_size,
    int bits,
    mx::StreamOrDevice s) {
  auto fail = [&](const std::string& what) {
    std::ostringstream msg;
    msg << "[affine_qmm] " << what << " (x " << x.shape() << " " << x.dtype() << ", w " << w.shape() << " "
        << w.dtype() << ", scales " << scales.shape() << " " << scales.dtype() << ", biases " << biases.shape()
        << " " << biases.dtype() << ", group_size " << group_size << ", bits " << bits << ")";
    throw std::invalid_argument(msg.str());
  };
  if (bits != 4 && bits != 8) fail("bits must be 4 or 8");
  if (group_size != 32 && group_size != 64 && group_size != 128) fail("group_size must be 32, 64 or 128");
  if (x.ndim() < 1 || w.ndim() != 2 || scales.ndim() != 2 || biases.ndim() != 2) fail("bad ranks");
  if (x.dtype() != mx::float32) fail("x must be float32");
  if (w.dtype() != mx::uint32) fail("w must be uint32");
  if (scales.dtype() != mx::float32 || biases.dtype() != mx::float32) fail("scales and biases must be float32");
  const int K = x.shape(-1), N = w.shape(0);
  if (K % group_size != 0) fail("K must be a multiple of group_size");
  if (w.shape(1) * 32 / bits != K) fail("w.shape[1] * 32 / bits must equal x.shape[-1]");
  if (scales.shape(0) != N || scales.shape(1) != K / group_size || biases.shape() != scales.shape())
    fail("scales/biases must be [N, K / group_size]");
  auto out_shape = x.shape();
  out_shape.back() = N;
  return mx::array(
      out_shape,
      mx::float32,
      std::make_shared<AffineQMM>(mx::to_stream(s), group_size, bits),
      {x, w, scales, biases});
}

std::vector<mx::Shape> AffineQMM::output_shapes(const std::vector<mx::array>& inputs) {
  auto shape = inputs[0].shape();
  shape.back() = inputs[1].shape(0);
  return {shape};
}

bool AffineQMM::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const AffineQMM&>(other);
  return group_size_ == o.group_size_ && bits_ == o.bits_;
}

void AffineQMM::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[affine_qmm] CPU only: use mx.quantized_matmul on GPU streams");
}


// n floats of v from a 64-byte boundary: every 512-bit load of x, of the interleaved x and of a panel
// then stays within one cache line (std::vector gives 16 bytes; the line-crossing loads had cost
// ~7% of an 8-row decode step and ~3% of a 1-row one, A/B in one process).
static float* aligned64(std::vector<float>& v, size_t n) {
  if (v.size() < n + 16) v.resize(n + 16);
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t(63));
}

// Fills a.xsum / a.xi (direct path) from buffers that live as long as the calling thread's call.
static void prepare_direct(QmmArgs& a, const Kernel& k, std::vector<float>& xsum, std::vector<float>& xi) {
  const int gs = a.group_size;
  if (a.M > k.direct_max_m) return;
  xsum.resize((size_t)a.M * (a.K / gs));
  group_sums(a, xsum.data());
  a.xsum = xsum.data();
  if (k.interleaved_x && a.bits == 4) {
    float* base = aligned64(xi, (size_t)a.M * interleaved_stride(a.K));
    interleave_x(a, base);
    a.xi = base;
  } else {  // x copied to rows that start on 64-byte boundaries (MLX buffers start 24 bytes past one here)
    const long long ld = (a.K + 15LL) / 16 * 16;
    float* base = aligned64(xi, (size_t)a.M * ld);
    for (int m = 0; m < a.M; ++m) std::memcpy(base + m * ld, a.x + m * a.ldx, sizeof(float) * a.K);
    a.x = base;
    a.ldx = ld;
  }
}

void qmm_run(QmmArgs a) {
  qmm_run_many(&a, 1);
}

// Several products in one pool call: the tiles of all of them are split into one list, so the
// threads meet once per call instead of once per matrix (a decode layer's q / k / v, gate / up).
// Each output row is computed exactly as by a call of its own.
void qmm_run_many(QmmArgs* as, int count) {
  const Kernel& k = kernel();
  // The direct path needs per-group sums of x (and, for some kernels, x interleaved); products
  // that share x, K, group size and bits share them.
  thread_local std::vector<std::vector<float>> xsums, xis;
  if ((int)xsums.size() < count) {
    xsums.resize(count);
    xis.resize(count);
  }
  std::vector<int> first_tile(count + 1, 0);
  // Each product's x as the caller gave it (prepare_direct may point a.x at an aligned copy).
  std::vector<std::pair<const float*, long long>> given(count);
  long long work = 0;
  for (int i = 0; i < count; ++i) {
    QmmArgs& a = as[i];
    given[i] = {a.x, a.ldx};
    const bool empty = a.M == 0 || a.N == 0 || a.K == 0;
    if (a.M > 0 && a.N > 0 && a.K == 0) std::fill(a.out, a.out + (size_t)a.M * a.N, 0.f);
    first_tile[i + 1] = first_tile[i] + (empty ? 0 : (a.N + kTileN - 1) / kTileN);
    if (empty) continue;
    work += (long long)a.N * a.K * std::max(1, a.M);
    int same = -1;
    for (int j = 0; j < i && same < 0; ++j)
      if (given[j] == given[i] && as[j].M == a.M && as[j].K == a.K &&
          as[j].group_size == a.group_size && as[j].bits == a.bits && as[j].N > 0)
        same = j;
    if (same >= 0) {
      a.xsum = as[same].xsum;
      a.xi = as[same].xi;
      a.x = as[same].x;
      a.ldx = as[same].ldx;
    } else {
      prepare_direct(a, k, xsums[i], xis[i]);
    }
  }
  const int tiles = first_tile[count];
  if (tiles == 0) return;
  // Split the tile list into contiguous chunks; tiny problems stay on the calling thread.
  Pool& p = pool();
  int nt = std::min<long long>(p.size(), std::max<long long>(1, work / (1 << 14)));
  nt = std::min(nt, tiles);
  const RowsFn rows = k.rows;
  p.run(nt, [&](int t) {
    const int t0 = static_cast<int>((long long)tiles * t / nt), t1 = static_cast<int>((long long)tiles * (t + 1) / nt);
    thread_local std::vector<float> scratch;
    for (int i = 0; i < count; ++i) {
      const int a0 = std::max(t0, first_tile[i]), a1 = std::min(t1, first_tile[i + 1]);
      if (a0 >= a1) continue;
      const QmmArgs& a = as[i];
      const int n0 = (a0 - first_tile[i]) * kTileN, n1 = std::min(a.N, (a1 - first_tile[i]) * kTileN);
      rows(a, n0, n1, aligned64(scratch, (size_t)scratch_floats(a.K)));
    }
  });
}

void parallel_for(int n, const std::function<void(int)>& fn) {
  Pool& p = pool();
  if (n <= 0) return;
  const int nt = std::min(n, p.size());
  p.run(nt, [&](int i) {
    const int b0 = static_cast<int>((long long)n * i / nt), b1 = static_cast<int>((long long)n * (i + 1) / nt);
    for (int b = b0; b < b1; ++b) fn(b);
  });
}

void parallel_tasks(int n, const std::function<void(int)>& fn) {
  if (n > 0) pool().run(n, fn);
}

void AffineQMM::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const int K = inputs[0].shape(-1), N = inputs[1].shape(0);
  const int M = K > 0 ? static_cast<int>(inputs[0].size() / K) : 0;
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) encoder.set_input_array(in);
  encoder.set_output_array(out);
  encoder.dispatch([x = input(inputs[0]),
                    w = input(inputs[1]),
                    s = input(inputs[2]),
                    b = input(inputs[3]),
                    out_ptr = out.data<float>(),
                    M,
                    N,
                    K,
                    gs = group_size_,
                    bits = bits_]() {
    std::vector<float> xs, ss, bs;
    std::vector<uint32_t> ws;
    QmmArgs a{};
    a.x = dense_ptr<float>(x, xs);
    a.ldx = K;
    a.w = dense_ptr<uint32_t>(w, ws);
    a.scales = dense_ptr<float>(s, ss);
    a.biases = dense_ptr<float>(b, bs);
    a.out = out_ptr;
    a.M = M;
    a.N = N;
    a.K = K;
    a.group_size = gs;
    a.bits = bits;
    qmm_run(a);
  });
}

}  // namespace loom
