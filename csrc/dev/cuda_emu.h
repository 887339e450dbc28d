// A tiny warp-level CUDA emulator for the CPU, just big enough to run csrc/cuda/attention.cu's
// kernels without a GPU (g++ -DLLMFAST_EMU). Dev-only: never part of the extension.
//
// Every CUDA thread of a CTA is a ucontext fiber; fibers switch only at barriers, so each
// warp-collective (shfl, ldmatrix, mma) and __syncthreads is a rendezvous. The collective
// operations are re-implemented from the PTX ISA's fragment tables (mma.m16n8k16 A/B/C layouts,
// ldmatrix row/column ownership), independently of the kernels' own index math, so running a
// kernel here checks that math. What it also catches:
//   * divergent barriers / warp collectives (deadlock -> abort with a message),
//   * reading shared memory that was never written, or whose cp.async has not been waited for
//     (shared memory starts as NaN; a cp.async poisons its destination with NaN until the
//     issuing thread's cp.async.wait_group retires it),
//   * a shared buffer overwritten while other threads still read it: fibers run in a random
//     order between barriers, so a missing __syncthreads shows up as NaN or wrong numbers,
//   * misaligned ldmatrix / cp.async addresses and out-of-range shared-memory accesses.
// What it cannot model: real hardware timing, the accumulation order inside an mma, bank
// conflicts, register pressure.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <random>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifndef __global__
#define __global__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#ifndef __forceinline__
#define __forceinline__ inline
#endif
#define __launch_bounds__(...)

// cuda_fp16.h already brings the runtime's host types (dim3, float2, cudaStream_t,
// cudaError_t) with it: the emulator reuses them.

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "emu: %s\n", what);
  std::abort();
}

struct Copy {
  char* dst;
  const char* src;
  int nbytes;
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  unsigned tid = 0;
  bool done = false;
  unsigned coll = 0;  // warp collectives issued (selects the exchange slot)
  std::vector<Copy> open;
  std::deque<std::vector<Copy>> groups;
};

struct Slot {
  uint32_t u[6];
  float f;
  const void* ptr;
};

struct Cta {
  std::vector<Fiber> fibers;
  ucontext_t sched;
  Fiber* cur = nullptr;
  std::vector<char> smem;
  dim3 block_idx, grid_dim, block_dim;
  unsigned nthreads = 0;
  unsigned cta_arrived = 0, cta_gen = 0;
  std::vector<unsigned> warp_arrived, warp_gen;
  std::vector<Slot> slots;  // [warp][2][32]
  uint64_t progress = 0;
  std::function<void()> body;
  std::mt19937 rng{12345};
};

inline Cta*& cta() {
  static Cta* c = nullptr;
  return c;
}
inline Fiber& me() { return *cta()->cur; }
inline dim3 thread_idx() { return dim3(me().tid, 0, 0); }
inline char* smem_base() { return cta()->smem.data(); }

inline void yield() {
  Cta& c = *cta();
  Fiber* f = c.cur;
  swapcontext(&f->ctx, &c.sched);
}

inline void cta_barrier() {
  Cta& c = *cta();
  const unsigned gen = c.cta_gen;
  ++c.progress;
  if (++c.cta_arrived == c.nthreads) {
    c.cta_arrived = 0;
    ++c.cta_gen;
  } else {
    while (c.cta_gen == gen) yield();
  }
}

inline void warp_barrier() {
  Cta& c = *cta();
  const unsigned w = me().tid / 32;
  const unsigned gen = c.warp_gen[w];
  ++c.progress;
  if (++c.warp_arrived[w] == 32) {
    c.warp_arrived[w] = 0;
    ++c.warp_gen[w];
  } else {
    while (c.warp_gen[w] == gen) yield();
  }
}

// Exchange: every lane posts a Slot, then reads its peers'. Two slots per warp alternate: a
// lane can only reuse a slot after the next collective's barrier, which every peer reaches
// only after reading.
inline Slot* exchange(const Slot& mine) {
  Cta& c = *cta();
  Fiber& f = me();
  const unsigned w = f.tid / 32, lane = f.tid % 32, par = f.coll++ & 1u;
  Slot* s = &c.slots[(w * 2 + par) * 32];
  s[lane] = mine;
  warp_barrier();
  return s;
}

inline void check_smem(const void* p, size_t bytes, size_t align, const char* what) {
  const char* b = smem_base();
  const char* q = static_cast<const char*>(p);
  if (q < b || q + bytes > b + cta()->smem.size()) fail(what);
  if (reinterpret_cast<uintptr_t>(q) % align != 0) fail(what);
}

inline void fiber_entry() {
  Cta& c = *cta();
  c.body();
  c.cur->done = true;
  ++c.progress;
  // uc_link returns to the scheduler
}

template <typename Kernel, typename Params>
void launch(Kernel kernel, dim3 grid, dim3 block, int smem_bytes, const Params& params) {
  if (block.x % 32 != 0 || block.y != 1 || block.z != 1) fail("launch: block must be a multiple of 32 threads (1-D)");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("launch: empty grid");
  static std::vector<std::vector<char>> stacks;  // reused between launches
  const unsigned nt = block.x;
  if (stacks.size() < nt) stacks.resize(nt);
  for (auto& s : stacks)
    if (s.size() < (1u << 18)) s.resize(1u << 18);
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      Cta c;
      c.block_idx = dim3(bx, by, 0);
      c.grid_dim = grid;
      c.block_dim = block;
      c.nthreads = nt;
      c.rng.seed(bx * 7919u + by * 104729u + 1u);
      // Shared memory starts as NaN (0xFF bytes): reading what was never written shows up.
      c.smem.assign(static_cast<size_t>(smem_bytes) + 16, static_cast<char>(0xFF));
      c.smem.resize(static_cast<size_t>(smem_bytes));
      c.warp_arrived.assign(nt / 32, 0);
      c.warp_gen.assign(nt / 32, 0);
      c.slots.assign(nt / 32 * 2 * 32, Slot{});
      c.body = [&]() { kernel(params); };
      c.fibers.resize(nt);
      cta() = &c;
      for (unsigned i = 0; i < nt; ++i) {
        Fiber& f = c.fibers[i];
        f.tid = i;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stacks[i].data();
        f.ctx.uc_stack.ss_size = stacks[i].size();
        f.ctx.uc_link = &c.sched;
        makecontext(&f.ctx, fiber_entry, 0);
      }
      std::vector<unsigned> order(nt);
      for (unsigned i = 0; i < nt; ++i) order[i] = i;
      unsigned done = 0;
      while (done < nt) {
        std::shuffle(order.begin(), order.end(), c.rng);
        const uint64_t before = c.progress;
        for (unsigned i : order) {
          Fiber& f = c.fibers[i];
          if (f.done) continue;
          c.cur = &f;
          swapcontext(&c.sched, &f.ctx);
          if (f.done) {
            ++done;
            if (!f.open.empty()) fail("kernel exited with uncommitted cp.async copies");
            for (auto& grp : f.groups)
              for (auto& cp : grp) {
                std::memcpy(cp.dst, cp.src, cp.nbytes);
                std::memset(cp.dst + cp.nbytes, 0, 16 - cp.nbytes);
              }
          }
        }
        if (c.progress == before && done < nt) fail("deadlock: threads wait at barriers that others never reach");
      }
      cta() = nullptr;
    }
  }
}

}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::cta()->block_idx)
#define gridDim (::emu::cta()->grid_dim)
#define blockDim (::emu::cta()->block_dim)
#define LLMFAST_DYN_SMEM(name) char* name = ::emu::smem_base()

namespace llmfast::attn {

inline void sync_cta() { ::emu::cta_barrier(); }
inline void sync_warp() { ::emu::warp_barrier(); }

inline float shfl_xor(float v, int m) {
  ::emu::Slot s{};
  s.f = v;
  const ::emu::Slot* all = ::emu::exchange(s);
  return all[(::emu::me().tid % 32) ^ static_cast<unsigned>(m)].f;
}

// ldmatrix.m8n8.x4.b16: lanes 8m..8m+7 hold the 16-byte row addresses of matrix m. Without
// .trans lane l receives, in register m, row l/4 elements 2(l%4), 2(l%4)+1 of matrix m; with
// .trans it receives the same positions of the transposed matrix, i.e. rows 2(l%4) and
// 2(l%4)+1 of column l/4.
inline void ldmatrix_impl(uint32_t (&r)[4], const void* p, bool trans) {
  ::emu::check_smem(p, 16, 16, "ldmatrix: row address outside shared memory or not 16 B-aligned");
  ::emu::Slot s{};
  s.ptr = p;
  const ::emu::Slot* all = ::emu::exchange(s);
  const unsigned lane = ::emu::me().tid % 32;
  for (int m = 0; m < 4; ++m) {
    uint16_t e[2];
    for (int x = 0; x < 2; ++x) {
      const uint16_t* row;
      unsigned col;
      if (!trans) {
        row = static_cast<const uint16_t*>(all[8 * m + lane / 4].ptr);
        col = 2 * (lane % 4) + x;
      } else {
        row = static_cast<const uint16_t*>(all[8 * m + 2 * (lane % 4) + x].ptr);
        col = lane / 4;
      }
      e[x] = row[col];
    }
    r[m] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
  }
  ::emu::warp_barrier();  // ldmatrix reads shared memory "at once": nobody writes until all read
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { ldmatrix_impl(r, p, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { ldmatrix_impl(r, p, true); }

template <typename T>
inline float emu_b16_to_float(uint16_t bits) {
  T v;
  std::memcpy(&v, &bits, 2);
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
  ::emu::Slot s{};
  for (int i = 0; i < 4; ++i) s.u[i] = a[i];
  s.u[4] = b0;
  s.u[5] = b1;
  const ::emu::Slot* all = ::emu::exchange(s);
  float A[16][16], Bm[16][8];
  for (unsigned ln = 0; ln < 32; ++ln) {
    const unsigned g = ln / 4, t = ln % 4;
    for (int i = 0; i < 8; ++i) {
      const uint32_t reg = all[ln].u[i / 2];
      const uint16_t bits = static_cast<uint16_t>((i & 1) ? reg >> 16 : reg & 0xffffu);
      const unsigned row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
      const unsigned col = (i < 4) ? 2 * t + (i & 1) : 2 * t + (i & 1) + 8;
      A[row][col] = emu_b16_to_float<T>(bits);
    }
    for (int i = 0; i < 4; ++i) {
      const uint32_t reg = all[ln].u[4 + i / 2];
      const uint16_t bits = static_cast<uint16_t>((i & 1) ? reg >> 16 : reg & 0xffffu);
      const unsigned k = (i < 2) ? 2 * t + (i & 1) : 2 * t + (i & 1) + 8;
      Bm[k][g] = emu_b16_to_float<T>(bits);
    }
  }
  const unsigned lane = ::emu::me().tid % 32, g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const unsigned row = i < 2 ? g : g + 8, col = 2 * t + (i & 1);
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc += A[row][k] * Bm[k][col];
    c[i] = acc;
  }
}

inline void cp_async_16(void* dst, const void* src, int src_bytes) {
  ::emu::check_smem(dst, 16, 16, "cp.async: destination outside shared memory or not 16 B-aligned");
  if (src_bytes < 0 || src_bytes > 16) ::emu::fail("cp.async: src size out of range");
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16 != 0) ::emu::fail("cp.async: source not 16 B-aligned");
  std::memset(dst, 0xFF, 16);  // undefined until the group is waited for
  ::emu::me().open.push_back({static_cast<char*>(dst), static_cast<const char*>(src), src_bytes});
}
inline void cp_async_commit() {
  auto& f = ::emu::me();
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}
template <int N>
inline void cp_async_wait() {
  auto& f = ::emu::me();
  while (f.groups.size() > static_cast<size_t>(N)) {
    for (auto& cp : f.groups.front()) {
      std::memcpy(cp.dst, cp.src, cp.nbytes);
      std::memset(cp.dst + cp.nbytes, 0, 16 - cp.nbytes);
    }
    f.groups.pop_front();
  }
}

}  // namespace llmfast::attn
