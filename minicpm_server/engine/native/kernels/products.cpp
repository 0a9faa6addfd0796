// Matrix products for the native engine's decode step on x86-64 CPUs with AVX2 and FMA.
//
// y[r, o] = scale[o] * sum_i x[r, i] * W[o, i]: x is float32 [rows, in], W is [out, in] as
// checkpoints store it (float32, bfloat16, or int8 with a float32 scale per output), y is
// float32 [rows, out] with rows `ldy` apart. Every weight is read once per call and widened to float32 in registers,
// so the product runs at the memory's speed for a few rows: a decode step is nearly all
// products, and at one row it is bound by how fast the weights stream in.
//
// Weights come in two layouts. Rows: [out, in] as stored. Tiled (bfloat16 and int8, made by
// kernels.tiled()): [out / 4, in / BLOCK, 4, BLOCK], so a tile's 4 weight rows are read as one
// stream, BLOCK weights (one 64-byte cache line) of each output in turn. At one row the tiled
// layout measured 1.09x (bfloat16) and 1.38x (int8) the speed of rows, where the rows' short
// streams (2.3 KB per int8 row) defeat the hardware prefetcher; float32 rows are long enough.
// Both layouts sum in the same order, so their results are bit-identical. A tiled stream is also
// prefetched 1 KB ahead (4 blocks of a tile), which the hardware prefetcher does not do across
// its 4 KB page boundaries: 1.12-1.13x at one row on the full-size shapes, level at 16 rows
// (there the products are bound by arithmetic).
//
// Each task is a tile of 4 outputs (4 weight rows). Rows go through it 3 at a time (12
// accumulators, 3 inputs and one weight vector fill the 16 AVX2 registers); the weight rows
// stay in the core's cache while the row groups pass over them. Outputs are shared between
// OpenMP threads in contiguous ranges; each output is summed by one thread, in one order, so
// the result does not depend on the thread count or on the other rows in the batch.
//
// Built once by kernels/build.py (g++ -O3 -mavx2 -mfma -fopenmp); `in` must be a multiple of 8.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace {

struct Float32 {
  using Weight = float;
  static constexpr long BLOCK = 16;
  static inline __m256 load(const float* p) { return _mm256_loadu_ps(p); }
};

struct BFloat16 {  // the upper half of a float32: widening is a 16-bit shift
  using Weight = uint16_t;
  static constexpr long BLOCK = 32;
  static inline __m256 load(const uint16_t* p) {
    __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
  }
};

struct Int8 {
  using Weight = int8_t;
  static constexpr long BLOCK = 64;
  static inline __m256 load(const int8_t* p) {
    __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
  }
};

constexpr long PREFETCH_AHEAD = 1024;  // bytes ahead of the tiled block being read (measured: 512-2048 alike)

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// OUTS weight rows against ROWS input rows: OUTS x ROWS dot products of length `in`. `w`: the
// tile's first weight; TILED: the tile is laid out in blocks (OUTS is then 4), else in rows.
template <class W, int OUTS, int ROWS, bool TILED>
inline __attribute__((always_inline)) void tile(const typename W::Weight* w, long in, const float* x, float* y,
                                                long ldy, const float* scale) {
  __m256 acc[OUTS][ROWS];
#pragma GCC unroll 4
  for (int o = 0; o < OUTS; ++o)
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) acc[o][r] = _mm256_setzero_ps();
  // 8 inputs of every row against the same 8 of each output, `stride` weights apart
  auto step = [&](const typename W::Weight* wi, long stride, long i) __attribute__((always_inline)) {
    __m256 xv[ROWS];
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) xv[r] = _mm256_loadu_ps(x + r * in + i);
#pragma GCC unroll 4
    for (int o = 0; o < OUTS; ++o) {
      __m256 wv = W::load(wi + o * stride);
#pragma GCC unroll 4
      for (int r = 0; r < ROWS; ++r) acc[o][r] = _mm256_fmadd_ps(wv, xv[r], acc[o][r]);
    }
  };
  if constexpr (TILED) {
    constexpr long BLOCK = W::BLOCK;
    for (long b = 0; b < in; b += BLOCK) {
      const typename W::Weight* block = w + b * OUTS;
      const char* ahead = reinterpret_cast<const char*>(block) + PREFETCH_AHEAD;
#pragma GCC unroll 8
      for (long line = 0; line < long(OUTS * BLOCK * sizeof(*block)); line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
#pragma GCC unroll 8
      for (long k = 0; k < BLOCK; k += 8) step(block + k, BLOCK, b + k);  // constant offsets in a block
    }
  } else {
    for (long i = 0; i < in; i += 8) step(w + i, in, i);
  }
#pragma GCC unroll 4
  for (int o = 0; o < OUTS; ++o) {
    const float s = scale ? scale[o] : 1.0f;
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) y[r * ldy + o] = horizontal_sum(acc[o][r]) * s;
  }
}

// Every input row against OUTS weight rows: groups of 3 rows, the last 4 as 2 + 2 (measured
// faster than 3 + 1 at 4 rows).
template <class W, int OUTS, bool TILED = false>
inline void all_rows(const typename W::Weight* w, long in, const float* x, long rows, float* y, long ldy,
                     const float* scale) {
  long r = 0;
  for (; rows - r >= 3 && rows - r != 4; r += 3)
    tile<W, OUTS, 3, TILED>(w, in, x + r * in, y + r * ldy, ldy, scale);
  for (; rows - r >= 2; r += 2) tile<W, OUTS, 2, TILED>(w, in, x + r * in, y + r * ldy, ldy, scale);
  if (r < rows) tile<W, OUTS, 1, TILED>(w, in, x + r * in, y + r * ldy, ldy, scale);
}

// A tile's weights start at the same place in both layouts (4 outputs x `in` weights before it);
// tiled weights have `out` a multiple of 4 and `in` of W::BLOCK (checked by the caller).
template <class W, bool TILED>
void product(const float* x, long rows, long in, const typename W::Weight* w, const float* scales, long out,
             float* y, long ldy, int threads) {
  const long tiles = (out + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (long t = 0; t < tiles; ++t) {
    const long o = t * 4;
    if (o + 4 <= out) {
      all_rows<W, 4, TILED>(w + o * in, in, x, rows, y + o, ldy, scales ? scales + o : nullptr);
    } else {  // the last outputs when `out` is not a multiple of 4 (MiniCPM's vocabulary: 122,753)
      for (long k = o; k < out; ++k) all_rows<W, 1>(w + k * in, in, x, rows, y + k, ldy, scales ? scales + k : nullptr);
    }
  }
}

}  // namespace

extern "C" {

int minicpm_products_version() { return 5; }

// The block of the tiled layout for bfloat16 and int8 weights (kernels/__init__.py checks it).
long minicpm_tile_block_bf16() { return BFloat16::BLOCK; }
long minicpm_tile_block_int8() { return Int8::BLOCK; }

// `tiled`: the weights are in the tiled layout (bfloat16 and int8 only). `ldy`: the distance between y's rows (outputs of several products side by side in one
// tensor). `threads`: PyTorch's intra-op thread count, passed on each call because OpenMP's own
// default is per calling thread, and the engine computes on a thread of its own.
void minicpm_product_f32(const float* x, long rows, long in, const float* w, long out, float* y, long ldy,
                         int threads) {
  product<Float32, false>(x, rows, in, w, nullptr, out, y, ldy, threads);
}

void minicpm_product_bf16(const float* x, long rows, long in, const uint16_t* w, int tiled, long out, float* y,
                          long ldy, int threads) {
  if (tiled)
    product<BFloat16, true>(x, rows, in, w, nullptr, out, y, ldy, threads);
  else
    product<BFloat16, false>(x, rows, in, w, nullptr, out, y, ldy, threads);
}

void minicpm_product_int8(const float* x, long rows, long in, const int8_t* w, int tiled, const float* scales,
                          long out, float* y, long ldy, int threads) {
  if (tiled)
    product<Int8, true>(x, rows, in, w, scales, out, y, ldy, threads);
  else
    product<Int8, false>(x, rows, in, w, scales, out, y, ldy, threads);
}

}  // extern "C"
