// nmfx CPU kernel: y = x @ W^T + bias, W an N:M-sparse [out, in] weight in nmfx's packed format.
//
// Inputs (see nmfx/packed.py for the format, nmfx/inference_ops.py for the op):
//   x       [B, in]  fp32 / bf16 / fp16, contiguous
//   values  [out, K] same dtype, K = in / M * N; kept value k of a row lies in group k / N
//   indices uint8, either [out, K] one in-group position per byte (index_bits = 8), or the stored
//           bit-packed rows [out, ceil(K * b / 8)] (index_bits = b = ceil(log2 M) <= 5), read directly:
//           position of value k = bits [k*b, (k+1)*b) of the row's little-endian bit stream.
//   bias    [out] or undefined
// Column of kept value k:  colbase[k] + position,  colbase[k] = (k / N) * M  (computed once per call).
//
// ISA: chosen at build time (nmfx/kernels/cpu.py detects the host and compiles with explicit flags,
// caching one build per torch version + ISA): AVX-512 (F/BW/VL/DQ, 16 lanes) with or without
// AVX512-BF16, AVX2+FMA (8 lanes), or portable scalar C++. The common code goes through the tiny
// vector layer `V*`; the AVX-512 and AVX512-BF16 paths below use intrinsics directly.
// Accumulation is always fp32; products are exact for bf16 dot products, and bf16/fp16 are otherwise
// widened to fp32 in registers; results are rounded once on store.
//
// Paths, picked by dtype, pattern and batch (gemv_max_batch):
//  * GEMV (small B; path=1 forces it): per output row, 16 kept values at a time; up to 4 batch rows
//    share each decoded index/value vector, and the weights are read once.
//     - permute (AVX-512, patterns with M | 32, M >= 2N, N | 16): the x-elements of 16 kept values
//       come from M/(2N) vpermt2ps over 32-float windows of x in L1 (see gemv_rows_permute);
//     - bf16 dot product (AVX512-BF16, same patterns, index bits <= 4): 32 values at a time, bf16 x
//       permuted with vpermt2w, multiplied by vdpbf16ps, 4 rows of weights prefetched ahead;
//     - gather otherwise (AVX2, 1:32, 3:8, ...): vgatherdps on fp32 x.
//  * Batched: x is packed once into zero-padded batch tiles xT[tile][in][BT]. For each output row
//    and kept value (w, c): acc[0:BT] += w * xT[c, 0:BT], a broadcast multiply-add against
//    contiguous batch lanes, no gather. fp32 tiles (fp32, fp16, bf16 without AVX512-BF16): register
//    tile of RB rows x NV vectors (AVX-512: 8 x 1 ymm for B <= 8, else 8 x 1, 8 x 2 or 4 x 4 zmm). bf16 tiles (AVX512-BF16):
//    kept values in pairs, the pair's x rows interleaved per lane for vdpbf16ps (BT = 16, 32, 64).
//    Each thread owns a range of 16-row output groups and sweeps them once per batch tile, so the
//    xT tile (in*BT*4 bytes fp32, 1 MiB at in=4096/BT=64; half that in bf16) stays in L2 and the
//    weights stream once per tile. Results go through a 16 x BT local buffer and are written
//    transposed as contiguous pieces of y rows.
//  * brgemm (bf16, every build; path=3 forces it): 32-row panels of W decompressed into dense bf16
//    tiles, multiplied by PyTorch's oneDNN micro-kernel at::native::cpublas::brgemm against x packed
//    in VNNI layout (see run_brgemm_bf16). Picked automatically only where brgemm runs on AMX, for
//    B >= brgemm_min_batch(); without AMX it is the dense multiply on AVX512-BF16 and loses (below).
//
// Bounds: the entry point checks every argument itself (devices, ranks, shapes, dtypes, 1 <= N <= M
// <= 32, index_bits = 8 or ceil(log2 M), the indices' width; non-contiguous inputs are copied), and
// rejects indices that store an in-group position >= M before any kernel runs: one scan of the
// indices where such a code is representable (index_bits = 8, or bit-packed with M not a power of
// two, e.g. 5-bit codes 24..31 for M = 24); the stored bit-packed format of a power-of-two M cannot
// hold one, so it is not scanned. Independently, every decoder clamps positions to M - 1 (one min per
// vector; the permute paths read fixed windows of x whatever the positions), so no read leaves x even
// if the indices change during the call.
//
// Index decode: positions come either one per byte (vpmovzxbd) or bit-packed (b = 1..5 bits): for VW
// values starting at a multiple of 8, load the 2b (AVX-512) / b (AVX2) bytes holding them, broadcast
// to every 128-bit lane, vpshufb the two bytes covering each value into its dword, vpsrlvd by the bit
// offset, mask. ~5 instructions per 16 positions; the bit-packed layout costs about the same as bytes
// and reads 3/8 (1:8) of their bytes, so the stored format is what the kernel reads (no decode cache).
//
// Measured (AMD EPYC Zen 4, 2 threads, 4096 x 4096, 1:8; benchmarks/bench_inference.py; "hot" =
// repeated calls with the packed weights in L3, "cold" = interleaved with dense/CSR, weights from DRAM):
//  * B = 1: fp32 permute 0.41-0.45 ms hot, 0.6-0.85 ms cold (the gather path was 0.42-0.52 hot:
//    ~22 cycles per 16-lane vgatherdps); dense F.linear fp32 3.0-3.5 ms (DRAM-bound, 64 MB).
//    bf16 dot product 0.12 ms hot, 0.2-0.38 ms cold (4.75 MB of weights; 0.5 ms before, widening).
//  * B = 2..16, fp32 (one 16-lane tile, 8 rows x 1 zmm): ~0.8 ms, flat in B: bound by per-kept-value
//    work (offset load, broadcast, address, 1 FMA; plus 1/16 of a decode) rather than by FMAs.
//    bf16: the dot-product GEMV costs ~0.085 ms per batch row at 1:8 (1 thread), the 16-lane pairs
//    path ~0.86 ms flat for B = 2..16, so GEMV up to B = 8 (it was 4): see gemv_max_batch.
//  * B >= 32, fp32 (tiles of 64 lanes, 4 rows x 4 zmm): ~36-40 GFLOP/s per core of useful FMAs: bound
//    by L1 refills from L2 -- each broadcast-FMA needs a fresh 64-byte line of xT (kept columns are
//    scattered), and Zen 4 sustains about half a line per cycle from L2. Tried and reverted:
//    K-blocking so an x block stays in L1 (1.2-2x slower: short per-row weight slices, accumulators
//    round-trip). bf16 pairs halve the xT bytes per value: 1.6-1.8x less time than fp32 at B >= 64.
//  * Denser patterns (2:4, 1:4, 2:8) at large batch are FMA/L2-bound at the same ~40 GFLOP/s per core
//    while dense GEMM reaches ~90 per core, so fp32 2:4 wins only 1.6-2.4x and bf16 2:4 loses to
//    dense bf16 at B >= 8.
// Measured later (AMD EPYC family 26 = Zen 5: 48 KiB L1d, 1 MiB L2 per core, avx512_bf16, no AMX;
// 4096 x 4096 1:8, interleaved medians, call order shuffled per repetition; 1 thread as per-thread
// CPU time on a loaded machine unless said otherwise):
//  * B = 3..8, fp32 on AVX-512: 8-lane ymm tiles instead of one half-padded 16-lane zmm tile, a
//    small gain: B = 4 1.09 vs 1.28 ms, B = 8 1.15 vs 1.30 ms in a first run (fixed call order);
//    with the order shuffled per repetition 1.46 vs 1.51 and 1.51 vs 1.62, then 1.41 vs 1.48 and
//    1.36 vs 1.37 (unchanged B = 12, 16 differed by 3-4% in that run: the noise level). torch CSR
//    2.7-3.3 ms at B = 3..16, so 1.9-2.3x CSR at B = 3..32 on 1 thread (B = 2, GEMV: 2.7x). 2 threads,
//    wall, a quiet moment: B = 4 0.68 vs 0.72 ms, B = 8 0.68 vs 0.77 (CSR 1.54, 1.73: 2.28x, 2.54x;
//    before 2.13x, 2.24x), B = 12 / 16 / 32 unchanged at 2.31x / 2.42x / 2.21x CSR. The inner loop
//    (3 loads + 1 FMA per kept value) runs at ~1.5 cycles per value whether xT sits in L1 (in = 512)
//    or L2 (in = 4096), so it is not L2 bandwidth; 16 rows per tile, padded staging rows (L1 banks)
//    and copied fp32 values measured no gain.
//  * brgemm bf16 without AMX (oneDNN on AVX512-BF16): B = 8 4.4 ms (pairs path 0.90, dense bf16
//    2.4), B = 64 6.1 (3.1, 6.2), B = 256 21.4 (12.6, 19.5). The per-call decompression (tile
//    zeroing, scattered stores, x packing, write-back) alone is ~1.4 ms. The dense multiply on the
//    decompressed tiles does all of dense's FLOPs, so even with AMX the path can only beat dense bf16
//    where dense is bound by streaming its weight (small and mid batch), not where AMX dense is
//    compute-bound. Not measured on an AMX CPU.
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <unordered_map>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace nmfx_cpu {

#if defined(__AVX512F__) || defined(__AVX2__)
// NBYTES (8 or 16) bytes of a packed index row from row + byte0 in the low bytes of an xmm,
// zero-filled past `avail` (the bytes readable to the end of the tensor).
template <int NBYTES>
static inline __m128i load_row_bytes(const uint8_t* row, int64_t byte0, int64_t avail) {
  if (byte0 + NBYTES <= avail)
    return NBYTES == 16 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + byte0))
                        : _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + byte0));
  alignas(16) uint8_t tmp[16] = {0};
  std::memcpy(tmp, row + byte0, static_cast<size_t>(std::min<int64_t>(NBYTES, avail - byte0)));
  return _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
}
#endif

// ---------------------------------------------------------------------------------------------
// Vector layer
// ---------------------------------------------------------------------------------------------
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#if defined(__AVX512BF16__)
#define NMFX_ISA "avx512bf16"
#define NMFX_AVX512BF16 1
#else
#define NMFX_ISA "avx512"
#endif
#define NMFX_AVX512 1
constexpr int VW = 16;
// Rows per register tile for NV accumulator vectors per row (RB * NV <= 16 of 32 zmm).
template <int NV> constexpr int rows_per_tile() { return NV <= 2 ? 8 : 4; }
using Vf = __m512;
using Vi = __m512i;
static inline Vf vzero() { return _mm512_setzero_ps(); }
static inline Vf vset1(float a) { return _mm512_set1_ps(a); }
static inline Vf vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, Vf v) { _mm512_storeu_ps(p, v); }
static inline Vf vfma(Vf a, Vf b, Vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline Vi viload(const int32_t* p) { return _mm512_loadu_si512(p); }
static inline Vf vgather(const float* base, Vi idx) { return _mm512_i32gather_ps(idx, base, 4); }
static inline float vsum(Vf v) { return _mm512_reduce_add_ps(v); }
static inline Vf vcvt(const float* p) { return _mm512_loadu_ps(p); }
static inline Vf vcvt(const c10::BFloat16* p) {
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
static inline Vf vcvt(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
static inline Vi vadd_i(Vi a, Vi b) { return _mm512_add_epi32(a, b); }
static inline Vi vmul_i(Vi a, int32_t b) { return _mm512_mullo_epi32(a, _mm512_set1_epi32(b)); }
static inline void vistore(int32_t* p, Vi v) { _mm512_storeu_si512(p, v); }
static inline Vi vmax_u(Vi a, Vi b) { return _mm512_max_epu32(a, b); }
static inline uint32_t vmax_reduce(Vi v) { return _mm512_reduce_max_epu32(v); }
static inline Vi vfirst(Vi v, int64_t cnt) { return _mm512_maskz_mov_epi32(static_cast<__mmask16>((1u << cnt) - 1u), v); }
// In-group positions of VW = 16 kept values k .. k+15 (k a multiple of 16) as int32 lanes: `raw`
// as stored, `positions` clamped to M - 1 (see "Bounds" at the top).
struct Decoder {
  int bits, last;
  __m512i ctl, shift, mask, lastv;
  Decoder(int b, int m) : bits(b), last(m - 1) {
    alignas(64) int32_t c[16], s[16];
    for (int j = 0; j < 16; ++j) {
      const int bo = (j * b) & 127;  // unused when b == 8
      c[j] = (bo >> 3) | ((bo >> 3) + 1) << 8 | 0x80 << 16 | 0x80 << 24;  // bytes [bo/8, bo/8+1, 0, 0]
      s[j] = bo & 7;
    }
    ctl = _mm512_load_si512(c);
    shift = _mm512_load_si512(s);
    mask = _mm512_set1_epi32(b >= 8 ? 0xff : (1 << b) - 1);
    lastv = _mm512_set1_epi32(last);
  }
  // `avail`: bytes readable from `row` (to the end of the tensor).
  inline Vi raw(const uint8_t* row, int64_t avail, int64_t k) const {
    if (bits == 8) return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k)));
    const __m128i src = load_row_bytes<16>(row, k / 8 * bits, avail);
    const __m512i w = _mm512_shuffle_epi8(_mm512_broadcast_i32x4(src), ctl);
    return _mm512_and_si512(_mm512_srlv_epi32(w, shift), mask);
  }
  inline Vi positions(const uint8_t* row, int64_t avail, int64_t k) const {
    return _mm512_min_epu32(raw(row, avail, k), lastv);
  }
};
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define NMFX_ISA "avx2"
constexpr int VW = 8;
// Rows per register tile: RB * NV accumulators + broadcasts within 16 ymm.
template <int NV> constexpr int rows_per_tile() { return NV == 1 ? 8 : NV == 2 ? 4 : 2; }
using Vf = __m256;
using Vi = __m256i;
static inline Vf vzero() { return _mm256_setzero_ps(); }
static inline Vf vset1(float a) { return _mm256_set1_ps(a); }
static inline Vf vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, Vf v) { _mm256_storeu_ps(p, v); }
static inline Vf vfma(Vf a, Vf b, Vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline Vi viload(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
static inline Vf vgather(const float* base, Vi idx) { return _mm256_i32gather_ps(base, idx, 4); }
static inline float vsum(Vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline Vf vcvt(const float* p) { return _mm256_loadu_ps(p); }
static inline Vf vcvt(const c10::BFloat16* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
static inline Vf vcvt(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
static inline Vi vadd_i(Vi a, Vi b) { return _mm256_add_epi32(a, b); }
static inline Vi vmul_i(Vi a, int32_t b) { return _mm256_mullo_epi32(a, _mm256_set1_epi32(b)); }
static inline void vistore(int32_t* p, Vi v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
static inline Vi vmax_u(Vi a, Vi b) { return _mm256_max_epu32(a, b); }
static inline uint32_t vmax_reduce(Vi v) {
  alignas(32) uint32_t l[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(l), v);
  return *std::max_element(l, l + 8);
}
static inline Vi vfirst(Vi v, int64_t cnt) {
  return _mm256_and_si256(v, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(cnt)),
                                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}
// In-group positions of VW = 8 kept values k .. k+7 (k a multiple of 8) as int32 lanes: `raw` as
// stored, `positions` clamped to M - 1.
struct Decoder {
  int bits, last;
  __m256i ctl, shift, mask, lastv;
  Decoder(int b, int m) : bits(b), last(m - 1) {
    alignas(32) int32_t c[8], s[8];
    for (int j = 0; j < 8; ++j) {
      const int bo = (j * b) & 63;
      c[j] = (bo >> 3) | ((bo >> 3) + 1) << 8 | 0x80 << 16 | 0x80 << 24;
      s[j] = bo & 7;
    }
    ctl = _mm256_load_si256(reinterpret_cast<const __m256i*>(c));
    shift = _mm256_load_si256(reinterpret_cast<const __m256i*>(s));
    mask = _mm256_set1_epi32(b >= 8 ? 0xff : (1 << b) - 1);
    lastv = _mm256_set1_epi32(last);
  }
  inline Vi raw(const uint8_t* row, int64_t avail, int64_t k) const {
    if (bits == 8) return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k)));
    const __m128i src = load_row_bytes<8>(row, k / 8 * bits, avail);
    const __m256i w = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(src), ctl);
    return _mm256_and_si256(_mm256_srlv_epi32(w, shift), mask);
  }
  inline Vi positions(const uint8_t* row, int64_t avail, int64_t k) const {
    return _mm256_min_epu32(raw(row, avail, k), lastv);
  }
};
#else
#define NMFX_ISA "scalar"
constexpr int VW = 1;
template <int NV> constexpr int rows_per_tile() { return 4; }
using Vf = float;
using Vi = int32_t;
static inline Vf vzero() { return 0.f; }
static inline Vf vset1(float a) { return a; }
static inline Vf vload(const float* p) { return *p; }
static inline void vstore(float* p, Vf v) { *p = v; }
static inline Vf vfma(Vf a, Vf b, Vf c) { return a * b + c; }
static inline Vi viload(const int32_t* p) { return *p; }
static inline Vf vgather(const float* base, Vi idx) { return base[idx]; }
static inline float vsum(Vf v) { return v; }
template <typename T>
static inline Vf vcvt(const T* p) { return static_cast<float>(*p); }
static inline Vi vadd_i(Vi a, Vi b) { return a + b; }
static inline Vi vmul_i(Vi a, int32_t b) { return a * b; }
static inline void vistore(int32_t* p, Vi v) { *p = v; }
static inline Vi vmax_u(Vi a, Vi b) { return std::max(a, b); }
static inline uint32_t vmax_reduce(Vi v) { return static_cast<uint32_t>(v); }
static inline Vi vfirst(Vi v, int64_t cnt) { return cnt > 0 ? v : 0; }
struct Decoder {
  int bits, last;
  Decoder(int b, int m) : bits(b), last(m - 1) {}
  inline Vi raw(const uint8_t* row, int64_t avail, int64_t k) const {
    if (bits == 8) return row[k];
    const int64_t bp = k * bits, by = bp >> 3;
    uint32_t w = row[by];
    if (by + 1 < avail) w |= static_cast<uint32_t>(row[by + 1]) << 8;
    return static_cast<int32_t>((w >> (bp & 7)) & ((1u << bits) - 1u));
  }
  inline Vi positions(const uint8_t* row, int64_t avail, int64_t k) const { return std::min(raw(row, avail, k), last); }
};
#endif

template <typename T>
static inline float to_f(T v) { return static_cast<float>(v); }

constexpr int CH = 256;            // kept values decoded per chunk
constexpr int kMaxNV = 4;          // widest batch tile, in vectors
constexpr int RG = 16;             // output rows per write-back group in the batched path

// ---------------------------------------------------------------------------------------------
// Index decoding: absolute column (times `mul`) of kept values k0 .. k0+cnt of one row
// (k0 a multiple of VW). Whole vectors through Decoder (pshufb + variable shift), then a scalar tail.
// ---------------------------------------------------------------------------------------------
// Stored position of kept value k of a row, as is.
static inline int32_t raw_position(const uint8_t* row, int64_t avail, int bits, int64_t k) {
  if (bits == 8) return row[k];
  const int64_t bp = k * bits, by = bp >> 3;
  uint32_t w = row[by];
  if (by + 1 < avail) w |= static_cast<uint32_t>(row[by + 1]) << 8;
  return static_cast<int32_t>((w >> (bp & 7)) & ((1u << bits) - 1u));
}

// The same, clamped to `last` = M - 1 so that no column leaves its group (see "Bounds").
static inline int32_t position_scalar(const uint8_t* row, int64_t avail, int bits, int32_t last, int64_t k) {
  return std::min(raw_position(row, avail, bits, k), last);
}

static inline void decode_cols(const Decoder& D, const uint8_t* row, int64_t avail, const int32_t* colbase,
                               int64_t k0, int cnt, int32_t mul, int32_t* out) {
  int i = 0;
  for (; i < cnt && ((k0 + i) % VW) != 0; ++i)  // scalar head up to a vector boundary
    out[i] = (colbase[k0 + i] + position_scalar(row, avail, D.bits, D.last, k0 + i)) * mul;
  for (; i + VW <= cnt; i += VW) {
    Vi c = vadd_i(D.positions(row, avail, k0 + i), viload(colbase + k0 + i));
    if (mul != 1) c = vmul_i(c, mul);
    vistore(out + i, c);
  }
  for (; i < cnt; ++i) out[i] = (colbase[k0 + i] + position_scalar(row, avail, D.bits, D.last, k0 + i)) * mul;
}

// Values k0 .. k0+cnt of a row as fp32: the row itself for fp32, else converted into `buf`.
template <typename T>
static inline const float* values_f32(const T* row, int64_t k0, int cnt, float* buf) {
  if constexpr (std::is_same<T, float>::value) {
    (void)buf;
    return row + k0;
  } else {
    int i = 0;
    for (; i + VW <= cnt; i += VW) vstore(buf + i, vcvt(row + k0 + i));
    for (; i < cnt; ++i) buf[i] = to_f(row[k0 + i]);
    return buf;
  }
}

struct Problem {
  int64_t B, in, out, K, row_bytes;
  int bits, n, m;
  std::vector<int32_t> colbase;
};

// Ask for row `o + ahead`'s values and index bytes now. The permute and bf16 dot-product GEMVs
// stream the weights from DRAM with little work per byte, and a few rows of prefetch keep more
// requests in flight than the hardware prefetcher does (4096x4096 1:8, weights not in cache: bf16
// 0.33 -> 0.2-0.25 ms, fp32 0.53-0.59 -> 0.47-0.52 ms). The gather path measured no gain (1:32).
template <typename T>
static inline void prefetch_row(const Problem& P, const T* vals, const uint8_t* idx, int64_t o, int64_t o1) {
  constexpr int64_t ahead = 4;
  if (o + ahead >= o1) return;
  const char* v = reinterpret_cast<const char*>(vals + (o + ahead) * P.K);
  for (int64_t b = 0; b < P.K * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(v + b);
  const uint8_t* i = idx + (o + ahead) * P.row_bytes;
  for (int64_t b = 0; b < P.row_bytes; b += 64) __builtin_prefetch(i + b);
}


// ---------------------------------------------------------------------------------------------
// GEMV path: rows [o0, o1) of W against NB (<= 4) batch rows of x. One driver, three inner steps
// (gather, permute, bf16 dot product): `step(acc, vrow, irow, avail, k, xs)` adds the STEP kept
// values from k into the NB accumulators, xs pointing SPAN x-elements further per step (0: the step
// addresses x by absolute column). The scalar tail, bias and rounding store are shared.
// ---------------------------------------------------------------------------------------------
template <typename T, typename XE, int NB, int STEP, typename Step>
static void gemv_rows(const Problem& P, const XE* x, const T* vals, const uint8_t* idx, const T* bias,
                      int64_t o0, int64_t o1, T* y, int64_t ldy, int64_t span, bool prefetch, Step step) {
  const int32_t* colbase = P.colbase.data();
  for (int64_t o = o0; o < o1; ++o) {
    if (prefetch) prefetch_row(P, vals, idx, o, o1);
    const T* vrow = vals + o * P.K;
    const uint8_t* irow = idx + o * P.row_bytes;
    const int64_t avail = (P.out - o) * P.row_bytes;
    Vf acc[NB];
    float tail[NB];
    for (int b = 0; b < NB; ++b) { acc[b] = vzero(); tail[b] = 0.f; }
    int64_t k = 0;
    const XE* xs = x;
    for (; k + STEP <= P.K; k += STEP, xs += span) step(acc, vrow, irow, avail, k, xs);
    for (; k < P.K; ++k) {
      const int32_t c = colbase[k] + position_scalar(irow, avail, P.bits, P.m - 1, k);
      const float w = to_f(vrow[k]);
      for (int b = 0; b < NB; ++b) tail[b] += w * to_f(x[b * P.in + c]);
    }
    const float bv = bias ? to_f(bias[o]) : 0.f;
    for (int b = 0; b < NB; ++b) y[b * ldy + o] = static_cast<T>(vsum(acc[b]) + tail[b] + bv);
  }
}

// Calls f(std::integral_constant<int, NB>{}, b0) for the batch rows in blocks of up to 4.
template <typename F>
static inline void for_batch_blocks(int64_t B, F&& f) {
  for (int64_t b0 = 0; b0 < B; b0 += 4) {
    switch (std::min<int64_t>(4, B - b0)) {
      case 1: f(std::integral_constant<int, 1>{}, b0); break;
      case 2: f(std::integral_constant<int, 2>{}, b0); break;
      case 3: f(std::integral_constant<int, 3>{}, b0); break;
      default: f(std::integral_constant<int, 4>{}, b0); break;
    }
  }
}

#if defined(NMFX_AVX512)
// ---------------------------------------------------------------------------------------------
// GEMV path without gathers (AVX-512). The 16 kept values k .. k+15 (k a multiple of 16, N | 16)
// fill 16/N whole groups: their x-elements lie in the S = 16*M/N contiguous floats from
// col0 = k/N*M (a multiple of S). When M divides 32 and M >= 2N, each group lies inside one
// 32-float window of that span and window w serves the consecutive lanes [w*L, (w+1)*L),
// L = 32*N/M. The 16 x-elements are then W = M/(2N) two-register permutes (vpermt2ps on the low
// 5 bits of the column) of x rows that sit in L1, merged by lane masks: for 1:8, 8 loads +
// 4 permutes + 3 blends per 16 values instead of one vgatherdps (~20 cycles on Zen 4).
// ---------------------------------------------------------------------------------------------
template <int W>
static inline __m512 permute_gather(const float* span, __m512i cols) {
  constexpr int L = 16 / W;
  __m512 r = _mm512_permutex2var_ps(_mm512_loadu_ps(span), cols, _mm512_loadu_ps(span + 16));
#pragma GCC unroll 8
  for (int w = 1; w < W; ++w) {
    const __m512 p = _mm512_permutex2var_ps(_mm512_loadu_ps(span + 32 * w), cols, _mm512_loadu_ps(span + 32 * w + 16));
    r = _mm512_mask_mov_ps(r, static_cast<__mmask16>(((1u << L) - 1u) << (w * L)), p);
  }
  return r;
}

// Windows per 16 kept values for the permute path, or 0 when the pattern does not fit it.
static inline int permute_windows(int n, int m) {
  if (16 % n != 0 || 32 % m != 0 || m < 2 * n) return 0;
  const int w = m / (2 * n);
  return w <= 8 ? w : 0;
}

// Calls f(std::integral_constant<int, W>{}) for the window count w (1, 2, 4 or 8).
template <typename F>
static inline void with_windows(int w, F&& f) {
  switch (w) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}
#endif

#if defined(NMFX_AVX512BF16)
// ---------------------------------------------------------------------------------------------
// bf16 GEMV with native dot products (AVX512-BF16): the permute path above on 16-bit lanes. 32 kept
// values k .. k+31 at a time: their bf16 x-elements come from W = M/(2N) 64-element windows by
// vpermt2w (low 6 bits of the column), and vdpbf16ps multiplies them with the 32 bf16 values as
// loaded (adjacent pairs summed into 16 fp32 lanes; products are exact, the sum fp32). Nothing is
// widened, so per value this is half the fp32 permute path's work and reads half its bytes.
// Positions of 32 values at b <= 4 bits fit in 16 bytes: pshufb the two bytes covering each value
// into its 16-bit lane, vpsrlvw by the bit offset, mask. The window offset of lane j,
// (j / N * M) & 63, is the same for every k.
// ---------------------------------------------------------------------------------------------
struct Decoder16 {
  int bits;
  __m512i ctl, shift, mask, offset;
  Decoder16(int b, int n, int m) : bits(b) {
    alignas(64) int8_t c[64];
    alignas(64) int16_t sh[32], off[32];
    for (int j = 0; j < 32; ++j) {
      const int bo = j * (b == 8 ? 8 : b);
      const int lo = bo >> 3, hi = lo + 1;
      c[2 * j] = static_cast<int8_t>(lo);
      c[2 * j + 1] = static_cast<int8_t>(hi < 16 ? hi : 0x80);  // a byte past 16 is never needed
      sh[j] = static_cast<int16_t>(bo & 7);
      off[j] = static_cast<int16_t>((j / n * m) & 63);
    }
    ctl = _mm512_load_si512(c);
    shift = _mm512_load_si512(sh);
    mask = _mm512_set1_epi16(static_cast<int16_t>(b >= 8 ? 0xff : (1 << b) - 1));
    offset = _mm512_load_si512(off);
  }
  static bool fits(int b) { return b <= 4 || b == 8; }
  // Window-relative columns of kept values k .. k+31 (k a multiple of 32) as 16-bit lanes.
  inline __m512i columns(const uint8_t* row, int64_t avail, int64_t k) const {
    __m512i pos;
    if (bits == 8) {
      pos = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k)));
    } else {
      const __m128i src = load_row_bytes<16>(row, k / 8 * bits, avail);
      const __m512i w = _mm512_shuffle_epi8(_mm512_broadcast_i32x4(src), ctl);
      pos = _mm512_and_si512(_mm512_srlv_epi16(w, shift), mask);
    }
    return _mm512_add_epi16(pos, offset);
  }
};

template <int W>
static inline __m512i permute_gather16(const c10::BFloat16* span, __m512i cols) {
  constexpr int L = 32 / W;
  __m512i r = _mm512_permutex2var_epi16(_mm512_loadu_si512(span), cols, _mm512_loadu_si512(span + 32));
#pragma GCC unroll 8
  for (int w = 1; w < W; ++w) {
    const __m512i p = _mm512_permutex2var_epi16(_mm512_loadu_si512(span + 64 * w), cols,
                                                _mm512_loadu_si512(span + 64 * w + 32));
    r = _mm512_mask_mov_epi16(r, static_cast<__mmask32>(((uint64_t(1) << L) - 1u) << (w * L)), p);
  }
  return r;
}

// The bf16 dot-product GEMV for this pattern and index width, if it applies.
static inline bool bf16dp_applies(const Problem& P) {
  return permute_windows(P.n, P.m) > 0 && Decoder16::fits(P.bits);
}

template <int NB>
static void gemv_block_bf16dp(const Problem& P, const c10::BFloat16* x, const c10::BFloat16* vals,
                              const uint8_t* idx, const c10::BFloat16* bias, int64_t o0, int64_t o1,
                              c10::BFloat16* y, int64_t ldy) {
  const Decoder16 D(P.bits, P.n, P.m);
  with_windows(permute_windows(P.n, P.m), [&](auto windows) {
    constexpr int W = decltype(windows)::value;
    gemv_rows<c10::BFloat16, c10::BFloat16, NB, 32>(
        P, x, vals, idx, bias, o0, o1, y, ldy, 32 * P.m / P.n, /*prefetch=*/true,
        [&](__m512* acc, const c10::BFloat16* vrow, const uint8_t* irow, int64_t avail, int64_t k,
            const c10::BFloat16* xs) {
          const __m512i cols = D.columns(irow, avail, k);
          const __m512bh w = (__m512bh)_mm512_loadu_si512(vrow + k);
#pragma GCC unroll 4
          for (int b = 0; b < NB; ++b)
            acc[b] = _mm512_dpbf16_ps(acc[b], w, (__m512bh)permute_gather16<W>(xs + b * P.in, cols));
        });
  });
}
#endif

// Rows [o0, o1) for NB batch rows of fp32 x: the permute path where the pattern fits it, else gathers.
template <typename T, int NB>
static void gemv_block(const Problem& P, const Decoder& D, const float* xf, const T* vals, const uint8_t* idx,
                       const T* bias, int64_t o0, int64_t o1, T* y, int64_t ldy) {
  const int32_t* colbase = P.colbase.data();
#if defined(NMFX_AVX512)
  if (const int windows = permute_windows(P.n, P.m)) {
    return with_windows(windows, [&](auto wtag) {
      constexpr int W = decltype(wtag)::value;
      gemv_rows<T, float, NB, 16>(
          P, xf, vals, idx, bias, o0, o1, y, ldy, 16 * P.m / P.n, /*prefetch=*/true,
          [&](Vf* acc, const T* vrow, const uint8_t* irow, int64_t avail, int64_t k, const float* xs) {
            const Vi cols = vadd_i(D.positions(irow, avail, k), viload(colbase + k));
            const Vf w = vcvt(vrow + k);
#pragma GCC unroll 4
            for (int b = 0; b < NB; ++b) acc[b] = vfma(w, permute_gather<W>(xs + b * P.in, cols), acc[b]);
          });
    });
  }
#endif
  gemv_rows<T, float, NB, VW>(
      P, xf, vals, idx, bias, o0, o1, y, ldy, 0, /*prefetch=*/false,
      [&](Vf* acc, const T* vrow, const uint8_t* irow, int64_t avail, int64_t k, const float* xs) {
        const Vi cols = vadd_i(D.positions(irow, avail, k), viload(colbase + k));
        const Vf w = vcvt(vrow + k);
#pragma GCC unroll 4
        for (int b = 0; b < NB; ++b) acc[b] = vfma(w, vgather(xs + b * P.in, cols), acc[b]);
      });
}

template <typename T>
static void run_gemv(const Problem& P, const T* x, const T* vals, const uint8_t* idx, const T* bias, T* y) {
#if defined(NMFX_AVX512BF16)
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    if (bf16dp_applies(P)) {
      at::parallel_for(0, P.out, 16, [&](int64_t o0, int64_t o1) {
        for_batch_blocks(P.B, [&](auto nb, int64_t b0) {
          gemv_block_bf16dp<decltype(nb)::value>(P, x + b0 * P.in, vals, idx, bias, o0, o1, y + b0 * P.out, P.out);
        });
      });
      return;
    }
  }
#endif
  // x as fp32 rows (a copy only for bf16/fp16; B <= gemv_max_batch() so it is small).
  std::vector<float> xbuf;
  const float* xf;
  if constexpr (std::is_same<T, float>::value) {
    xf = x;
  } else {
    xbuf.resize(static_cast<size_t>(P.B * P.in));
    for (int64_t i = 0; i < P.B * P.in; ++i) xbuf[i] = to_f(x[i]);
    xf = xbuf.data();
  }
  const Decoder D(P.bits, P.m);
  at::parallel_for(0, P.out, 16, [&](int64_t o0, int64_t o1) {
    for_batch_blocks(P.B, [&](auto nb, int64_t b0) {
      gemv_block<T, decltype(nb)::value>(P, D, xf + b0 * P.in, vals, idx, bias, o0, o1, y + b0 * P.out, P.out);
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Batched path: register tile of R rows x NV vectors of L lanes (BT = NV * L batch lanes). L is the
// build's VW, or 8 on AVX-512 builds (ymm; see batched_lanes).
// ---------------------------------------------------------------------------------------------
template <int L> struct Lanes;  // the vector ops of an L-lane fp32 accumulator
template <> struct Lanes<VW> {
  using V = Vf;
  static V zero() { return vzero(); }
  static V set1(float a) { return vset1(a); }
  static V load(const float* p) { return vload(p); }
  static void store(float* p, V v) { vstore(p, v); }
  static V fma(V a, V b, V c) { return vfma(a, b, c); }
};
#if defined(NMFX_AVX512)
template <> struct Lanes<8> {
  using V = __m256;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float a) { return _mm256_set1_ps(a); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
};
#endif

template <typename T, int R, int NV, int L>
static inline void tile_rows(const Problem& P, const Decoder& D, const T* vals, const uint8_t* idx, int64_t avail,
                             const float* xt, float* out) {
  using O = Lanes<L>;
  constexpr int BT = NV * L;
  alignas(64) int32_t ob[R][CH];
  alignas(64) float vb[R][CH];
  typename O::V acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = O::zero();
  for (int64_t k0 = 0; k0 < P.K; k0 += CH) {
    const int cnt = static_cast<int>(std::min<int64_t>(CH, P.K - k0));
    const float* vp[R];
    for (int r = 0; r < R; ++r) {
      decode_cols(D, idx + r * P.row_bytes, avail - r * P.row_bytes, P.colbase.data(), k0, cnt, BT, ob[r]);
      vp[r] = values_f32(vals + r * P.K, k0, cnt, vb[r]);
    }
    for (int i = 0; i < cnt; ++i) {
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const typename O::V w = O::set1(vp[r][i]);
        const float* p = xt + ob[r][i];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = O::fma(w, O::load(p + v * L), acc[r][v]);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) O::store(out + r * BT + v * L, acc[r][v]);
}

// Packs x into zero-padded batch tiles xT[t][c][l] = x[t*BT + l][c] of element type XE, then each
// thread sweeps its 16-row output groups once per tile: `tile(rows_tag, o, xt, out)` computes
// rows o .. o + rows_tag (RB, or 1 at a group's end) into out[row][0:BT]; bias and the transposed,
// rounded store to y are shared.
template <typename XE, int BT, int RB, typename T, typename Tile>
static void sweep_batch_tiles(const Problem& P, const T* x, const T* bias, T* y, Tile tile) {
  const int64_t ntiles = (P.B + BT - 1) / BT;
  at::Tensor xT_t = at::empty({ntiles * P.in * BT},
                              at::TensorOptions().dtype(std::is_same<XE, float>::value ? at::kFloat : at::kBFloat16));
  XE* xT = static_cast<XE*>(xT_t.data_ptr());
  at::parallel_for(0, P.in, 64, [&](int64_t c0, int64_t c1) {
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t lanes = std::min<int64_t>(BT, P.B - t * BT);
      for (int64_t c = c0; c < c1; ++c) {
        XE* d = xT + (t * P.in + c) * BT;
        for (int64_t l = 0; l < lanes; ++l) d[l] = static_cast<XE>(x[(t * BT + l) * P.in + c]);
        for (int64_t l = lanes; l < BT; ++l) d[l] = XE(0.f);
      }
    }
  });
  const int64_t ngroups = (P.out + RG - 1) / RG;
  at::parallel_for(0, ngroups, 1, [&](int64_t g0, int64_t g1) {
    alignas(64) float obuf[RG * BT];
    for (int64_t t = 0; t < ntiles; ++t) {
      const XE* xt = xT + t * P.in * BT;
      const int64_t lanes = std::min<int64_t>(BT, P.B - t * BT);
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t o0 = g * RG;
        const int rows = static_cast<int>(std::min<int64_t>(RG, P.out - o0));
        int r = 0;
        for (; r + RB <= rows; r += RB) tile(std::integral_constant<int, RB>{}, o0 + r, xt, obuf + r * BT);
        for (; r < rows; ++r) tile(std::integral_constant<int, 1>{}, o0 + r, xt, obuf + r * BT);
        float bv[RG];
        for (int rr = 0; rr < rows; ++rr) bv[rr] = bias ? to_f(bias[o0 + rr]) : 0.f;
        for (int64_t l = 0; l < lanes; ++l) {
          T* yrow = y + (t * BT + l) * P.out + o0;
          for (int rr = 0; rr < rows; ++rr) yrow[rr] = static_cast<T>(obuf[rr * BT + l] + bv[rr]);
        }
      }
    }
  });
}

template <typename T, int NV, int L = VW, int RB = rows_per_tile<NV>()>
static void run_batched(const Problem& P, const T* x, const T* vals, const uint8_t* idx, const T* bias, T* y) {
  const Decoder D(P.bits, P.m);
  sweep_batch_tiles<float, NV * L, RB>(P, x, bias, y, [&](auto rows, int64_t o, const float* xt, float* out) {
    tile_rows<T, decltype(rows)::value, NV, L>(P, D, vals + o * P.K, idx + o * P.row_bytes, (P.out - o) * P.row_bytes, xt, out);
  });
}

#if defined(NMFX_AVX512BF16)
// ---------------------------------------------------------------------------------------------
// bf16 batched path with native dot products. x is packed as bf16 batch tiles xT[t][c][0:BT]
// (BT = 16, 32 or 64 lanes; half the bytes of fp32 tiles, so half the L2->L1 traffic that bounds
// the fp32 path). Kept values are taken in pairs (k, k+1) of a row: the pair's two bf16 weights are
// one dword, broadcast; the pair's two xT rows c_k, c_k+1 are interleaved into (x_k, x_k+1) pairs per
// batch lane, and vdpbf16ps adds w_k x_k + w_k+1 x_k+1 into fp32 lanes. An odd last value (K odd)
// pairs with a zero weight and zero x.
// ---------------------------------------------------------------------------------------------
// Stages kept values k0 .. k0+cnt of R rows: their xT offsets (column * BT) into ob and their bf16
// values into vb (copied, because rows K apart can alias one L1 set: K = 2048 bf16 is 4 KiB).
template <int R>
static inline void stage_chunk(const Problem& P, const Decoder& D, const c10::BFloat16* vals, const uint8_t* idx,
                               int64_t avail, int64_t k0, int cnt, int32_t bt, int32_t (*ob)[CH],
                               c10::BFloat16 (*vb)[CH]) {
  for (int r = 0; r < R; ++r) {
    decode_cols(D, idx + r * P.row_bytes, avail - r * P.row_bytes, P.colbase.data(), k0, cnt, bt, ob[r]);
    std::memcpy(vb[r], vals + r * P.K + k0, static_cast<size_t>(cnt) * 2);
  }
}

// The weights of pair (i, i+1) of a staged row as one broadcast dword; i + 1 == cnt pairs with zero.
static inline __m512bh pair_weights(const c10::BFloat16* vrow, int i, int cnt) {
  uint32_t pair;
  if (i + 1 < cnt) {
    std::memcpy(&pair, vrow + i, 4);
  } else {
    uint16_t one;
    std::memcpy(&one, vrow + i, 2);
    pair = one;
  }
  return (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(pair));
}

// 16 batch lanes: the two xT rows of a pair are 16 bf16 each, so one vpermt2w interleaves them in
// natural lane order and one vdpbf16ps consumes the pair (per pair: 2 loads, 1 permute, 1 broadcast,
// 1 dot product).
template <int R>
static inline void tile_rows_bf16dp_16(const Problem& P, const Decoder& D, const c10::BFloat16* vals,
                                       const uint8_t* idx, int64_t avail, const c10::BFloat16* xt, float* out) {
  alignas(64) int32_t ob[R][CH];
  alignas(64) c10::BFloat16 vb[R][CH];
  alignas(64) int16_t il[32];
  for (int j = 0; j < 16; ++j) { il[2 * j] = static_cast<int16_t>(j); il[2 * j + 1] = static_cast<int16_t>(32 + j); }
  const __m512i interleave = _mm512_load_si512(il);
  __m512 acc[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t k0 = 0; k0 < P.K; k0 += CH) {
    const int cnt = static_cast<int>(std::min<int64_t>(CH, P.K - k0));
    stage_chunk<R>(P, D, vals, idx, avail, k0, cnt, 16, ob, vb);
    // Full pairs without per-pair branches; an odd last value (cnt odd) pairs with zero after the loop.
    auto pair = [&](int i, auto last_tag) {
      constexpr bool last = decltype(last_tag)::value;
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512i a = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xt + ob[r][i])));
        const __m512i b = last
            ? zero
            : _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xt + ob[r][i + 1])));
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_permutex2var_epi16(a, interleave, b),
                                  pair_weights(vb[r], i, last ? i + 1 : i + 2));
      }
    };
    const int even = cnt & ~1;
    for (int i = 0; i < even; i += 2) pair(i, std::false_type{});
    if (even < cnt) pair(even, std::true_type{});
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * 16, acc[r]);
}

// 32 or 64 batch lanes (NV zmm of 32 bf16): vpunpck{l,h}wd interleave the pair's two xT rows (per
// pair and 32 lanes: 2 loads, 2 unpacks, 1 broadcast, 2 dot products; fp32 needs 4 loads, 2
// broadcasts, 4 FMAs). unpacklo holds lanes 8q+0..3 of each 128-bit block q, unpackhi lanes
// 8q+4..7; the store undoes that.
template <int R, int NV>
static inline void tile_rows_bf16dp_wide(const Problem& P, const Decoder& D, const c10::BFloat16* vals,
                                         const uint8_t* idx, int64_t avail, const c10::BFloat16* xt, float* out) {
  constexpr int BT = NV * 32;
  alignas(64) int32_t ob[R][CH];
  alignas(64) c10::BFloat16 vb[R][CH];
  __m512 lo[R][NV], hi[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) lo[r][v] = hi[r][v] = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t k0 = 0; k0 < P.K; k0 += CH) {
    const int cnt = static_cast<int>(std::min<int64_t>(CH, P.K - k0));
    stage_chunk<R>(P, D, vals, idx, avail, k0, cnt, BT, ob, vb);
    // Full pairs without per-pair branches; an odd last value (cnt odd) pairs with zero after the loop.
    auto pair = [&](int i, auto last_tag) {
      constexpr bool last = decltype(last_tag)::value;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512bh w = pair_weights(vb[r], i, last ? i + 1 : i + 2);
        const c10::BFloat16* p0 = xt + ob[r][i];
        const c10::BFloat16* p1 = last ? nullptr : xt + ob[r][i + 1];
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) {
          const __m512i a = _mm512_loadu_si512(p0 + 32 * v), b = last ? zero : _mm512_loadu_si512(p1 + 32 * v);
          lo[r][v] = _mm512_dpbf16_ps(lo[r][v], (__m512bh)_mm512_unpacklo_epi16(a, b), w);
          hi[r][v] = _mm512_dpbf16_ps(hi[r][v], (__m512bh)_mm512_unpackhi_epi16(a, b), w);
        }
      }
    };
    const int even = cnt & ~1;
    for (int i = 0; i < even; i += 2) pair(i, std::false_type{});
    if (even < cnt) pair(even, std::true_type{});
  }
  // Batch lane j of a 32-lane vector: block q = j / 8; j % 8 < 4 -> lo[4q + j % 8], else hi[4q + j % 8 - 4].
  alignas(64) int32_t ia[16], ib[16];
  for (int j = 0; j < 16; ++j) {
    const int q0 = j / 8, q1 = 2 + j / 8, e = j % 8;
    ia[j] = e < 4 ? 4 * q0 + e : 16 + 4 * q0 + e - 4;
    ib[j] = e < 4 ? 4 * q1 + e : 16 + 4 * q1 + e - 4;
  }
  const __m512i ka = _mm512_load_si512(ia), kb = _mm512_load_si512(ib);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      _mm512_storeu_ps(out + r * BT + 32 * v, _mm512_permutex2var_ps(lo[r][v], ka, hi[r][v]));
      _mm512_storeu_ps(out + r * BT + 32 * v + 16, _mm512_permutex2var_ps(lo[r][v], kb, hi[r][v]));
    }
}

// R rows against a BT-lane xT tile (BT = 16, 32 or 64).
template <int R, int BT>
static inline void tile_rows_bf16dp(const Problem& P, const Decoder& D, const c10::BFloat16* vals,
                                    const uint8_t* idx, int64_t avail, const c10::BFloat16* xt, float* out) {
  if constexpr (BT == 16)
    tile_rows_bf16dp_16<R>(P, D, vals, idx, avail, xt, out);
  else
    tile_rows_bf16dp_wide<R, BT / 32>(P, D, vals, idx, avail, xt, out);
}

template <int BT>
static void run_batched_bf16dp(const Problem& P, const c10::BFloat16* x, const c10::BFloat16* vals,
                               const uint8_t* idx, const c10::BFloat16* bias, c10::BFloat16* y) {
  const Decoder D(P.bits, P.m);
  constexpr int RB = BT == 16 ? 16 : BT == 32 ? 8 : 4;
  sweep_batch_tiles<c10::BFloat16, BT, RB>(P, x, bias, y, [&](auto rows, int64_t o, const c10::BFloat16* xt, float* out) {
    tile_rows_bf16dp<decltype(rows)::value, BT>(P, D, vals + o * P.K, idx + o * P.row_bytes, (P.out - o) * P.row_bytes,
                                                xt, out);
  });
}
#endif

// ---------------------------------------------------------------------------------------------
// bf16 batched path through PyTorch's oneDNN brgemm micro-kernel (at::native::cpublas::brgemm, the
// one Inductor's CPU GEMM templates call: AMX tile dot products where the CPU has AMX, AVX512-BF16
// otherwise). Each thread decompresses BM = 32 rows of W at a time into a dense bf16 tile A[BM][Kp]
// (zeroed, then each kept value stored at its column; Kp = in rounded up to 64, 256 KiB at in = 4096,
// L2-resident) and multiplies it with x packed once in the VNNI layout brgemm reads for bf16
// (xv[t][k/2][np][2] per batch tile t of up to BN = 64 rows, np = its rows rounded up to 16 for AMX's
// 16-column B tiles; zero for k >= in and padded rows), so C[BM][np] = A @ x_t^T in fp32; the decompressed tile serves every batch tile. Dense work on the decompressed
// tile is the price (N:M zeros are multiplied): it pays only where the dense multiply is much cheaper
// than streaming the dense weight, i.e. with AMX (see gemv_max_batch / dispatch).
// ---------------------------------------------------------------------------------------------
// Whether brgemm can run bf16 in the VNNI layout here: libtorch built with oneDNN's ukernel API, a CPU
// oneDNN runs it on (AVX-512 and up), and oneDNN enabled (torch.backends.mkldnn.enabled). Probed
// once by a 2 x 2 x 2 product checked against its known result; oneDNN disabled answers false
// without probing.
static bool brgemm_bf16_available() {
  if (!at::globalContext().userEnabledMkldnn()) return false;
  static const bool ok = [] {
    try {
      // A = [[1, 2], [3, 4]], B = [[5, 6], [7, 8]] in VNNI pairs ([k/2][n][2]): C = [[19, 22], [43, 50]].
      const c10::BFloat16 a[4] = {1.f, 2.f, 3.f, 4.f}, b[4] = {5.f, 7.f, 6.f, 8.f};
      float c[4] = {0.f, 0.f, 0.f, 0.f};
      at::native::cpublas::brgemm(2, 2, 2, 2, 2, 2, false, a, b, c, true);
      at::native::cpublas::brgemm_release(true);
      return c[0] == 19.f && c[1] == 22.f && c[2] == 43.f && c[3] == 50.f;
    } catch (const std::exception&) {
      return false;
    }
  }();
  return ok;
}

// Whether brgemm would use AMX tiles here (oneDNN's own test: packing B is needed exactly with AMX).
static bool brgemm_bf16_amx() {
  return brgemm_bf16_available() && at::native::cpublas::could_pack(at::kBFloat16);
}

static void run_brgemm_bf16(const Problem& P, const c10::BFloat16* x, const c10::BFloat16* vals, const uint8_t* idx,
                            const c10::BFloat16* bias, c10::BFloat16* y) {
  constexpr int64_t BM = 32, BN = 64;
  const int64_t Kp = (P.in + 63) / 64 * 64;
  const int64_t ntiles = (P.B + BN - 1) / BN;
  // xv: tile t starts at t * Kp * BN; element (k, n) at (k / 2 * np + n) * 2 + k % 2, np = lanes rounded up to 16.
  at::Tensor xv_t = at::empty({ntiles * Kp * BN}, at::TensorOptions().dtype(at::kBFloat16));
  c10::BFloat16* xv = xv_t.data_ptr<c10::BFloat16>();
  at::parallel_for(0, Kp / 2, 32, [&](int64_t q0, int64_t q1) {
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t lanes = std::min<int64_t>(BN, P.B - t * BN), np = (lanes + 15) / 16 * 16;
      c10::BFloat16* d = xv + t * Kp * BN;
      for (int64_t q = q0; q < q1; ++q)
        for (int64_t n = 0; n < np; ++n)
          for (int64_t e = 0; e < 2; ++e) {
            const int64_t k = 2 * q + e;
            d[(q * np + n) * 2 + e] = k < P.in && n < lanes ? x[(t * BN + n) * P.in + k] : c10::BFloat16(0.f);
          }
    }
  });
  const int64_t nblocks = (P.out + BM - 1) / BM;
  at::parallel_for(0, nblocks, 1, [&](int64_t g0, int64_t g1) {
    std::vector<c10::BFloat16> a(static_cast<size_t>(BM * Kp));
    std::vector<int32_t> cols(static_cast<size_t>(P.K));
    std::vector<float> sums(P.n > 1 ? static_cast<size_t>(P.in) : 0, 0.f);
    alignas(64) float c[BM * BN];
    const Decoder D(P.bits, P.m);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t o0 = g * BM;
      const int64_t rows = std::min<int64_t>(BM, P.out - o0);
      std::memset(a.data(), 0, static_cast<size_t>(rows * Kp) * sizeof(c10::BFloat16));
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t o = o0 + r;
        const c10::BFloat16* vrow = vals + o * P.K;
        c10::BFloat16* arow = a.data() + r * Kp;
        for (int64_t k0 = 0; k0 < P.K; k0 += CH)
          decode_cols(D, idx + o * P.row_bytes, (P.out - o) * P.row_bytes, P.colbase.data(), k0,
                      static_cast<int>(std::min<int64_t>(CH, P.K - k0)), 1, cols.data() + k0);
        if (P.n == 1) {
          for (int64_t k = 0; k < P.K; ++k) arow[cols[k]] = vrow[k];
        } else {
          // Kept values of a group may share a position (the reference adds them): sum them in fp32
          // and round once, as the other paths' fp32 accumulation does.
          for (int64_t k = 0; k < P.K; ++k) sums[cols[k]] += to_f(vrow[k]);
          for (int64_t k = 0; k < P.K; ++k) arow[cols[k]] = static_cast<c10::BFloat16>(sums[cols[k]]);
          for (int64_t k = 0; k < P.K; ++k) sums[cols[k]] = 0.f;
        }
      }
      for (int64_t t = 0; t < ntiles; ++t) {
        const int64_t lanes = std::min<int64_t>(BN, P.B - t * BN), np = (lanes + 15) / 16 * 16;
        at::native::cpublas::brgemm(rows, np, Kp, Kp, np, np, false, a.data(), xv + t * Kp * BN, c, true);
        for (int64_t l = 0; l < lanes; ++l) {
          c10::BFloat16* yrow = y + (t * BN + l) * P.out + o0;
          for (int64_t r = 0; r < rows; ++r)
            yrow[r] = static_cast<c10::BFloat16>(c[r * np + l] + (bias ? to_f(bias[o0 + r]) : 0.f));
        }
      }
    }
    at::native::cpublas::brgemm_release(true);
  });
}

// ---------------------------------------------------------------------------------------------
// Bounds: true when some row of `idx` stores a position >= M. Only layouts whose codes can exceed
// M - 1 are scanned (bytes; bit-packed with M not a power of two); bit-packed power-of-two M has no
// invalid code. Bytes: a vectorised byte maximum per row; bit-packed: the decoder's raw positions.
// ---------------------------------------------------------------------------------------------
static bool codes_can_exceed_m(const Problem& P) { return P.bits == 8 || (1 << P.bits) != P.m; }

static bool any_invalid_position(const Problem& P, const uint8_t* idx) {
  std::atomic<bool> bad{false};
  const Decoder D(P.bits, P.m);
  const uint32_t last = static_cast<uint32_t>(P.m - 1);
  at::parallel_for(0, P.out, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, P.row_bytes)), [&](int64_t o0, int64_t o1) {
    uint32_t mx = 0;
    if (P.bits == 8) {
      uint8_t m8 = 0;
      const uint8_t* p = idx + o0 * P.row_bytes;
      const int64_t len = (o1 - o0) * P.row_bytes;
      for (int64_t i = 0; i < len; ++i) m8 = std::max(m8, p[i]);
      mx = m8;
    } else {
      for (int64_t o = o0; o < o1; ++o) {
        const uint8_t* row = idx + o * P.row_bytes;
        const int64_t avail = (P.out - o) * P.row_bytes;
        Vi vm = Vi{};
        int64_t k = 0;
        for (; k + VW <= P.K; k += VW) vm = vmax_u(vm, D.raw(row, avail, k));
        if (k < P.K) vm = vmax_u(vm, vfirst(D.raw(row, avail, k), P.K - k));  // lanes past K: zero
        mx = std::max(mx, vmax_reduce(vm));
      }
    }
    if (mx > last) bad.store(true, std::memory_order_relaxed);
  });
  return bad.load();
}

// Indices tensors already scanned and found valid. A layer passes the same indices buffer on every
// call, so the scan runs once per tensor: an entry matches while that TensorImpl is alive (a weak
// reference) and still has the same data pointer, shape, layout tag and version counter (torch bumps
// it on every in-place write). Writes that bypass the counter (through .numpy() or a raw pointer) are
// not seen; the decoders' clamp still keeps every read inside x. Inference tensors have no version
// counter and are scanned on every call.
class ValidIndices {
 public:
  bool contains(const at::Tensor& t, int64_t tag) {
    if (t.is_inference()) return false;
    std::lock_guard<std::mutex> g(mu_);
    auto it = map_.find(t.unsafeGetTensorImpl());
    if (it == map_.end()) return false;
    const Entry& e = it->second;
    const auto alive = e.impl.lock();
    return alive.get() == t.unsafeGetTensorImpl() && e.data == t.const_data_ptr() && e.tag == tag &&
           e.version == t._version() && e.sizes == t.sizes().vec();
  }
  void insert(const at::Tensor& t, int64_t tag) {
    if (t.is_inference()) return;
    std::lock_guard<std::mutex> g(mu_);
    if (map_.size() >= 4096) map_.clear();  // bounded: a model has far fewer layers
    map_.insert_or_assign(t.unsafeGetTensorImpl(),
                          Entry{c10::weak_intrusive_ptr<c10::TensorImpl>(t.getIntrusivePtr()), t.const_data_ptr(),
                                t._version(), tag, t.sizes().vec()});
  }

 private:
  struct Entry {
    c10::weak_intrusive_ptr<c10::TensorImpl> impl;
    const void* data;
    int64_t version, tag;
    std::vector<int64_t> sizes;
  };
  std::mutex mu_;
  std::unordered_map<const c10::TensorImpl*, Entry> map_;
};

// Largest batch the GEMV path takes (beyond it the batched path wins; see "Measured").
template <typename T>
static int64_t gemv_max_batch(const Problem& P) {
#if defined(NMFX_AVX512BF16)
  // bf16 GEMV cost per batch row grows with the windows W per 32 kept values, the batched path's is
  // flat to B = 16: measured crossovers (AMD EPYC, avx512_bf16, 4096^2, 1 thread) at B ~ 10 for 1:8 (W = 4), ~ 5 for
  // 1:16 (W = 8), ~ 20 for 2:8 and 1:4 (W = 2), ~ 15 for 2:4 (W = 1), hence 32 / W capped at 16.
  if (std::is_same<T, c10::BFloat16>::value && bf16dp_applies(P)) return std::min(16, 32 / permute_windows(P.n, P.m));
#endif
#if defined(NMFX_AVX512)
  if (const int w = permute_windows(P.n, P.m)) return w == 1 ? 4 : 2;
#else
  (void)P;  // only gathers: GEMV for B = 1
#endif
  return 1;
}

// Smallest batch the brgemm path takes when brgemm runs on AMX (never without AMX: on AVX512-BF16
// it does the dense multiply with the same instructions as dense bf16 and loses to the pairs path;
// see "Measured"). Not measured on an AMX CPU: an estimate from the ~0.7 ms (2 threads) per-call
// decompression at 4096^2 against the pairs path's flat ~0.9 ms up to B = 16 on the Xeon.
static int64_t brgemm_min_batch() { return 32; }

template <typename T>
static void dispatch(const Problem& P, const T* x, const T* vals, const uint8_t* idx, const T* bias, T* y,
                     int64_t path) {
  const bool gemv = path == 1 || (path == 0 && P.B <= gemv_max_batch<T>(P));
  if (gemv) return run_gemv<T>(P, x, vals, idx, bias, y);
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    if (path == 3 || (path == 0 && P.B >= brgemm_min_batch() && brgemm_bf16_amx())) {
      TORCH_CHECK_VALUE(brgemm_bf16_available(), "nmfx cpu kernel: path 3 (brgemm) is not available here");
      return run_brgemm_bf16(P, x, vals, idx, bias, y);
    }
  } else {
    TORCH_CHECK_VALUE(path != 3, "nmfx cpu kernel: path 3 (brgemm) is bfloat16-only");
  }
#if defined(NMFX_AVX512BF16)
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    if (P.B <= 16) return run_batched_bf16dp<16>(P, x, vals, idx, bias, y);
    if (P.B <= 32) return run_batched_bf16dp<32>(P, x, vals, idx, bias, y);
    return run_batched_bf16dp<64>(P, x, vals, idx, bias, y);
  }
#endif
  // Batch-tile width: the fewest vectors that cover B (padding waste), at most kMaxNV.
  int64_t nv = std::min<int64_t>(kMaxNV, (P.B + VW - 1) / VW);
  if (nv == 3) nv = 4;  // 4 rows x 3 vectors measured slower than one padded 4-vector tile
  if (path >= 21 && path <= 24) nv = path - 20;  // benchmarking knob: force NV
#if defined(NMFX_AVX512)
  // B <= 8: 8-lane (ymm) tiles, no padded lanes (see "Measured"; path 21 forces the 16-lane tile).
  if (nv == 1 && P.B <= 8 && path < 21) return run_batched<T, 1, 8>(P, x, vals, idx, bias, y);
#endif
  switch (nv) {
    case 1: return run_batched<T, 1>(P, x, vals, idx, bias, y);
    case 2: return run_batched<T, 2>(P, x, vals, idx, bias, y);
    case 3: return run_batched<T, 3>(P, x, vals, idx, bias, y);
    default: return run_batched<T, 4>(P, x, vals, idx, bias, y);
  }
}

// path: 0 = auto by batch size, 1 = force GEMV/gather path, 2 = force batched path (for tests).
at::Tensor nm_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                     const c10::optional<at::Tensor>& bias, int64_t n, int64_t m, int64_t index_bits,
                     int64_t path) {
  // Every argument is checked here (whoever calls): no read below leaves x, values, indices or bias.
  TORCH_CHECK_VALUE(x.device().is_cpu() && values.device().is_cpu() && indices.device().is_cpu() &&
                  !(bias.has_value() && bias->defined() && !bias->device().is_cpu()),
              "nmfx cpu kernel: tensors must be on the CPU");
  TORCH_CHECK_VALUE(!x.is_sparse() && !values.is_sparse() && !indices.is_sparse(), "nmfx cpu kernel: dense tensors only");
  TORCH_CHECK_VALUE(values.dim() == 2, "nmfx cpu kernel: values must be [out, K], got ", values.dim(), " dimensions");
  TORCH_CHECK_VALUE(indices.scalar_type() == at::kByte && indices.dim() == 2,
              "nmfx cpu kernel: indices must be uint8 [out, row_bytes], got ", indices.scalar_type(), " with ",
              indices.dim(), " dimensions");
  TORCH_CHECK_VALUE(x.scalar_type() == values.scalar_type(), "nmfx cpu kernel: x and values must share a dtype, got ",
              x.scalar_type(), " and ", values.scalar_type());
  TORCH_CHECK_VALUE(n >= 1 && m >= n && m <= 32, "nmfx cpu kernel: need 1 <= N <= M <= 32, got ", n, ":", m);
  int64_t want_bits = 1;  // ceil(log2 M), at least 1 (nmfx.packed.index_bits)
  while ((int64_t(1) << want_bits) < m) ++want_bits;
  TORCH_CHECK_VALUE(index_bits == 8 || index_bits == want_bits, "nmfx cpu kernel: index_bits must be 8 or ", want_bits,
              " for M=", m, ", got ", index_bits);
  Problem P;
  P.out = values.size(0);
  P.K = values.size(1);
  P.n = static_cast<int>(n);
  P.m = static_cast<int>(m);
  P.bits = static_cast<int>(index_bits);
  TORCH_CHECK_VALUE(P.K % n == 0, "nmfx cpu kernel: values.size(1) = ", P.K, " must be a multiple of N = ", n);
  P.in = P.K / n * m;
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == P.in, "nmfx cpu kernel: x must be [..., ", P.in,
              "] (in_features = K / N * M), got ", x.sizes());
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "nmfx cpu kernel supports float32, bfloat16, float16; got ", x.scalar_type());
  P.row_bytes = index_bits == 8 ? P.K : (P.K * index_bits + 7) / 8;
  TORCH_CHECK_VALUE(indices.size(0) == P.out && indices.size(1) == P.row_bytes, "nmfx cpu kernel: indices must be [",
              P.out, ", ", P.row_bytes, "] for index_bits=", index_bits, " and K=", P.K, ", got ", indices.sizes());
  TORCH_CHECK_VALUE(P.in < (int64_t(1) << 31) / 64, "nmfx cpu kernel: in_features too large");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == P.out && bias->scalar_type() == x.scalar_type(),
                "nmfx cpu kernel: bias must be [", P.out, "] of x's dtype, got ", bias->scalar_type(), " ",
                bias->sizes());
  // Non-contiguous inputs are copied; every pointer below addresses a dense, contiguous tensor.
  const at::Tensor ix = indices.contiguous();
  const uint8_t* ip = ix.const_data_ptr<uint8_t>();
  static ValidIndices valid_indices;
  const int64_t tag = (n << 16) | (m << 8) | index_bits;
  if (codes_can_exceed_m(P) && !valid_indices.contains(ix, tag)) {
    if (any_invalid_position(P, ip)) {  // error path: name the first one
      for (int64_t o = 0; o < P.out; ++o)
        for (int64_t k = 0; k < P.K; ++k) {
          const int32_t pos = raw_position(ip + o * P.row_bytes, (P.out - o) * P.row_bytes, P.bits, k);
          TORCH_CHECK_VALUE(pos < m, "nmfx cpu kernel: indices hold in-group position ", pos, " >= M=", m, " (row ",
                            o, ", kept value ", k, "); the packed weight is corrupted or does not match its ", n,
                            ":", m, " pattern");
        }
    }
    valid_indices.insert(ix, tag);
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = P.out;
  at::Tensor x2 = x.reshape({-1, P.in}).contiguous();
  P.B = x2.size(0);
  at::Tensor y = at::empty({P.B, P.out}, x.options());
  if (P.B == 0 || P.out == 0) return y.reshape(out_shape);
  if (P.K == 0) {
    y.zero_();
    if (has_bias) y.add_(*bias);
    return y.reshape(out_shape);
  }
  const at::Tensor v = values.contiguous();
  const at::Tensor bs = has_bias ? bias->contiguous() : at::Tensor();
  P.colbase.resize(static_cast<size_t>(P.K));
  for (int64_t k = 0; k < P.K; ++k) P.colbase[k] = static_cast<int32_t>(k / n * m);
  switch (x.scalar_type()) {
#define NMFX_CASE(ST, T)                                                                                  \
  case ST:                                                                                                \
    dispatch<T>(P, x2.const_data_ptr<T>(), v.const_data_ptr<T>(), ip, bs.defined() ? bs.const_data_ptr<T>() : nullptr, \
                y.data_ptr<T>(), path);                                                                   \
    break;
    NMFX_CASE(at::kFloat, float)
    NMFX_CASE(at::kBFloat16, c10::BFloat16)
    NMFX_CASE(at::kHalf, c10::Half)
#undef NMFX_CASE
    default:
      TORCH_CHECK_VALUE(false, "nmfx cpu kernel supports float32, bfloat16, float16; got ", x.scalar_type());
  }
  return y.reshape(out_shape);
}

std::string isa() { return NMFX_ISA; }

// torch.ops.nmfx.nm_linear for the CPU dispatch key (the schema is defined in nmfx/inference_ops.py;
// registered when this library is loaded), so an eager call on CPU tensors runs no Python. Arguments
// this kernel refuses go to the op's Python implementation through the private op
// nmfx::_nm_linear_python (same schema), so that the error is the op's own ValueError wording (for a
// stored position >= M the Python implementation calls this kernel again, which raises its message).
at::Tensor nm_linear_op_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                            const c10::optional<at::Tensor>& bias, int64_t n, int64_t m, int64_t index_bits) {
  try {
    return nm_linear(x, values, indices, bias, n, m, index_bits, 0);
  } catch (const c10::ValueError&) {
    // refused: let the Python implementation word the error (below)
  }
  static const auto python_impl =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("nmfx::_nm_linear_python", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                            c10::SymInt, c10::SymInt, c10::SymInt)>();
  return python_impl.call(x, values, indices, bias, c10::SymInt(n), c10::SymInt(m), c10::SymInt(index_bits));
}

at::Tensor nm_mask(const at::Tensor& w, int64_t n, int64_t m);  // nm_mask_cpu.cpp

}  // namespace nmfx_cpu

TORCH_LIBRARY_IMPL(nmfx, CPU, lib) { lib.impl("nm_linear", &nmfx_cpu::nm_linear_op_cpu); }
// No backward (inference only): for CPU tensors, libtorch's C++ "not implemented" autograd kernel (a
// backward through the result raises; nothing extra when no input requires grad), in place of the
// Python one registered for the Autograd alias key in nmfx/inference_ops.py, so grad mode costs no
// Python either.
TORCH_LIBRARY_IMPL(nmfx, AutogradCPU, lib) {
  lib.impl("nm_linear", torch::autograd::autogradNotImplementedFallback());
  lib.impl("_nm_linear_python", torch::autograd::autogradNotImplementedFallback());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("nm_linear", &nmfx_cpu::nm_linear, "N:M sparse linear (packed weight), CPU",
          pybind11::arg("x"), pybind11::arg("values"), pybind11::arg("indices"), pybind11::arg("bias"),
          pybind11::arg("n"), pybind11::arg("m"), pybind11::arg("index_bits"), pybind11::arg("path") = 0);
  mod.def("isa", &nmfx_cpu::isa, "instruction set the extension was compiled for");
  mod.def("brgemm_bf16", []() { return nmfx_cpu::brgemm_bf16_available(); },
          "whether the bf16 brgemm path (path=3) can run here");
  mod.def("brgemm_bf16_amx", []() { return nmfx_cpu::brgemm_bf16_amx(); },
          "whether the bf16 brgemm path runs on AMX here (and is then picked for batches >= 32)");
  mod.def("nm_mask", &nmfx_cpu::nm_mask, "N:M mask along the last dimension (largest |w|), CPU",
          pybind11::arg("w"), pybind11::arg("n"), pybind11::arg("m"));
}
