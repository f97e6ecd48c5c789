"""The C driver the kernel tests build: the contract (api.h) first, then our headers, so gcc
checks the definitions against the declared signatures; each kernel gets an exported wrapper."""

from __future__ import annotations

import ctypes
from pathlib import Path

from ._cbuild import build

SOURCE = r"""
/* api.h declares every kernel `static`; this driver exercises the matmul headers only */
#pragma GCC diagnostic ignored "-Wunused-function"
#include "api.h"
#include "gemm.h"
#include "qgemm.h"
void t_gemm_f32(int64_t M, int64_t N, int64_t K, const float *x, const void *w, const float *bias,
                float *y) { icc_gemm_f32(M, N, K, x, w, bias, y); }
void t_matmul_q(int64_t M, int64_t N, int64_t K, int bits, int64_t block, const float *x,
                const void *w, float *y) { icc_matmul_q(M, N, K, bits, block, x, w, y); }
void t_gather_q(int64_t n_ids, const int64_t *ids, int64_t N, int64_t K, int bits, int64_t block,
                const void *w, float *out) { icc_gather_q(n_ids, ids, N, K, bits, block, w, out); }
/* the int8 activations of icc_matmul_q: q [M][blocks * block], then d, d * sum q, sum x [M][blocks] */
int t_quantize_act(int64_t M, int64_t K, int64_t block, const float *x, int8_t *q, float *d, float *dq,
                   float *sx) {
    icc_qact a;
    if (!icc_quantize_act(M, K, block, x, &a)) return 0;
    const int64_t nb = (K + block - 1) / block;
    memcpy(q, a.q, (size_t)(M * nb * block));
    memcpy(d, a.d, sizeof(float) * (size_t)(M * nb));
    memcpy(dq, a.dq, sizeof(float) * (size_t)(M * nb));
    memcpy(sx, a.sx, sizeof(float) * (size_t)(M * nb));
    return 1; /* a.mem is the kernels' scratch, kept for the next call */
}
"""

_I64, _P, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


def kernels(march: str, out_dir: Path) -> ctypes.CDLL:
    lib = build(SOURCE, march, out_dir)
    lib.t_gemm_f32.argtypes = [_I64, _I64, _I64, _P, _P, _P, _P]
    lib.t_matmul_q.argtypes = [_I64, _I64, _I64, _INT, _I64, _P, _P, _P]
    lib.t_gather_q.argtypes = [_I64, _P, _I64, _I64, _INT, _I64, _P, _P]
    for f in (lib.t_gemm_f32, lib.t_matmul_q, lib.t_gather_q):
        f.restype = None
    lib.t_quantize_act.argtypes = [_I64, _I64, _I64, _P, _P, _P, _P, _P]
    lib.t_quantize_act.restype = _INT
    return lib
