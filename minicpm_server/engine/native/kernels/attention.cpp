// Attention for one decode step, read straight from the paged KV pool.
//
// Each row has one query per head and attends to its first `visible[r]` cached tokens, which
// sit in the blocks its block table names (`blocks[r, t / block_size]`, slot t % block_size).
// The lean decoder used to gather every row's blocks into a dense copy (index_select) and run
// PyTorch's attention on it: at 32 rows of 64 tokens on MiniCPM-2B's shape that copied 1.5 GB a
// step, 0.36 s of a 2.2 s step. Here each (row, KV head) is one task: its queries' scores
// against every visible key, a softmax, and the weighted sum of the values, reading each key
// and value once, where they are.
//
// q and out: float32 [rows, q_heads, dim]; keys and values: one layer's pool, [slots, kv_heads,
// dim], float32 or bfloat16; the q_heads / kv_heads query heads of a group share a KV head.
// `dim` must be a multiple of 8 and at most MAX_DIM. A row's result does not depend on the
// other rows or on the thread count.

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "vectors.h"

namespace {

using namespace minicpm;

constexpr long MAX_DIM = 256;
constexpr long MAX_VECS = MAX_DIM / LANES + 1;

// LANES values at i of a head's `dim`, or the last 8 (AVX-512, dim an odd multiple of 8).
template <class T>
inline Vec load_part(const typename T::Weight* p, long i, long dim) {
  return i + LANES <= dim ? T::load(p + i) : T::load_half(p + i);
}

template <class KV>
void attend(const float* q, long rows, long q_heads, long kv_heads, long dim, const typename KV::Weight* keys,
            const typename KV::Weight* values, const int64_t* blocks, long width, long block_size,
            const int64_t* visible, float scale, float* out, int threads) {
  const long group = q_heads / kv_heads;
  const long vecs = (dim + LANES - 1) / LANES;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scores;
#pragma omp for schedule(static)
    for (long task = 0; task < rows * kv_heads; ++task) {
      const long r = task / kv_heads, h = task % kv_heads;
      const long count = visible[r];
      scores.resize(size_t(count));
      const int64_t* table = blocks + r * width;
      for (long g = 0; g < group; ++g) {
        const long head = h * group + g;
        const float* query = q + (r * q_heads + head) * dim;
        Vec qv[MAX_VECS];
        for (long v = 0; v < vecs; ++v) qv[v] = load_part<Float32>(query, v * LANES, dim);
        float highest = -INFINITY;
        for (long t = 0; t < count; ++t) {
          const long slot = table[t / block_size] * block_size + t % block_size;
          const typename KV::Weight* key = keys + (slot * kv_heads + h) * dim;
          Vec sum = zero();
          for (long v = 0; v < vecs; ++v) sum = fmadd(qv[v], load_part<KV>(key, v * LANES, dim), sum);
          const float s = horizontal_sum(sum) * scale;
          scores[size_t(t)] = s;
          highest = std::max(highest, s);
        }
        float total = 0.0f;
        for (long t = 0; t < count; ++t) {
          const float e = std::exp(scores[size_t(t)] - highest);
          scores[size_t(t)] = e;
          total += e;
        }
        Vec acc[MAX_VECS];
        for (long v = 0; v < vecs; ++v) acc[v] = zero();
        for (long t = 0; t < count; ++t) {
          const long slot = table[t / block_size] * block_size + t % block_size;
          const typename KV::Weight* value = values + (slot * kv_heads + h) * dim;
          const Vec weight = set1(scores[size_t(t)]);
          for (long v = 0; v < vecs; ++v) acc[v] = fmadd(weight, load_part<KV>(value, v * LANES, dim), acc[v]);
        }
        float* result = out + (r * q_heads + head) * dim;
        const Vec inverse = set1(1.0f / total);
        for (long v = 0; v < vecs; ++v) store_part(result + v * LANES, mul(acc[v], inverse), dim - v * LANES);
      }
    }
  }
}

}  // namespace

extern "C" {

long minicpm_attention_max_dim() { return MAX_DIM; }

// `kv_bf16`: the pool holds bfloat16 (else float32). `visible[r]` >= 1 for every row.
void minicpm_decode_attention(const float* q, long rows, long q_heads, long kv_heads, long dim, const void* keys,
                              const void* values, int kv_bf16, const int64_t* blocks, long width, long block_size,
                              const int64_t* visible, float scale, float* out, int threads) {
  if (kv_bf16)
    attend<BFloat16>(q, rows, q_heads, kv_heads, dim, static_cast<const uint16_t*>(keys),
                     static_cast<const uint16_t*>(values), blocks, width, block_size, visible, scale, out, threads);
  else
    attend<Float32>(q, rows, q_heads, kv_heads, dim, static_cast<const float*>(keys),
                    static_cast<const float*>(values), blocks, width, block_size, visible, scale, out, threads);
}

}  // extern "C"
