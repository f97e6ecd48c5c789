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

/* ---- heap allocations of the runtime, counted in a test build ---------------------------------
 * Every buffer the kernels and the plan take from the heap goes through icc_heap_alloc / icc_heap_free
 * so that a build with -DICC_COUNT_ALLOCS can count them (icc_alloc_count: the tests check that a
 * decode step after the first allocates nothing). */
#ifdef ICC_COUNT_ALLOCS
static int64_t icc_allocs;
int64_t icc_alloc_count(void) { return icc_allocs; }
#define ICC_COUNT_ALLOC() (icc_allocs++)
#else
#define ICC_COUNT_ALLOC() ((void)0)
#endif

/* 64-byte aligned, `bytes` rounded up to a multiple of 64 (aligned_alloc's contract); NULL on failure */
static inline void *icc_heap_alloc(size_t bytes) {
    size_t rounded = (bytes + 63) & ~(size_t)63;
    ICC_COUNT_ALLOC();
    return aligned_alloc(64, rounded ? rounded : 64);
}
static inline void icc_heap_free(void *p) { free(p); }

/* ---- kernel scratch: grow-only buffers kept between calls ----------------------------------
 * A kernel's temporaries (quantized activations, packed panels, attention partials and per-thread
 * workspaces) are taken from one buffer per purpose instead of malloc/free per call: a decode step
 * runs ~300 kernels, and a malloc above glibc's mmap threshold is an mmap, page faults and an
 * munmap every call. A buffer grows (by a quarter at least) to the largest request and stays until
 * icc_scratch_release (the model's icc_free_buffers).
 *
 * Contract, the same as the memory plan's slots: one run at a time per loaded library (the Python
 * side holds a lock per library around every entry point), and scratch is taken on the calling
 * thread, outside OpenMP parallel regions; a parallel region's per-thread workspaces are one
 * buffer of `threads` strides taken before the region (icc_scratch_threads), each thread using its
 * own stride. A purpose's buffer is valid until the next take of the same purpose: no kernel holds
 * one across a call to another kernel that takes it. */
enum { ICC_SCR_QACT, ICC_SCR_PACK, ICC_SCR_PART, ICC_SCR_WS, ICC_SCR_REDUCE, ICC_SCR_N };
static void *icc_scr_buf[ICC_SCR_N];
static size_t icc_scr_cap[ICC_SCR_N];

/* at least `bytes` of purpose `id`'s buffer, 64-byte aligned (NULL when out of memory: the caller
 * falls back or reports) */
static inline void *icc_scratch(int id, size_t bytes) {
    if (icc_scr_cap[id] < bytes || !icc_scr_buf[id]) {
        size_t grown = icc_scr_cap[id] + icc_scr_cap[id] / 4;
        if (grown < bytes) grown = bytes;
        grown = (grown + 63) & ~(size_t)63;
        icc_heap_free(icc_scr_buf[id]);
        icc_scr_buf[id] = icc_heap_alloc(grown ? grown : 64);
        icc_scr_cap[id] = icc_scr_buf[id] ? grown : 0;
    }
    return icc_scr_buf[id];
}

/* threads the next parallel region may have: the per-thread workspaces to reserve */
static inline int icc_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}
static inline int icc_thread(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* one workspace of `bytes` (rounded to 64) per thread of the next parallel region, in purpose `id`'s
 * buffer; *stride the distance between two threads' workspaces; NULL when out of memory */
static inline char *icc_scratch_threads(int id, size_t bytes, size_t *stride) {
    *stride = (bytes + 63) & ~(size_t)63;
    return (char *)icc_scratch(id, *stride * (size_t)icc_max_threads());
}

/* give every scratch buffer back; returns the bytes freed */
static inline int64_t icc_scratch_release(void) {
    int64_t bytes = 0;
    for (int i = 0; i < ICC_SCR_N; i++) {
        bytes += (int64_t)icc_scr_cap[i];
        icc_heap_free(icc_scr_buf[i]);
        icc_scr_buf[i] = NULL;
        icc_scr_cap[i] = 0;
    }
    return bytes;
}

#endif
