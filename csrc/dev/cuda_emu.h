// A warp-level CUDA emulator for the CPU: csrc/cuda/*.cu compiled with g++ -DLLMFAST_EMU run
// their kernels on host memory, thread by thread. It serves llmfast._emu (the `cuda` backend on
// CPU tensors in the test suite) and the scratch programs in csrc/dev.
//
// Every CUDA thread of a CTA is a fiber; fibers switch only at barriers, so __syncthreads and
// each warp collective (shuffle, ldmatrix, mma) is a rendezvous. Warps are formed from the
// linear thread id x + y*Bx + z*Bx*By, as on hardware. The kernels are plain CUDA: this header
// provides CUDA's names on the host (threadIdx/blockIdx/blockDim/gridDim, __syncthreads,
// __syncwarp, __shfl_*_sync, __expf, __logf, rsqrtf, __fdiv_rn, static __shared__ arrays), and
// emu::ptx has the hardware-specific instructions (ldmatrix, mma.sync, cp.async),
// re-implemented from the PTX ISA's fragment tables independently of the kernels' own index
// math, so running a kernel here checks that math. What it also catches:
//   * barriers / warp collectives some threads never reach (deadlock: the launch throws emu::Error),
//   * reading shared memory that was never written, or whose cp.async has not been waited for:
//     shared memory (dynamic and static) starts every CTA as NaN (0xFF bytes); a cp.async
//     poisons its destination with NaN until the issuing thread's cp.async.wait_group,
//   * a shared buffer overwritten while other threads still read it: fibers run in a random
//     order between barriers, so a missing __syncthreads shows up as NaN or wrong numbers,
//   * divergent barriers: threads at different __syncthreads, or lanes of a warp at different
//     shuffles (emu::Error too),
//   * misaligned ldmatrix / cp.async addresses and out-of-range shared-memory accesses.
// What it cannot model: races in global memory between CTAs (they run one after another, and a
// thread's read-modify-write never yields), real timing, the accumulation order inside an mma,
// the approximate __expf/__logf (the host's expf/logf are more accurate), bank conflicts,
// register pressure.
//
// Launches are serialised by one mutex (static __shared__ arrays are process-wide storage);
// the rest of the state is per launching thread, so torch may call in from any thread.
#pragma once

#include <sys/mman.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <math.h>  // the C names kernels use unqualified: expf, exp2f, log2f, fmaf, fmaxf, isfinite
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

// The CUDA headers bring the runtime's host types (dim3, float2, cudaStream_t, cudaError_t) and
// the host halves of __half / __nv_bfloat16; their execution-space qualifiers expand to nothing
// in a host compiler, except __shared__, redefined below.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace emu {

// A kernel fault (deadlock, bad launch, misaligned access): thrown by emu::launch on the
// launching thread, so torch turns it into a RuntimeError.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ---------------------------------------------------------------------------------------------
// Fiber stacks and the context switch
// ---------------------------------------------------------------------------------------------

// 256 KB of address space per fiber, committed only as touched, with a guard page below it
// (an overflow faults instead of corrupting the next fiber's stack).
struct Stack {
  static constexpr size_t kBytes = size_t(1) << 18, kGuard = 4096;
  char* base = nullptr;
  Stack() {
    void* p = mmap(nullptr, kBytes + kGuard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1,
                   0);
    if (p == MAP_FAILED) throw Error("emu: cannot map a fiber stack");
    mprotect(p, kGuard, PROT_NONE);
    base = static_cast<char*>(p);
  }
  ~Stack() { munmap(base, kBytes + kGuard); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  char* top() const { return base + kGuard + kBytes; }
};

#if defined(__x86_64__)
// Saves the callee-saved registers and the FP control words on the current stack, stores the
// stack pointer in *from and resumes the stack `to` (System V x86-64): ~40 ns a round trip here,
// against ~350 ns for swapcontext, which also makes a signal-mask syscall. The emulator switches
// once per thread per barrier, and every shuffle is a barrier.
__attribute__((naked, noinline)) static void switch_stack(void** /*from*/, void* /*to*/) {
  asm("pushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n\t"
      "subq $8, %rsp\n\tstmxcsr (%rsp)\n\tfnstcw 4(%rsp)\n\t"
      "movq %rsp, (%rdi)\n\tmovq %rsi, %rsp\n\t"
      "ldmxcsr (%rsp)\n\tfldcw 4(%rsp)\n\taddq $8, %rsp\n\t"
      "popq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n\tret\n\t");
}

struct Context {
  void* sp = nullptr;
  // A fresh stack whose first switch_stack "returns" into entry (which must never return).
  void make(const Stack& s, void (*entry)()) {
    void** p = reinterpret_cast<void**>(s.top());
    *--p = nullptr;                         // entry's return address slot: rsp = 8 (mod 16) at entry
    *--p = reinterpret_cast<void*>(entry);  // popped by switch_stack's ret
    for (int i = 0; i < 6; ++i) *--p = nullptr;  // rbp rbx r12 r13 r14 r15
    uint32_t ctl[2] = {0, 0};                // the current mxcsr and x87 control word
    asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(ctl[0]), "=m"(*reinterpret_cast<uint16_t*>(&ctl[1])));
    std::memcpy(--p, ctl, 8);
    sp = p;
  }
};
inline void switch_to(Context& from, Context& to) { switch_stack(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
  void make(const Stack& s, void (*entry)()) {
    getcontext(&uc);
    uc.uc_stack.ss_sp = s.base + Stack::kGuard;
    uc.uc_stack.ss_size = Stack::kBytes;
    uc.uc_link = nullptr;
    makecontext(&uc, entry, 0);
  }
};
inline void switch_to(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ---------------------------------------------------------------------------------------------
// CTA state
// ---------------------------------------------------------------------------------------------

struct Copy {  // one pending cp.async: nbytes of src, then zeros, to 16 bytes of dst
  char* dst;
  const char* src;
  int nbytes;
};

struct Fiber {
  Context ctx;
  dim3 idx;
  unsigned tid = 0;  // linear thread id; warp tid / 32, lane tid % 32
  bool done = false;
  const unsigned* wait_on = nullptr;  // blocked until *wait_on != wait_val
  unsigned wait_val = 0;
  unsigned coll = 0;       // warp collectives issued (selects the exchange slot)
  unsigned syncs = 0;      // __syncthreads passed
  unsigned warp_syncs = 0;  // warp barriers passed (collectives, __syncwarp)
  std::vector<Copy> open;
  std::deque<std::vector<Copy>> groups;
};

struct Slot {  // what one lane posts to a warp collective
  uint32_t w[6];
  const void* ptr;
};

struct Cta {
  std::vector<Fiber> fibers;
  Context sched;
  Fiber* cur = nullptr;
  char* smem = nullptr;  // dynamic shared memory
  size_t smem_bytes = 0;
  dim3 block_idx, grid_dim, block_dim;
  unsigned nthreads = 0, exited = 0;
  unsigned cta_arrived = 0, cta_gen = 0;
  std::vector<unsigned> warp_arrived, warp_gen, warp_size;
  std::vector<Slot> slots;  // [warp][2][32]
  std::function<void()> body;
  std::string error;  // set by fail() inside a fiber
};

inline thread_local Cta* current = nullptr;

inline Cta& cta() { return *current; }
inline Fiber& me() { return *current->cur; }
inline unsigned lane() { return me().tid % 32; }

// Blocks the calling fiber until *gen changes (the scheduler skips it until then).
inline void wait_for(const unsigned* gen) {
  Cta& c = cta();
  Fiber& f = *c.cur;
  f.wait_on = gen;
  f.wait_val = *gen;
  switch_to(f.ctx, c.sched);
}

// Aborts the launch. Inside a fiber the CTA is abandoned and launch() throws on its own stack.
[[noreturn]] inline void fail(const std::string& what) {
  if (current == nullptr || current->cur == nullptr) throw Error("emu: " + what);
  Cta& c = cta();
  c.error = what;
  for (;;) switch_to(c.cur->ctx, c.sched);  // never resumed
}

// Hardware semantics: threads that have exited count as arrived at __syncthreads. Every thread
// still running must be at the same __syncthreads: one that skipped or repeated one (a barrier in
// divergent code) would, on hardware, pair barriers that were never meant to meet.
inline void release_cta_barrier_if_complete() {
  Cta& c = cta();
  if (c.cta_arrived == 0 || c.cta_arrived + c.exited != c.nthreads) return;
  unsigned n = ~0u;
  for (const Fiber& f : c.fibers) {
    if (f.done) continue;
    if (n != ~0u && f.syncs != n) fail("divergent __syncthreads: threads of a block are at different barriers");
    n = f.syncs;
  }
  c.cta_arrived = 0;
  ++c.cta_gen;
}

inline void cta_barrier() {
  Cta& c = cta();
  const unsigned gen = c.cta_gen;
  ++c.cur->syncs;
  ++c.cta_arrived;
  release_cta_barrier_if_complete();
  if (c.cta_gen == gen) wait_for(&c.cta_gen);
}

// A warp collective needs every lane of the warp, all at the same collective (a lane that
// exited deadlocks it; lanes at different shuffles fail: full-mask shuffles in divergent code
// are undefined on hardware).
inline void warp_barrier() {
  Cta& c = cta();
  Fiber& f = *c.cur;
  const unsigned w = f.tid / 32;
  ++f.warp_syncs;
  if (++c.warp_arrived[w] == c.warp_size[w]) {
    for (unsigned i = w * 32; i < w * 32 + c.warp_size[w]; ++i)
      if (c.fibers[i].warp_syncs != f.warp_syncs)
        fail("divergent warp collective: lanes of a warp are at different shuffles");
    c.warp_arrived[w] = 0;
    ++c.warp_gen[w];
  } else {
    wait_for(&c.warp_gen[w]);
  }
}

// Every lane posts a Slot, then reads its peers'. Two slots per warp alternate: a lane can only
// reuse a slot after the next collective's barrier, which every peer reaches only after reading.
inline const Slot* exchange(const Slot& mine) {
  Cta& c = cta();
  Fiber& f = me();
  const unsigned w = f.tid / 32, par = f.coll++ & 1u;
  Slot* s = &c.slots[(w * 2 + par) * 32];
  s[f.tid % 32] = mine;
  warp_barrier();
  return s;
}

// One 32-bit value from lane src(lane) of a width-lane segment (own value when src is outside).
template <typename T, typename Src>
T shuffle(unsigned mask, T v, int width, Src src) {
  static_assert(sizeof(T) == 4 && std::is_trivially_copyable_v<T>, "shuffles move 32-bit values");
  if (mask != 0xffffffffu) fail("only full-warp shuffles (mask 0xffffffff) are emulated");
  Slot s{};
  std::memcpy(s.w, &v, 4);
  const Slot* all = exchange(s);
  const unsigned l = lane(), seg = l & ~static_cast<unsigned>(width - 1);
  const unsigned from = static_cast<unsigned>(src(l - seg));
  T out;
  std::memcpy(&out, all[from < static_cast<unsigned>(width) ? seg + from : l].w, 4);
  return out;
}

// Static __shared__ arrays live in this linker section: poisoned at the start of every CTA.
extern "C" char __start_emu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_emu_shared[] __attribute__((weak, visibility("hidden")));

inline void check_smem(const void* p, size_t bytes, size_t align, const char* what) {
  const char* q = static_cast<const char*>(p);
  const Cta& c = cta();
  const bool dynamic = q >= c.smem && q + bytes <= c.smem + c.smem_bytes;
  const bool fixed = __start_emu_shared && q >= __start_emu_shared && q + bytes <= __stop_emu_shared;
  if (!(dynamic || fixed) || reinterpret_cast<uintptr_t>(q) % align != 0) fail(what);
}

inline void flush(std::vector<Copy>& group) {
  for (const Copy& cp : group) {
    std::memcpy(cp.dst, cp.src, cp.nbytes);
    std::memset(cp.dst + cp.nbytes, 0, 16 - cp.nbytes);
  }
}

inline void fiber_main() {
  Cta& c = cta();
  c.body();
  Fiber& f = *c.cur;
  if (!f.open.empty()) fail("kernel exited with uncommitted cp.async copies");
  for (auto& g : f.groups) flush(g);
  f.done = true;
  ++c.exited;
  release_cta_barrier_if_complete();
  for (;;) switch_to(f.ctx, c.sched);  // never resumed
}

// Runs the CTA at `idx`: every fiber, in a fresh random order each round, until all have exited.
inline void run_cta(Cta& c, dim3 idx, const std::vector<std::unique_ptr<Stack>>& stacks) {
  c.block_idx = idx;
  // Shared memory starts as NaN (0xFF bytes): reading what was never written shows up.
  std::memset(c.smem, 0xFF, c.smem_bytes);
  if (__start_emu_shared) std::memset(__start_emu_shared, 0xFF, __stop_emu_shared - __start_emu_shared);
  c.exited = c.cta_arrived = 0;
  std::fill(c.warp_arrived.begin(), c.warp_arrived.end(), 0u);
  for (Fiber& f : c.fibers) {
    f.done = false;
    f.wait_on = nullptr;
    f.coll = f.syncs = f.warp_syncs = 0;
    f.open.clear();
    f.groups.clear();
    f.ctx.make(*stacks[f.tid], fiber_main);
  }
  std::mt19937 rng(idx.x * 7919u + idx.y * 104729u + idx.z * 1299709u + 1u);
  std::vector<unsigned> order(c.nthreads);
  for (unsigned i = 0; i < c.nthreads; ++i) order[i] = i;
  for (unsigned live = c.nthreads; live > 0;) {
    std::shuffle(order.begin(), order.end(), rng);
    unsigned ran = 0;
    for (unsigned i : order) {
      Fiber& f = c.fibers[i];
      if (f.done || (f.wait_on && *f.wait_on == f.wait_val)) continue;
      f.wait_on = nullptr;
      c.cur = &f;
      switch_to(c.sched, f.ctx);
      c.cur = nullptr;
      if (!c.error.empty()) throw Error("emu: " + c.error);
      ++ran;
      live -= f.done;
    }
    if (ran == 0) throw Error("emu: deadlock: threads wait at barriers that others never reach");
  }
}

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

// Fiber stacks, reused by every launch of this thread.
inline const std::vector<std::unique_ptr<Stack>>& fiber_stacks(unsigned n) {
  static thread_local std::vector<std::unique_ptr<Stack>> pool;
  while (pool.size() < n) pool.push_back(std::make_unique<Stack>());
  return pool;
}

// kernel<<<grid, block, smem_bytes>>>(args...), emulated: the CTAs run one after another.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem_bytes, A&&... args) {
  const unsigned nt = block.x * block.y * block.z, nwarps = (nt + 31) / 32;
  if (nt == 0 || nt > 1024) throw Error("emu: launch: a block has 1..1024 threads");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) throw Error("emu: launch: empty grid");
  if (current != nullptr) throw Error("emu: launch from inside a kernel");
  const std::lock_guard<std::mutex> lock(launch_mutex());
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);  // the kernel's parameters
  std::vector<char> dyn(smem_bytes);

  Cta c;
  c.grid_dim = grid;
  c.block_dim = block;
  c.nthreads = nt;
  c.smem = dyn.data();
  c.smem_bytes = smem_bytes;
  c.warp_arrived.assign(nwarps, 0);
  c.warp_gen.assign(nwarps, 0);
  c.warp_size.assign(nwarps, 32);
  if (nt % 32) c.warp_size.back() = nt % 32;
  c.slots.assign(nwarps * 2 * 32, Slot{});
  c.body = [&] { std::apply(kernel, params); };
  c.fibers.resize(nt);
  for (unsigned i = 0; i < nt; ++i) {
    c.fibers[i].tid = i;
    c.fibers[i].idx = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
  }
  const auto& pool = fiber_stacks(nt);
  struct Reset {  // `current` is cleared however the launch ends
    ~Reset() { current = nullptr; }
  } reset;
  current = &c;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) run_cta(c, dim3(bx, by, bz), pool);
}

// ---------------------------------------------------------------------------------------------
// PTX instructions the kernels reach through inline asm on a GPU (csrc/cuda/attention.cu)
// ---------------------------------------------------------------------------------------------
namespace ptx {

// ldmatrix.m8n8.x4.b16: lanes 8m..8m+7 hold the 16-byte row addresses of matrix m. Without
// .trans lane l receives, in register m, row l/4 elements 2(l%4), 2(l%4)+1 of matrix m; with
// .trans it receives the same positions of the transposed matrix, i.e. rows 2(l%4) and
// 2(l%4)+1 of column l/4.
inline void ldmatrix_impl(uint32_t (&r)[4], const void* p, bool trans) {
  check_smem(p, 16, 16, "ldmatrix: row address outside shared memory or not 16 B-aligned");
  Slot s{};
  s.ptr = p;
  const Slot* all = exchange(s);
  const unsigned l = lane();
  for (int m = 0; m < 4; ++m) {
    uint16_t e[2];
    for (int x = 0; x < 2; ++x) {
      const uint16_t* row;
      unsigned col;
      if (!trans) {
        row = static_cast<const uint16_t*>(all[8 * m + l / 4].ptr);
        col = 2 * (l % 4) + x;
      } else {
        row = static_cast<const uint16_t*>(all[8 * m + 2 * (l % 4) + x].ptr);
        col = l / 4;
      }
      e[x] = row[col];
    }
    r[m] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
  }
  warp_barrier();  // ldmatrix reads shared memory "at once": nobody writes until all have read
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { ldmatrix_impl(r, p, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { ldmatrix_impl(r, p, true); }

template <typename T>
inline float b16_to_float(uint16_t bits) {
  T v;
  std::memcpy(static_cast<void*>(&v), &bits, 2);
  if constexpr (std::is_same_v<T, __half>)
    return __half2float(v);
  else
    return __bfloat162float(v);
}

// mma.m16n8k16 row.col, fp32 accumulate, from the PTX fragment tables:
//   A (16x16): a_i, i = 0..7 packed two per register; row = g for i in {0,1,4,5} else g+8;
//              col = 2t + (i&1) for i < 4 else 2t + (i&1) + 8            (g = lane/4, t = lane%4)
//   B (16x8):  b_i, i = 0..3; row(k) = 2t + (i&1) for i < 2 else 2t + (i&1) + 8; col = g
//   C (16x8):  c_i, i = 0..3; row = g for i < 2 else g+8; col = 2t + (i&1)
template <typename T>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Slot s{};
  for (int i = 0; i < 4; ++i) s.w[i] = a[i];
  s.w[4] = b0;
  s.w[5] = b1;
  const Slot* all = exchange(s);
  // This lane's outputs need rows g, g+8 of A and columns 2t, 2t+1 of B. The tables above,
  // inverted: A(row, k) is value i = (k&1) + 2[row >= 8] + 4[k >= 8] of lane 4(row%8) + (k%8)/2;
  // B(k, n) is value i = (k&1) + 2[k >= 8] of lane 4n + (k%8)/2. Value i is the (i&1) half of
  // register i/2.
  auto value = [&](unsigned ln, int reg0, int i) {
    const uint32_t reg = all[ln].w[reg0 + i / 2];
    return b16_to_float<T>(static_cast<uint16_t>((i & 1) ? reg >> 16 : reg & 0xffffu));
  };
  const unsigned g = lane() / 4, t = lane() % 4;
  float A[2][16], Bm[16][2];  // A[h][k]: row g + 8h; Bm[k][e]: column 2t + e
  for (int k = 0; k < 16; ++k) {
    const int ik = (k & 1) + (k >= 8 ? 4 : 0);
    for (int h = 0; h < 2; ++h) A[h][k] = value(4 * g + (k % 8) / 2, 0, ik + 2 * h);
    for (int e = 0; e < 2; ++e) Bm[k][e] = value(4 * (2 * t + e) + (k % 8) / 2, 4, (k & 1) + (k >= 8 ? 2 : 0));
  }
  for (int i = 0; i < 4; ++i) {
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc += A[i / 2][k] * Bm[k][i & 1];  // C: row g + 8(i/2), col 2t + (i&1)
    c[i] = acc;
  }
}

// cp.async.cg 16 bytes: the destination holds NaN until the issuing thread waits for its group.
inline void cp_async_16(void* dst, const void* src, int src_bytes) {
  check_smem(dst, 16, 16, "cp.async: destination outside shared memory or not 16 B-aligned");
  if (src_bytes < 0 || src_bytes > 16) fail("cp.async: src size out of range");
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16 != 0) fail("cp.async: source not 16 B-aligned");
  std::memset(dst, 0xFF, 16);
  me().open.push_back({static_cast<char*>(dst), static_cast<const char*>(src), src_bytes});
}
inline void cp_async_commit() {
  Fiber& f = me();
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}
template <int N>
inline void cp_async_wait() {
  Fiber& f = me();
  while (f.groups.size() > static_cast<size_t>(N)) {
    flush(f.groups.front());
    f.groups.pop_front();
  }
}

}  // namespace ptx
}  // namespace emu

// ---------------------------------------------------------------------------------------------
// CUDA's names on the host
// ---------------------------------------------------------------------------------------------
#define threadIdx (::emu::me().idx)
#define blockIdx (::emu::cta().block_idx)
#define gridDim (::emu::cta().grid_dim)
#define blockDim (::emu::cta().block_dim)

// A static __shared__ array is one process-wide copy in the emu_shared section (the launch mutex
// keeps CTAs from sharing it), poisoned at the start of every CTA.
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ __attribute__((section("emu_shared"), aligned(16))) static
// extern __shared__ T name[] (dynamic shared memory) has no host spelling: kernels declare it
// with EMU_DYNAMIC_SMEM(char, name) (csrc/cuda/common.cuh wraps both spellings).
#define EMU_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::emu::cta().smem)

inline void __syncthreads() { ::emu::cta_barrier(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) ::emu::fail("only full-warp __syncwarp is emulated");
  ::emu::warp_barrier();
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::emu::shuffle(mask, v, width, [&](unsigned l) { return l ^ static_cast<unsigned>(lane_mask); });
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return ::emu::shuffle(mask, v, width, [&](unsigned) { return static_cast<unsigned>(src_lane) % width; });
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::emu::shuffle(mask, v, width, [&](unsigned l) { return l + delta; });
}

inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
