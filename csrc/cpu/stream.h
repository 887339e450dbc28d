// Writing outputs larger than the last-level cache. For a read-one-write-one row kernel
// (norms, softmax) of that size the arithmetic is free; two memory costs decide the time:
//
//  - Read for ownership: a plain store first reads the line it overwrites, so writing
//    128 MB moves 256 MB. Streaming (non-temporal) stores send full lines straight to
//    memory. Measured here (2 threads, warm 128 MB fp32 output): 11.0 ms -> 6.5 ms.
//  - First touch: glibc mmaps every block >= 32 MB, so such an output is fresh memory on
//    every call, and each 4 KB page faults on its first write (~1.4 us per page in this
//    VM: ~45 ms per 128 MB, several times the copy itself, and the same for torch's
//    kernels). MADV_POPULATE_WRITE maps a block of pages in one call instead of one trap
//    per page; with streaming stores a fresh 128 MB output costs ~55 ms instead of ~66.
//    A block that is already mapped (a reused allocation) is skipped: populating mapped
//    pages still walks them (12 ms per 128 MB), so the first page's residency (mincore)
//    decides. (With THP_MEM_ALLOC_ENABLE=1, torch's huge-page allocation, faults are cheap
//    and this path measured at parity with plain stores, not ahead.)
//
// Use: OutputStream stream(rows, row_bytes[, outputs]); each thread calls
// stream.prepare_rows(row_ptr, index, left) as it reaches each output row, finishes each row
// in an L1 scratch row that stream.write(dst, scratch, bytes) copies out (RowOut below
// does this), and calls stream.fence() when its part is done (streaming stores are
// weakly ordered).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "cpu/row.h"

namespace llmfast::cpu {

#if defined(__linux__) && !defined(MADV_POPULATE_WRITE)
#define MADV_POPULATE_WRITE 23  // Linux 5.14; older kernels return EINVAL and we fall back
#endif

// The largest cache level's size as sysfs reports it (what lscpu shows). glibc's
// sysconf(_SC_LEVEL3_CACHE_SIZE) decodes CPUID itself and can be far off in a VM (320 MB
// for this machine's 32 MB L3). 0 when unknown.
inline int64_t last_level_cache_bytes() {
#if defined(__linux__)
  int64_t best = 0;
  for (int i = 0; i < 8; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream level_f(dir + "level"), size_f(dir + "size");
    int level = 0;
    std::string size;
    if (!(level_f >> level) || !(size_f >> size) || size.empty()) continue;
    int64_t bytes = std::atoll(size.c_str());
    if (size.back() == 'K') bytes <<= 10;
    if (size.back() == 'M') bytes <<= 20;
    if (level >= 2) best = std::max(best, bytes);
  }
  return best;
#else
  return 0;
#endif
}

// Outputs of at least this many bytes are streamed: the last-level cache size (32 MB if
// unknown), since a smaller output may still be in cache for the next op.
// LLMFAST_CPU_STREAM_BYTES overrides it (read once; a huge value turns streaming off).
// llmfast._C exports it as cpu_stream_bytes.
inline int64_t stream_min_bytes() {
  static const int64_t bytes = [] {
    if (const char* env = std::getenv("LLMFAST_CPU_STREAM_BYTES")) {
      const long long v = std::atoll(env);
      if (v > 0) return static_cast<int64_t>(v);
    }
    const int64_t llc = last_level_cache_bytes();
    return llc > 0 ? llc : int64_t(32) << 20;
  }();
  return bytes;
}

struct OutputStream {
  bool on;
  int64_t row_bytes;
  // Rows per prepare() call: about 1 MB, so the pages the kernel zeroes are still in
  // cache when the rows are written (populating a whole thread's part up front would
  // push them out to memory first). Even, so kernels that take rows in pairs from even
  // offsets never straddle two calls.
  int64_t block;

  // `outputs` tensors of `rows` rows of `row_bytes` each, written by one kernel.
  OutputStream(int64_t rows, int64_t row_bytes, int64_t outputs = 1)
      : on(rows * row_bytes * outputs >= stream_min_bytes()),
        row_bytes(row_bytes),
        block(std::max<int64_t>(2, (int64_t(1) << 20) / std::max<int64_t>(row_bytes, 1)) / 2 * 2) {}

  // Called with each row a thread writes, in order: `row` points at it, it is the
  // `index`-th row of the thread's run and `left` rows remain in that run (itself
  // included). Every `block` rows, maps the next block's fresh pages.
  void prepare_rows(void* row, int64_t index, int64_t left) const {
    if (on && index % block == 0) prepare(row, std::min(block, left) * row_bytes);
  }

  // Maps the fresh pages of [p, p + bytes) ahead of the writes, 1 MB at a time (one
  // residency probe per block). Errors (old kernel, not Linux) leave the normal faults.
  void prepare(void* p, int64_t bytes) const {
#if defined(__linux__)
    if (!on || bytes <= 0) return;
    constexpr uintptr_t kPage = 4096, kBlock = uintptr_t(1) << 20;
    // Whole pages from the first one that starts in the range: a page shared with the
    // rows before belongs to the call that covered them (calls go in ascending order).
    uintptr_t b = (reinterpret_cast<uintptr_t>(p) + kPage - 1) & ~(kPage - 1);
    const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes) + kPage - 1) & ~(kPage - 1);
    for (; b < e; b += kBlock) {
      const uintptr_t n = std::min(kBlock, e - b);
      unsigned char resident = 0;
      if (mincore(reinterpret_cast<void*>(b), kPage, &resident) == 0 && (resident & 1)) continue;
      madvise(reinterpret_cast<void*>(b), n, MADV_POPULATE_WRITE);
    }
#else
    (void)p;
    (void)bytes;
#endif
  }

  // dst[0, bytes) = src[0, bytes): streaming stores for the 64-byte-aligned body of dst,
  // plain copies for the unaligned head and tail.
  void write(void* dst, const void* src, int64_t bytes) const {
    char* d = static_cast<char*>(dst);
    const char* s = static_cast<const char*>(src);
#if defined(__AVX512F__) || defined(__AVX__)
    const int64_t head = std::min<int64_t>(bytes, (64 - reinterpret_cast<uintptr_t>(d) % 64) % 64);
    std::memcpy(d, s, head);
    d += head, s += head, bytes -= head;
    for (; bytes >= 64; d += 64, s += 64, bytes -= 64) {
#if defined(__AVX512F__)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(d), _mm512_loadu_si512(s));
#else
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d + 32),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 32)));
#endif
    }
#endif
    std::memcpy(d, s, bytes);
  }

  void fence() const {
#if defined(__x86_64__) || defined(_M_X64)
    if (on) _mm_sfence();
#endif
  }
};

// One thread's output rows: written straight into the tensor, or, when streaming, into a
// scratch row that is then streamed out. fp16/bf16 rows are computed in an acc_t row.
//   scalar_t* r = out.row(dst);  ...write r...;  out.flush(dst);
//   acc_t* a = out.acc_row(dst); ...write a...;  out.finish(dst, a);
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
class RowOut {
 public:
  RowOut(const OutputStream& stream, int64_t n)
      : stream_(stream), n_(n), tmp_(stream.on ? n : 0), acc_(std::is_same_v<scalar_t, acc_t> ? 0 : n) {}

  scalar_t* row(scalar_t* dst) { return stream_.on ? tmp_.data() : dst; }
  acc_t* acc_row(scalar_t* dst) { return row_buffer<scalar_t, acc_t>(row(dst), acc_.data()); }

  void flush(scalar_t* dst) const {
    if (stream_.on) stream_.write(dst, tmp_.data(), n_ * static_cast<int64_t>(sizeof(scalar_t)));
  }
  void finish(scalar_t* dst, const acc_t* acc) {
    store_row<scalar_t, acc_t>(acc, row(dst), n_);
    flush(dst);
  }

 private:
  const OutputStream& stream_;
  int64_t n_;
  std::vector<scalar_t> tmp_;
  std::vector<acc_t> acc_;
};

}  // namespace llmfast::cpu
