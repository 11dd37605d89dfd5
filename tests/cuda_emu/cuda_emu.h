// A CPU emulation of the small part of CUDA that csrc/cuda/ uses, so the test suite can
// run the CUDA kernels (the source itself, unchanged) on machines without a GPU.
//
// Each thread of a block is a fiber with its own stack (created with ucontext, switched with
// _setjmp / _longjmp, which make no system call); a block's fibers run on one OS thread,
// round-robin, each until it waits at a barrier.  Blocks of a grid run in parallel
// (at::parallel_for), one block per OS thread at a time, with per-OS-thread shared memory.
// A thread runs as far as it can before the next barrier, so a missing __syncthreads shows up as
// reads of unwritten (NaN) or stale shared memory.
//   __syncthreads()           every thread of the block arrives, or the launch fails
//   __shfl_sync / _xor_sync   full-mask warp shuffles: all 32 lanes arrive, then read
// A block where some threads wait at a barrier that others never reach (an exited thread, or a
// __syncthreads / shuffle under divergent control flow) stops the launch with an error, where a
// GPU would hang or read garbage.  Dynamic shared memory starts filled with NaN (reads before
// writes poison the result), and the bytes past the launch's request are checked after every block
// (writes past the end fail the launch).  The launch checks the limits of the real hardware (1024
// threads per block, grid.y <= 65535, 48 KiB of dynamic shared memory unless raised with
// cudaFuncSetAttribute, at most 227 KiB).
//
// atomicAdd(float*) is a compare-and-swap loop (blocks run on several OS threads).
// Not emulated: timing, memory ordering between blocks, other atomics, partial-mask shuffles, fast-math
// intrinsics (exp2f and friends are the host's).  Include this header before the .cu file, with
// FUSED_ATTN_CUDA_EMULATION defined.
#pragma once

#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

// -- CUDA keywords as plain C++ (the CUDA headers above define them as attributes for GCC)
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __noinline__
#define __global__
#define __device__
#define __host__
#define __shared__ __thread   // GNU TLS: no init wrapper behind `extern __shared__` declarations
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)

namespace fa_emu {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;
constexpr size_t kDefaultSmem = 48 * 1024;      // dynamic shared memory without opting in
constexpr size_t kMaxSmem = 227 * 1024;         // H100 / H200 opt-in limit per block
constexpr size_t kSmemFloats = kMaxSmem / sizeof(float) + 1024;  // + a guard zone past the limit

constexpr size_t kStackBytes = 128 * 1024;

// This OS thread's dynamic shared memory, kSmemFloats floats: the storage behind the kernels'
// `extern __shared__ float smem[]` (__thread), defined by the file that includes the kernels.
float* dynamic_smem();

struct Fiber {
  ucontext_t start;   // the entry point, used once
  jmp_buf resume;     // where it waits
  dim3 tid;
  bool started = false, done = false;
  unsigned shfl_parity = 0;
  std::unique_ptr<char[]> stack;
};

struct Barrier {
  int arrived = 0;
  uint64_t generation = 0;
};

// The block that runs on this OS thread: its fibers, barriers and shuffle slots.
struct Block {
  jmp_buf scheduler;
  std::vector<Fiber> fibers;
  int current = 0;
  dim3 block_idx, block_dim, grid_dim;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint64_t> shfl_slots;   // [warp][parity][lane]
  uint64_t progress = 0;              // bumped by every arrival, release and exit
  std::string error;                  // why a thread stopped the launch
  const std::function<void()>* body = nullptr;
};

inline thread_local Block* tls_block = nullptr;

inline Block& block() { return *tls_block; }
inline Fiber& fiber() { return tls_block->fibers[tls_block->current]; }

// Stop the launch from inside a thread: exceptions cannot unwind through a fiber's entry, so the
// scheduler throws on the thread's behalf.
[[noreturn]] inline void fail(const std::string& why) {
  block().error = why;
  _longjmp(block().scheduler, 1);
}

inline void yield_to_scheduler() {
  if (_setjmp(fiber().resume) == 0) _longjmp(block().scheduler, 1);
}

// Arrive at barrier b of `count` threads and wait until all have arrived.
inline void arrive_and_wait(Barrier& b, int count) {
  Block& blk = block();
  const uint64_t gen = b.generation;
  ++blk.progress;
  if (++b.arrived == count) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == gen) yield_to_scheduler();
}

inline int thread_count() {
  const dim3& d = block().block_dim;
  return static_cast<int>(d.x * d.y * d.z);
}

inline void syncthreads() { arrive_and_wait(block().block_barrier, thread_count()); }

inline int linear_tid() {
  const dim3& t = fiber().tid;
  const dim3& d = block().block_dim;
  return static_cast<int>(t.x + d.x * (t.y + d.y * t.z));
}

// Full-warp shuffle: every lane publishes v, waits for the warp, reads lane src's value.  Two slot
// sets alternate, so one barrier per shuffle is enough: a lane can only write a set again after
// the next shuffle's barrier, which every lane reaches after reading this one.
template <typename T>
T shuffle(unsigned mask, T v, int src) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 64 bits");
  if (mask != 0xffffffffu) fail("cuda_emu: only full-mask shuffles are emulated");
  Block& blk = block();
  const int t = linear_tid(), warp = t / kWarp, lane = t % kWarp;
  if ((warp + 1) * kWarp > thread_count())
    fail("cuda_emu: shuffle in a partial warp (block size not a multiple of 32)");
  Fiber& f = fiber();
  uint64_t* slots = blk.shfl_slots.data() + (warp * 2 + f.shfl_parity) * kWarp;
  f.shfl_parity ^= 1u;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  slots[lane] = bits;
  arrive_and_wait(blk.warp_barriers[warp], kWarp);
  T out;
  std::memcpy(&out, &slots[src & (kWarp - 1)], sizeof(T));
  return out;
}

[[noreturn]] inline void fiber_entry() {
  std::string why;
  try {
    (*block().body)();
  } catch (const std::exception& e) {
    why = e.what();
  }
  if (!why.empty()) fail(why);   // outside the handler: leaving one by longjmp would skip its cleanup
  fiber().done = true;
  ++block().progress;
  _longjmp(block().scheduler, 1);
}

// Run fiber i until it waits or exits.
__attribute__((noinline)) inline void resume(Block& blk, int i) {
  blk.current = i;
  Fiber& f = blk.fibers[i];
  if (_setjmp(blk.scheduler) != 0) return;
  if (!f.started) {
    f.started = true;
    setcontext(&f.start);
  }
  _longjmp(f.resume, 1);
}

inline std::string describe_stall(const Block& blk) {
  int done = 0, waiting = 0;
  for (const Fiber& f : blk.fibers) (f.done ? done : waiting)++;
  std::ostringstream s;
  s << "cuda_emu: block (" << blk.block_idx.x << ", " << blk.block_idx.y << ", " << blk.block_idx.z
    << ") deadlocked: " << waiting << " threads wait at a barrier or shuffle that the others (" << done
    << " of them exited) never reach: divergent __syncthreads / __shfl_sync";
  return s.str();
}

// Run one block: all its threads as fibers until every one has returned.
inline void run_block(Block& blk, const std::function<void()>& body, size_t smem_bytes) {
  const int n = thread_count();
  blk.body = &body;
  blk.error.clear();
  blk.block_barrier = Barrier{};
  blk.warp_barriers.assign((n + kWarp - 1) / kWarp, Barrier{});
  blk.shfl_slots.assign(blk.warp_barriers.size() * 2 * kWarp, 0);
  const float nan = std::nanf("");
  float* const smem = dynamic_smem();
  std::fill(smem, smem + kSmemFloats, nan);
  int k = 0;
  for (unsigned z = 0; z < blk.block_dim.z; ++z)
    for (unsigned y = 0; y < blk.block_dim.y; ++y)
      for (unsigned x = 0; x < blk.block_dim.x; ++x, ++k) {
        Fiber& f = blk.fibers[k];
        f.tid = dim3(x, y, z);
        f.started = f.done = false;
        f.shfl_parity = 0;
        getcontext(&f.start);
        f.start.uc_stack.ss_sp = f.stack.get();
        f.start.uc_stack.ss_size = kStackBytes;
        f.start.uc_link = nullptr;
        makecontext(&f.start, fiber_entry, 0);
      }
  for (;;) {
    const uint64_t before = blk.progress;
    bool all_done = true;
    for (int i = 0; i < n; ++i) {
      if (blk.fibers[i].done) continue;
      resume(blk, i);
      if (!blk.error.empty()) throw std::runtime_error(blk.error);
      all_done = all_done && blk.fibers[i].done;
    }
    if (all_done) break;
    if (blk.progress == before) throw std::runtime_error(describe_stall(blk));
  }
  uint32_t canary;
  std::memcpy(&canary, &nan, sizeof(canary));
  for (size_t e = (smem_bytes + sizeof(float) - 1) / sizeof(float); e < kSmemFloats; ++e) {
    uint32_t bits;
    std::memcpy(&bits, &smem[e], sizeof(bits));
    if (bits != canary) {
      std::ostringstream s;
      s << "cuda_emu: block (" << blk.block_idx.x << ", " << blk.block_idx.y << ") wrote shared memory at byte "
        << e * sizeof(float) << ", past the " << smem_bytes << " bytes its launch asked for";
      throw std::runtime_error(s.str());
    }
  }
}

// cudaFuncSetAttribute(kernel, MaxDynamicSharedMemorySize, bytes) of each kernel.
inline std::mutex attr_mutex;
inline std::unordered_map<const void*, size_t> max_dynamic_smem;

inline size_t smem_limit(const void* kernel) {
  std::lock_guard<std::mutex> lock(attr_mutex);
  auto it = max_dynamic_smem.find(kernel);
  return it == max_dynamic_smem.end() ? kDefaultSmem : std::max(kDefaultSmem, it->second);
}

inline void run_grid(const void* kernel, dim3 grid, dim3 block_dim, size_t smem, const std::function<void()>& body) {
  const uint64_t threads = uint64_t{block_dim.x} * block_dim.y * block_dim.z;
  std::ostringstream why;
  if (threads == 0 || threads > kMaxThreads) why << "block of " << threads << " threads (1.." << kMaxThreads << ")";
  else if (grid.x == 0 || grid.y == 0 || grid.z == 0) why << "empty grid";
  else if (grid.y > 65535 || grid.z > 65535) why << "grid.y / grid.z above 65535";
  else if (smem > smem_limit(kernel))
    why << smem << " bytes of dynamic shared memory, the kernel's limit is " << smem_limit(kernel)
        << " (cudaFuncSetAttribute raises it)";
  if (!why.str().empty()) throw std::runtime_error("cuda_emu: invalid launch: " + why.str());
  const int64_t n_blocks = int64_t{grid.x} * grid.y * grid.z;
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    thread_local std::unique_ptr<Block> mine;
    if (!mine) mine = std::make_unique<Block>();
    Block& blk = *mine;
    if (blk.fibers.size() < threads) {
      blk.fibers.resize(threads);
      for (Fiber& f : blk.fibers)
        if (!f.stack) f.stack.reset(new char[kStackBytes]);
    }
    Block* const outer = tls_block;
    tls_block = &blk;
    try {
      for (int64_t id = begin; id < end; ++id) {
        blk.grid_dim = grid;
        blk.block_dim = block_dim;
        blk.block_idx = dim3(static_cast<unsigned>(id % grid.x), static_cast<unsigned>(id / grid.x % grid.y),
                             static_cast<unsigned>(id / (int64_t{grid.x} * grid.y)));
        run_block(blk, body, smem);
      }
    } catch (...) {
      tls_block = outer;
      throw;
    }
    tls_block = outer;
  });
}

// kernel<<<grid, block, smem, stream>>>(args...) becomes launch(kernel, grid, block, smem, stream)(args...):
// the arguments convert to the kernel's parameter types once, as a launch copies them.
template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t smem;
  template <typename... Args>
  void operator()(Args&&... args) const {
    const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    const std::function<void()> body = [&] { std::apply(kernel, params); };
    run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem, body);
  }
};

template <typename... Params, typename Stream>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Stream) {
  return Launch<Params...>{kernel, grid, block, smem};
}

}  // namespace fa_emu

// -- built-in variables and intrinsics
#define threadIdx (::fa_emu::fiber().tid)
#define blockIdx (::fa_emu::block().block_idx)
#define blockDim (::fa_emu::block().block_dim)
#define gridDim (::fa_emu::block().grid_dim)

inline void __syncthreads() { fa_emu::syncthreads(); }
template <typename T>
T __shfl_sync(unsigned mask, T v, int src) {
  return fa_emu::shuffle(mask, v, src);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return fa_emu::shuffle(mask, v, (fa_emu::linear_tid() % fa_emu::kWarp) ^ lane_mask);
}
inline float atomicAdd(float* p, float v) {
  float old, want;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  do {
    want = old + v;
  } while (!__atomic_compare_exchange(p, &old, &want, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  return old;
}
inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, sizeof(f));
  return f;
}
template <typename T>
T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
T max(T a, T b) {
  return a < b ? b : a;
}

// -- the runtime calls the host code makes (cuda_fp16.h brought the runtime's types)
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || static_cast<size_t>(value) > fa_emu::kMaxSmem) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(fa_emu::attr_mutex);
  fa_emu::max_dynamic_smem[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
}
#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, "cuda_emu: ", #expr, " failed")
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }   // what the kernels' launchers take
};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace cuda
}  // namespace c10
