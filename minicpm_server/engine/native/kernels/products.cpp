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
// Each task is a tile of 4 outputs (4 weight rows). Rows go through it a group at a time: 3 rows
// with AVX2 (12 accumulators, 3 inputs and one weight vector fill its 16 registers), 6 with
// AVX-512 (24 + 6 + 1 of its 32). Outputs are shared between OpenMP threads in contiguous
// ranges, and each thread walks its range in blocks of about 1 MB of weights: every row group
// passes over a whole block while it sits in the core's L2 cache, so a long prompt's inputs
// are read from the caches once per block instead of once per tile (at 512 rows, one pass per
// tile re-read 0.8 GB of inputs per product). Each output is summed by one thread, in one
// order, so the result does not depend on the thread count, the blocks, or the other rows in
// the batch.
//
// Compiled twice by kernels/__init__.py: for AVX2 and FMA (-mavx2 -mfma: 8 lanes), and, where
// the CPU has it, for AVX-512 (-DMINICPM_AVX512 -mavx512f -mavx512bw -mavx512vl -mavx512dq:
// 16 lanes, twice the arithmetic per instruction). `in` must be a multiple of 8 in both; with
// 16 lanes a row's last 8 inputs, where `in` is an odd multiple of 8, go through a masked step.
// The two builds sum in different orders (8 or 16 partial sums), so their results differ in the
// last bits; one process uses one of them.

#include <omp.h>

#include "vectors.h"

#include <algorithm>
#include <cstdint>

namespace {

using namespace minicpm;

constexpr long PREFETCH_AHEAD = 1024;  // bytes ahead of the tiled block being read (measured: 512-2048 alike)

// OUTS weight rows against ROWS input rows: OUTS x ROWS dot products over inputs [from, to) of
// `in`. `w`: the tile's first weight; TILED: the tile is laid out in blocks (OUTS is then 4),
// else in rows. A product taken in pieces of the inputs keeps its partial sums, whole vectors,
// in `carry` between pieces (OUTS x ROWS of them), so every lane adds the same terms in the
// same order as in one piece: the result is the same to the bit.
template <class W, int OUTS, int ROWS, bool TILED>
inline __attribute__((always_inline)) void tile(const typename W::Weight* w, long in, const float* x, float* y,
                                                long ldy, const float* scale, long from, long to, Vec* carry) {
  Vec acc[OUTS][ROWS];
#pragma GCC unroll 4
  for (int o = 0; o < OUTS; ++o)
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) acc[o][r] = from == 0 ? zero() : carry[o * ROWS + r];
  // LANES inputs of every row against the same LANES of each output, `stride` weights apart
  auto step = [&](const typename W::Weight* wi, long stride, long i) __attribute__((always_inline)) {
    Vec xv[ROWS];
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) xv[r] = Float32::load(x + r * in + i);
#pragma GCC unroll 4
    for (int o = 0; o < OUTS; ++o) {
      Vec wv = W::load(wi + o * stride);
#pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r) acc[o][r] = fmadd(wv, xv[r], acc[o][r]);
    }
  };
  if constexpr (TILED) {  // `from` and `to` are multiples of BLOCK, and BLOCK of LANES
    constexpr long BLOCK = W::BLOCK;
    for (long b = from; b < to; b += BLOCK) {
      const typename W::Weight* block = w + b * OUTS;
      const char* ahead = reinterpret_cast<const char*>(block) + PREFETCH_AHEAD;
#pragma GCC unroll 8
      for (long line = 0; line < long(OUTS * BLOCK * sizeof(*block)); line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
#pragma GCC unroll 8
      for (long k = 0; k < BLOCK; k += LANES) step(block + k, BLOCK, b + k);  // constant offsets in a block
    }
  } else {
    long i = from;
#if defined(MINICPM_AVX512)
    // a step reads one cache line of each weight row: fetch the line 1 KB ahead of it too
    // (1.03-1.10x at 16-512 rows on a 2-core Xeon; the AVX2 build measured none on Zen 3)
    for (; i + LANES <= to; i += LANES) {
#pragma GCC unroll 4
      for (int o = 0; o < OUTS; ++o)
        _mm_prefetch(reinterpret_cast<const char*>(w + o * in + i) + PREFETCH_AHEAD, _MM_HINT_T0);
      step(w + i, in, i);
    }
#else
    for (; i + LANES <= to; i += LANES) step(w + i, in, i);
#endif
    if (i < to) {  // AVX-512 only: the last 8 inputs, the other lanes zero
      Vec xv[ROWS];
#pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r) xv[r] = Float32::load_half(x + r * in + i);
#pragma GCC unroll 4
      for (int o = 0; o < OUTS; ++o) {
        Vec wv = W::load_half(w + o * in + i);
#pragma GCC unroll 8
        for (int r = 0; r < ROWS; ++r) acc[o][r] = fmadd(wv, xv[r], acc[o][r]);
      }
    }
  }
  if (to < in) {
#pragma GCC unroll 4
    for (int o = 0; o < OUTS; ++o)
#pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r) carry[o * ROWS + r] = acc[o][r];
    return;
  }
#pragma GCC unroll 4
  for (int o = 0; o < OUTS; ++o) {
    const float s = scale ? scale[o] : 1.0f;
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) y[r * ldy + o] = horizontal_sum(acc[o][r]) * s;
  }
}

// How many rows the next group takes, of `left`: GROUP at a time; with AVX2's groups of 3, the
// last 4 as 2 + 2 (measured faster than 3 + 1 at 4 rows).
inline int group_size(long left) {
  if (GROUP == 3 && left == 4) return 2;
  return int(std::min<long>(left, GROUP));
}

// One group of `rows` input rows (1..GROUP) against OUTS weight rows, inputs [from, to).
template <class W, int OUTS, bool TILED>
inline void group(const typename W::Weight* w, long in, const float* x, int rows, float* y, long ldy,
                  const float* scale, long from, long to, Vec* carry) {
  switch (rows) {
    case 1: return tile<W, OUTS, 1, TILED>(w, in, x, y, ldy, scale, from, to, carry);
    case 2: return tile<W, OUTS, 2, TILED>(w, in, x, y, ldy, scale, from, to, carry);
    case 3: return tile<W, OUTS, 3, TILED>(w, in, x, y, ldy, scale, from, to, carry);
#if defined(MINICPM_AVX512)
    case 4: return tile<W, OUTS, 4, TILED>(w, in, x, y, ldy, scale, from, to, carry);
    case 5: return tile<W, OUTS, 5, TILED>(w, in, x, y, ldy, scale, from, to, carry);
    case 6: return tile<W, OUTS, 6, TILED>(w, in, x, y, ldy, scale, from, to, carry);
#endif
  }
}

// Weights a thread keeps in its L2 cache while the row groups pass over them, once the inputs
// are too many to stay in the cache themselves (a prompt); below that each tile takes every row
// group in turn while its 4 weight rows sit in L1.
constexpr long BLOCK_BYTES = 1L << 20;
// In blocks, inputs are taken PIECE at a time (a multiple of every BLOCK), so that a group's
// piece of the inputs (6 rows: 24 KB) stays in L1 while the block's tiles pass over it (at 512
// rows 1.07x; with one tile at a time, 16-32 rows, pieces measured 0.97x, so they are not used).
constexpr long PIECE = 1024;
constexpr long MAX_BLOCK_TILES = 64;

// Tiles [first, last) of 4 outputs each (the tail past `out` one output at a time), in blocks
// of about BLOCK_BYTES; every row group passes over a block before the next block. A tile's
// weights start at the same place in both layouts (4 outputs x `in` weights before it); tiled
// weights have `out` a multiple of 4 and `in` of W::BLOCK (checked by the caller).
template <class W, bool TILED>
void tiles(const float* x, long rows, long in, const typename W::Weight* w, const float* scales, long out, float* y,
           long ldy, long first, long last) {
  const long tile_bytes = 4 * in * long(sizeof(typename W::Weight));
  const bool inputs_fit = rows * in * long(sizeof(float)) <= BLOCK_BYTES;
  const long per_block = inputs_fit ? 1 : std::clamp(BLOCK_BYTES / tile_bytes, 1L, MAX_BLOCK_TILES);
  const long piece = inputs_fit ? in : PIECE;
  alignas(64) Vec carry[MAX_BLOCK_TILES * 4 * GROUP];
  for (long start = first; start < last; start += per_block) {
    const long end = std::min(last, start + per_block);
    for (long r = 0; r < rows;) {
      const int n = group_size(rows - r);
      for (long from = 0; from < in; from += piece) {
        const long to = std::min(in, from + piece);
        for (long t = start; t < end; ++t) {
          const long o = t * 4;
          Vec* kept = carry + (t - start) * 4 * GROUP;
          if (o + 4 <= out) {
            group<W, 4, TILED>(w + o * in, in, x + r * in, n, y + r * ldy + o, ldy, scales ? scales + o : nullptr,
                               from, to, kept);
          } else {  // the last outputs when `out` is not a multiple of 4 (MiniCPM's vocabulary: 122,753)
            for (long k = o; k < out; ++k)
              group<W, 1, false>(w + k * in, in, x + r * in, n, y + r * ldy + k, ldy, scales ? scales + k : nullptr,
                                 from, to, kept + (k - o) * GROUP);
          }
        }
      }
      r += n;
    }
  }
}

template <class W, bool TILED>
void product(const float* x, long rows, long in, const typename W::Weight* w, const float* scales, long out,
             float* y, long ldy, int threads) {
  const long count = (out + 3) / 4;
#pragma omp parallel num_threads(threads)
  {
    // contiguous ranges, as schedule(static) would give them
    const long team = omp_get_num_threads(), me = omp_get_thread_num();
    const long share = count / team, extra = count % team;
    const long first = me * share + std::min(me, extra);
    const long last = first + share + (me < extra ? 1 : 0);
    tiles<W, TILED>(x, rows, in, w, scales, out, y, ldy, first, last);
  }
}

}  // namespace

extern "C" {

int minicpm_products_version() { return 6; }

// 8 (AVX2) or 16 (AVX-512): which build this is.
long minicpm_lanes() { return LANES; }

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
