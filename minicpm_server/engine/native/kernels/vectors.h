// Vectors of float32 for our CPU kernels (products.cpp, attention.cpp): AVX2 (8 lanes) or, built
// with -DMINICPM_AVX512, AVX-512 (16 lanes); and the weight or cache types they read, widened to
// float32 in registers.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace minicpm {

#if defined(MINICPM_AVX512)
using Vec = __m512;
constexpr long LANES = 16;
constexpr int GROUP = 6;  // rows per group
inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float horizontal_sum(Vec v) { return _mm512_reduce_add_ps(v); }
inline Vec set1(float v) { return _mm512_set1_ps(v); }
inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
// The first min(left, LANES) floats of v to p (left is a multiple of 8).
inline void store_part(float* p, Vec v, long left) {
  if (left >= LANES)
    _mm512_storeu_ps(p, v);
  else
    _mm512_mask_storeu_ps(p, 0x00FF, v);
}
#else
using Vec = __m256;
constexpr long LANES = 8;
constexpr int GROUP = 3;
inline Vec zero() { return _mm256_setzero_ps(); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float horizontal_sum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline Vec set1(float v) { return _mm256_set1_ps(v); }
inline Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline void store_part(float* p, Vec v, long) { _mm256_storeu_ps(p, v); }
#endif

// Each weight type (and Float32 for inputs and queries too): LANES values widened to float32
// (load), and, for AVX-512, the first 8 of them with the rest zero (load_half: a row's last 8,
// nothing read past them).
struct Float32 {
  using Weight = float;
  static constexpr long BLOCK = 16;
#if defined(MINICPM_AVX512)
  static inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static inline Vec load_half(const float* p) { return _mm512_maskz_loadu_ps(0x00FF, p); }
#else
  static inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static inline Vec load_half(const float* p) { return load(p); }
#endif
};

struct BFloat16 {  // the upper half of a float32: widening is a 16-bit shift
  using Weight = uint16_t;
  static constexpr long BLOCK = 32;
#if defined(MINICPM_AVX512)
  static inline Vec widen(__m256i halves) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
  }
  static inline Vec load(const uint16_t* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static inline Vec load_half(const uint16_t* p) {
    return widen(_mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
#else
  static inline Vec load(const uint16_t* p) {
    __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
  }
  static inline Vec load_half(const uint16_t* p) { return load(p); }
#endif
};

struct Int8 {
  using Weight = int8_t;
  static constexpr long BLOCK = 64;
#if defined(MINICPM_AVX512)
  static inline Vec load(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static inline Vec load_half(const int8_t* p) {  // movq: 8 bytes, the upper 8 zero
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
#else
  static inline Vec load(const int8_t* p) {
    __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
  }
  static inline Vec load_half(const int8_t* p) { return load(p); }
#endif
};

}  // namespace minicpm
