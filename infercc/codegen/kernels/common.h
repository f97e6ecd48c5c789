/* Shared by the kernel headers: the panel width both packers use and small helpers. */
#ifndef ICC_COMMON_H
#define ICC_COMMON_H
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

/* Output columns per packed weight panel (codegen/packing.py PANEL). */
#define ICC_PANEL 16
/* Below this many multiply-adds a kernel runs on the calling thread: an OpenMP fork costs a few
 * microseconds, more than a small projection (stories260K's 64x64) takes. */
#define ICC_PARALLEL_MIN_MACS (1 << 16)

#if defined(__GNUC__)
#define ICC_INLINE static inline __attribute__((always_inline))
#else
#define ICC_INLINE static inline
#endif

#if defined(__AVX2__)
/* Horizontal sum and maximum of 8 floats (AVX2 kernels; AVX-512 has its own reductions). */
static inline float icc_hsum256(__m256 x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline float icc_hmax256(__m256 x) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
#endif

/* 64-byte aligned scratch (NULL on failure; the caller falls back or returns). */
static inline void *icc_scratch(size_t bytes) {
    size_t rounded = (bytes + 63) & ~(size_t)63;
    return aligned_alloc(64, rounded ? rounded : 64);
}

#endif
