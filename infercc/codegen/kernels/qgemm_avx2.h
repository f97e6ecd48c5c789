/* The AVX2 tile of the quantized matmul (qgemm.h includes it where its tile dispatches; the
 * generated source inlines it there): a block's integer dot products for R rows by one or both
 * 8-column halves of a panel, and the tile over a panel with its float epilogue. */
#ifndef ICC_QGEMM_AVX2_H
#define ICC_QGEMM_AVX2_H
#if defined(ICC_Q_AVX2)
/* rows from which 4-bit codes take icc_q_tile4_rows */
#ifndef ICC_Q_ROWS_MIN
#define ICC_Q_ROWS_MIN 3
#endif
/* icc_q_zero_rest for 8 columns of a block */
ICC_INLINE void icc_q_zero_rest256(icc_qpanel P, int64_t i, __m256 s, __m256 *z, __m256 *rest) {
    const __m256 r = P.rests ? _mm256_loadu_ps(P.rests + i)
                   : P.rests16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(P.rests16 + i)))
                               : _mm256_setzero_ps();
    if (P.mins) {
        const __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_sub_ps(_mm256_setzero_ps(), r), s),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        *z = _mm256_min_ps(_mm256_max_ps(q, _mm256_setzero_ps()), _mm256_set1_ps(P.zmax));
        *rest = _mm256_fmadd_ps(*z, s, r);
    } else {
        *z = P.zps ? _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(P.zps + i))))
                   : _mm256_set1_ps(P.z0);
        *rest = r;
    }
}

/* acc + per 32-bit lane sum of 4 u8 codes x 4 s8 activations (8-bit codes without VNNI: through
 * the sign trick, |c - 128| x sign(q, c - 128), the caller moving the zero point by 128). */
ICC_INLINE __m256i icc_dot_u8s8_256(__m256i acc, __m256i w, __m256i x, const int BITS) {
#if defined(__AVXVNNI__)
    (void)BITS;
    return _mm256_dpbusd_avx_epi32(acc, w, x);
#else
    __m256i prod;
    if (BITS == 8) {
        const __m256i ws = _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80));
        prod = _mm256_maddubs_epi16(_mm256_abs_epi8(ws), _mm256_sign_epi8(x, ws));
    } else {
        prod = _mm256_maddubs_epi16(w, x);
    }
    return _mm256_add_epi32(acc, _mm256_madd_epi16(prod, _mm256_set1_epi16(1)));
#endif
}

/* One block's integer dot products, 8 columns per half by R rows, for H halves (c: the first
 * half's 32 bytes of the block's first 64-byte chunk, half h at c + 32 h), into dot[r * H + h]
 * (int32 per column). H = 2 shares each activation broadcast between the halves.
 * 4-bit codes without VNNI: a maddubs lane is 2 products of a code <= 15 and |q| <= 128, at most
 * 3840 in magnitude, so 8 maddubs results (4 chunks) add up in int16 exactly (<= 30720) and one
 * madd widens them, where one madd per maddubs did before: the integer sums, and so the outputs,
 * are the same, at about half the multiply-port work per row. */
ICC_INLINE void icc_q_dot(const int R, const int H, const int BITS, const int64_t block, const uint8_t *c,
                          const int8_t *xb, const int64_t kp, __m256i *dot) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int i = 0; i < R * H; i++) dot[i] = _mm256_setzero_si256();
#if !defined(__AVXVNNI__)
    if (BITS == 4) {
        const __m256i ones = _mm256_set1_epi16(1);
        for (int64_t h0 = 0; h0 < block / 8; h0 += 4) {
            __m256i s16[2 * ICC_Q_MR];
            for (int i = 0; i < R * H; i++) s16[i] = _mm256_setzero_si256();
            for (int64_t h = h0; h < h0 + 4 && h < block / 8; h++) {
                __m256i w0[2], w1[2];
                for (int hh = 0; hh < H; hh++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(c + 64 * h + 32 * hh));
                    w0[hh] = _mm256_and_si256(v, m4);
                    w1[hh] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                }
                for (int r = 0; r < R; r++) {
                    const __m256i x0 = _mm256_set1_epi32(icc_load_i32(xb + r * kp + 8 * h));
                    const __m256i x1 = _mm256_set1_epi32(icc_load_i32(xb + r * kp + 8 * h + 4));
                    for (int hh = 0; hh < H; hh++)
                        s16[r * H + hh] = _mm256_add_epi16(s16[r * H + hh], _mm256_add_epi16(_mm256_maddubs_epi16(w0[hh], x0),
                                                                                             _mm256_maddubs_epi16(w1[hh], x1)));
                }
            }
            for (int i = 0; i < R * H; i++) dot[i] = _mm256_add_epi32(dot[i], _mm256_madd_epi16(s16[i], ones));
        }
        return;
    }
#endif
    for (int64_t h = 0; h < block / 8; h++) {
        __m256i w0[2], w1[2];
        for (int hh = 0; hh < H; hh++) {
            if (BITS == 4) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(c + 64 * h + 32 * hh));
                w0[hh] = _mm256_and_si256(v, m4);
                w1[hh] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            } else {
                w0[hh] = _mm256_loadu_si256((const __m256i *)(c + 128 * h + 32 * hh));
                w1[hh] = _mm256_loadu_si256((const __m256i *)(c + 128 * h + 64 + 32 * hh));
            }
        }
        for (int r = 0; r < R; r++) {
            const __m256i x0 = _mm256_set1_epi32(icc_load_i32(xb + r * kp + 8 * h));
            const __m256i x1 = _mm256_set1_epi32(icc_load_i32(xb + r * kp + 8 * h + 4));
            for (int hh = 0; hh < H; hh++)
                dot[r * H + hh] = icc_dot_u8s8_256(icc_dot_u8s8_256(dot[r * H + hh], w0[hh], x0, BITS), w1[hh], x1, BITS);
        }
    }
}
#endif

#if defined(ICC_Q_AVX2)
/* One block's float epilogue for R rows of one 8-column half (scales at sb): dot[r * H] the
 * integer dot products, yv[r * H] the accumulators; d, dq, sx at the block of row 0, rows nb apart.
 * shift8: the zero point's move for the 8-bit sign trick (0 otherwise). */
ICC_INLINE void icc_q_block_out256(const int R, const int H, icc_qpanel P, int64_t sb, float shift8,
                                   const __m256i *dot, const float *d, const float *dq, const float *sx,
                                   int64_t nb, __m256 *yv) {
    const __m256 s = P.scales ? _mm256_loadu_ps(P.scales + sb)
                              : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(P.scales16 + sb)));
    __m256 z, rest;
    icc_q_zero_rest256(P, sb, s, &z, &rest);
    z = _mm256_sub_ps(z, _mm256_set1_ps(shift8));
    for (int r = 0; r < R; r++) {
        /* s d (sum q c) - s z (d sum q): both integer sums are exact in float */
        __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(dot[r * H]), _mm256_set1_ps(d[r * nb]));
        t = _mm256_fnmadd_ps(z, _mm256_set1_ps(dq[r * nb]), t);
        yv[r * H] = _mm256_fmadd_ps(s, t, yv[r * H]);
    }
    if (P.rests || P.rests16)
        for (int r = 0; r < R; r++) yv[r * H] = _mm256_fmadd_ps(rest, _mm256_set1_ps(sx[r * nb]), yv[r * H]);
}

/* y[r][j0 : j0 + 8] = yv[r * H] for R rows, cut at ncols. */
ICC_INLINE void icc_q_store256(const int R, const int H, const __m256 *yv, float *y, int64_t ldy,
                               int64_t j0, int64_t ncols) {
    const int64_t n = ncols - j0;
    for (int r = 0; r < R; r++) {
        if (n >= 8) {
            _mm256_storeu_ps(y + r * ldy + j0, yv[r * H]);
        } else if (n > 0) {
            float tmp[8];
            _mm256_storeu_ps(tmp, yv[r * H]);
            for (int64_t j = 0; j < n; j++) y[r * ldy + j0 + j] = tmp[j];
        }
    }
}

#if !defined(__AVXVNNI__)
/* 4-bit codes, R >= 3 rows, without VNNI: one 8-column half of the panel at a time, and within a
 * block the unpacked codes of up to 4 chunks (8 registers) stay in registers while each row in
 * turn runs its 8 maddubs (summed in int16, exact as in icc_q_dot), one madd and its epilogue:
 * per row and block no more than its own multiplies, adds and float terms, and nothing else live
 * across rows (the R float accumulators are the only per-row state; where they do not fit the 16
 * registers they live in L1). The panel, streamed from memory by the first half, is in L1 for the
 * second. The integer sums and the float epilogue's order are icc_q_dot's and icc_q_tile_avx2's:
 * the outputs are the same bit for bit. */
ICC_INLINE void icc_q_tile4_rows(const int R, int64_t block, int64_t nb, icc_qpanel P, const int8_t *xq,
                                 int64_t kp, const float *d, const float *dq, const float *sx, float *y,
                                 int64_t ldy, int64_t ncols) {
    const int64_t cb = block * ICC_PANEL / 2;
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    for (int half = 0; half < 2; half++) {
        __m256 yv[ICC_Q_MR];
        for (int r = 0; r < R; r++) yv[r] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *c = P.codes + b * cb + 32 * half;
            if (!half) icc_q_prefetch(P, b);
            __m256i dot[ICC_Q_MR];
            for (int r = 0; r < R; r++) dot[r] = _mm256_setzero_si256();
            for (int64_t h0 = 0; h0 < block / 8; h0 += 4) {
                /* 4 chunks of 64 bytes, or the 2 of a block of 16 (blocks are powers of two >= 16) */
                const int nh = block / 8 - h0 >= 4 ? 4 : 2;
                __m256i w[8];
                for (int j = 0; j < nh; j++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(c + 64 * (h0 + j)));
                    w[2 * j] = _mm256_and_si256(v, m4);
                    w[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                }
#pragma GCC unroll 8
                for (int r = 0; r < R; r++) {
                    const int8_t *xr = xq + r * kp + b * block + 8 * h0;
                    __m256i p[8];
                    for (int j = 0; j < 8; j++)
                        p[j] = j < 2 * nh ? _mm256_maddubs_epi16(w[j], _mm256_set1_epi32(icc_load_i32(xr + 4 * j)))
                                          : _mm256_setzero_si256();
                    for (int n = 8; n > 1; n /= 2)  /* a tree: the int16 sums are exact in any order */
                        for (int j = 0; j < n / 2; j++) p[j] = _mm256_add_epi16(p[2 * j], p[2 * j + 1]);
                    dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(p[0], ones));
                }
            }
            icc_q_block_out256(R, 1, P, b * ICC_PANEL + 8 * half, 0.0f, dot, d + b, dq + b, sx + b, nb, yv);
        }
        icc_q_store256(R, 1, yv, y, ldy, 8 * half, ncols);
    }
}
#endif

/* y[0:R, 0:ncols] = x[0:R] @ one panel on AVX2. Up to 2 rows both 8-column halves of the panel
 * go together (each activation broadcast serves both); from 3 rows one half at a time over all
 * of K, so that the R accumulators of y, R of the block's dot products and the unpacked codes
 * stay in the 16 registers (both halves at once spilled them at 4 rows; the panel, streamed
 * from memory by the first half, is in L1 for the second). */
ICC_INLINE void icc_q_tile_avx2(const int R, const int BITS, int64_t block, int64_t nb, icc_qpanel P,
                                const int8_t *xq, int64_t kp, const float *d, const float *dq,
                                const float *sx, float *y, int64_t ldy, int64_t ncols) {
#if !defined(__AVXVNNI__)
    if (BITS == 4 && R >= ICC_Q_ROWS_MIN) {
        icc_q_tile4_rows(R, block, nb, P, xq, kp, d, dq, sx, y, ldy, ncols);
        return;
    }
#endif
    const int64_t cb = block * ICC_PANEL * BITS / 8;
    const int H = R <= 2 ? 2 : 1;
    /* 8-bit without VNNI: codes as c - 128 (sign trick), so the zero point moves by 128 too */
#if defined(__AVXVNNI__)
    const float shift8 = 0.0f;
#else
    const float shift8 = BITS == 8 ? 128.0f : 0.0f;
#endif
    for (int pass = 0; pass < 2 / H; pass++) {
        __m256 yv[2 * ICC_Q_MR];
        for (int i = 0; i < R * H; i++) yv[i] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *c = P.codes + b * cb;
            if (!pass) icc_q_prefetch(P, b);
            __m256i dot[2 * ICC_Q_MR];
            icc_q_dot(R, H, BITS, block, c + 32 * pass, xq + b * block, kp, dot);
            for (int hh = 0; hh < H; hh++)
                icc_q_block_out256(R, H, P, b * ICC_PANEL + 8 * (pass + hh), shift8, dot + hh, d + b, dq + b,
                                   sx + b, nb, yv + hh);
        }
        for (int hh = 0; hh < H; hh++) icc_q_store256(R, H, yv + hh, y, ldy, 8 * (pass + hh), ncols);
    }
}
#endif

#endif
