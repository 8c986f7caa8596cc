// dw_dr.cu: the paper's diagonal-wise refactorization (DR) form of a tap-pruned depth-wise conv.
//
// Channels are split into balanced ranges g = [g*GS, min((g+1)*GS, C)). Range g is one sub-GEMM
//
//   out[c, p] = act(bias[c] + sum_j W_g[c, j] * X_g[j, p])      c in range g, p = output position
//
// over its compacted K'_g kept (channel, tap) columns j = col_ptr[g] .. col_ptr[g+1] (padded with
// zero columns to a multiple of DEPRUNE_KTILE), where
//   W_g[c, j] = col_val[j] if col_chan[j] == c else 0      (a dense GS x KTILE smem tile, zeros included,
//                                                          exactly like the paper's DR sub-GEMM)
//   X_g[j, p] = x[n, col_chan[j], oy*SH - PH + i_j*DH, ox*SW - PW + j_j*DW]   (im2col on the fly, tap = i*KW + j)
// PH / PW are the TOP / LEFT zero padding; the padding may be asymmetric (TensorFlow "SAME"): the bottom /
// right padding only sets OH / OW, computed on the host, and every read outside the image is a zero.
// Storage fp32/fp16/bf16, accumulation fp32, BN folded into col_val / bias by the caller.
// As in any dense DR GEMM, the explicit zeros of W_g multiply the other channels' inputs, so a non-finite
// input (inf/nan) makes every output of its range nan (0 * inf); the direct kernel has no such coupling.
//
// Specialisation (#defines prepended by deprune_plugin/kernels/sources.py; defaults compile alone):
//   DEPRUNE_SCALAR       float | __half | __nv_bfloat16
//   DEPRUNE_LAYOUT_NHWC  0: NCHW-contiguous, 1: channels_last (NHWC)
//   DEPRUNE_GROUP_SIZE   GS, channels per balanced range (rows of W_g)
//   DEPRUNE_KTILE        K tile; every range's column count is a multiple of it
//   DEPRUNE_DR_PN        output positions per thread (a CTA covers DR_PT = 16 * DEPRUNE_DR_PN positions)
// Entry point: deprune_dw_dr, block (16, 16), grid (ceil(OH*OW / DR_PT), G, N), no dynamic smem.

#ifndef DEPRUNE_SCALAR
#define DEPRUNE_SCALAR float
#endif
#ifndef DEPRUNE_LAYOUT_NHWC
#define DEPRUNE_LAYOUT_NHWC 0
#endif
#ifndef DEPRUNE_GROUP_SIZE
#define DEPRUNE_GROUP_SIZE 32
#endif
#ifndef DEPRUNE_KTILE
#define DEPRUNE_KTILE 32
#endif
#ifndef DEPRUNE_DR_PN
#define DEPRUNE_DR_PN 4
#endif

#include "deprune_common.cuh"

// CTA shape: 16 x 16 threads; each thread owns a DR_RM x DR_PN register micro-tile of the
// GS x DR_PT output tile (rows = channels of the range, columns = output positions). Rows and
// positions are both strided by 16, so the two thread axes are interchangeable (see rl / pl).
#define DR_T 16
#define DR_THREADS (DR_T * DR_T)
#define DR_PN DEPRUNE_DR_PN                                // positions per thread
#define DR_PT (DR_T * DR_PN)                               // positions per CTA
#define DR_RM ((DEPRUNE_GROUP_SIZE + DR_T - 1) / DR_T)     // rows per thread
#define DR_GSP (DR_RM * DR_T)                              // GS rounded up to the thread grid
#define DR_OUTSIDE (-(1 << 29))                            // input coordinate that is never in bounds

// __launch_bounds__(.., 2): up to 128 registers for the micro-tile; with the bare thread bound ptxas
// (CUDA 13, sm_90) picked 48 registers and spilled. No spills is checked by tests/test_kernels_nvcc.py.
extern "C" __global__ void __launch_bounds__(DR_THREADS, 2) deprune_dw_dr(
    const scalar_t* __restrict__ x,        // [N, C, H, W] or [N, H, W, C]
    scalar_t* __restrict__ y,              // [N, C, OH, OW] or [N, OH, OW, C]
    const int* __restrict__ col_ptr,       // [G + 1], multiples of DEPRUNE_KTILE apart
    const int* __restrict__ col_chan,      // [ncols] layer channel of each column
    const int* __restrict__ col_tap,       // [ncols] i * KW + j
    const float* __restrict__ col_val,     // [ncols] 0 for padding columns
    const float* __restrict__ bias,        // [C] or nullptr
    int N, int C, int H, int W, int OH, int OW, int KH, int KW,
    int SH, int SW, int PH, int PW, int DH, int DW,  // PH, PW: top and left padding
    int act) {
    // W_g tile [KTILE][GSP]: row index fastest so the per-thread row reads of the NHWC mapping are
    // consecutive. X_g tile [KTILE][DR_PT + 1]: the +1 keeps the column-major fill of the NHWC path
    // conflict-free (stride 65 words hits 32 different banks).
    __shared__ float s_w[DEPRUNE_KTILE][DR_GSP];
    __shared__ float s_x[DEPRUNE_KTILE][DR_PT + 1];
    __shared__ int s_row[DEPRUNE_KTILE];   // col_chan - c0: the only non-zero row of each W_g column
    __shared__ int s_chan[DEPRUNE_KTILE];  // channel offset of the column's input (element units)
    __shared__ int s_dy[DEPRUNE_KTILE];    // tap row offset i * DH
    __shared__ int s_dx[DEPRUNE_KTILE];    // tap column offset j * DW
    __shared__ int s_py[DR_PT];            // oy * SH - PH per CTA position (DR_OUTSIDE past the end)
    __shared__ int s_px[DR_PT];            // ox * SW - PW

    (void)N;
    const int g = blockIdx.y;
    const int n = blockIdx.z;
    const int c0 = g * DEPRUNE_GROUP_SIZE;
    const int c1 = min(c0 + DEPRUNE_GROUP_SIZE, C);
    const int P = OH * OW;
    const int p0 = blockIdx.x * DR_PT;
    const int tid = threadIdx.y * DR_T + threadIdx.x;
#if DEPRUNE_LAYOUT_NHWC
    // Stores are [.., p, c]: consecutive threads of a warp take consecutive channels.
    const int rl = threadIdx.x;
    const int pl = threadIdx.y;
#else
    // Stores are [.., c, p]: consecutive threads of a warp take consecutive positions.
    const int rl = threadIdx.y;
    const int pl = threadIdx.x;
#endif

    for (int e = tid; e < DR_PT; e += DR_THREADS) {
        const int p = p0 + e;
        const int oy = p / OW;
        const int ox = p - oy * OW;
        s_py[e] = p < P ? oy * SH - PH : DR_OUTSIDE;
        s_px[e] = p < P ? ox * SW - PW : DR_OUTSIDE;
    }

    float acc[DR_RM][DR_PN];
#pragma unroll
    for (int i = 0; i < DR_RM; ++i)
#pragma unroll
        for (int q = 0; q < DR_PN; ++q) acc[i][q] = 0.0f;

    const scalar_t* xn = x + static_cast<long long>(n) * C * H * W;
    const int k_begin = col_ptr[g];
    const int k_end = col_ptr[g + 1];
    for (int k0 = k_begin; k0 < k_end; k0 += DEPRUNE_KTILE) {
        // (1) Column metadata of this K tile. A column whose channel lies outside the range (or whose
        // tap is out of the window) is neutralised: zero weight and an out-of-bounds input coordinate.
        for (int j = tid; j < DEPRUNE_KTILE; j += DR_THREADS) {
            const int chan = col_chan[k0 + j];
            const int tap = col_tap[k0 + j];
            const bool ok = chan >= c0 && chan < c1 && tap >= 0 && tap < KH * KW;
            s_row[j] = ok ? chan - c0 : -1;
#if DEPRUNE_LAYOUT_NHWC
            s_chan[j] = ok ? chan : 0;
#else
            s_chan[j] = ok ? chan * H * W : 0;
#endif
            s_dy[j] = ok ? (tap / KW) * DH : DR_OUTSIDE;
            s_dx[j] = ok ? (tap % KW) * DW : DR_OUTSIDE;
        }
        __syncthreads();

        // (2a) Dense W_g tile: one non-zero per column, the rest explicit zeros (DR's block diagonal).
        for (int e = tid; e < DEPRUNE_KTILE * DR_GSP; e += DR_THREADS) {
            const int j = e / DR_GSP;
            const int r = e - j * DR_GSP;
            s_w[j][r] = s_row[j] == r ? col_val[k0 + j] : 0.0f;
        }
        // (2b) im2col tile X_g[j, p], zero outside the image (padding) and past the last position.
#if DEPRUNE_LAYOUT_NHWC
        // Column-fastest: the columns of one tap are consecutive kept channels of a range
        // (DRColumns orders them tap-major), so a warp reads nearby channels of the same pixel.
        for (int e = tid; e < DEPRUNE_KTILE * DR_PT; e += DR_THREADS) {
            const int j = e % DEPRUNE_KTILE;
            const int pp = e / DEPRUNE_KTILE;
            const int iy = s_py[pp] + s_dy[j];
            const int ix = s_px[pp] + s_dx[j];
            float v = 0.0f;
            if (iy >= 0 && iy < H && ix >= 0 && ix < W)
                v = deprune_to_float(xn[(static_cast<long long>(iy) * W + ix) * C + s_chan[j]]);
            s_x[j][pp] = v;
        }
#else
        // Position-fastest: consecutive output columns read consecutive input columns (coalesced).
        for (int e = tid; e < DEPRUNE_KTILE * DR_PT; e += DR_THREADS) {
            const int pp = e % DR_PT;
            const int j = e / DR_PT;
            const int iy = s_py[pp] + s_dy[j];
            const int ix = s_px[pp] + s_dx[j];
            float v = 0.0f;
            if (iy >= 0 && iy < H && ix >= 0 && ix < W)
                v = deprune_to_float(xn[static_cast<long long>(s_chan[j]) + static_cast<long long>(iy) * W + ix]);
            s_x[j][pp] = v;
        }
#endif
        __syncthreads();

        // (3) Rank-KTILE update of the register micro-tile (outer products from smem).
#pragma unroll 8
        for (int j = 0; j < DEPRUNE_KTILE; ++j) {
            float a[DR_RM];
            float b[DR_PN];
#pragma unroll
            for (int i = 0; i < DR_RM; ++i) a[i] = s_w[j][rl + i * DR_T];
#pragma unroll
            for (int q = 0; q < DR_PN; ++q) b[q] = s_x[j][pl + q * DR_T];
#pragma unroll
            for (int i = 0; i < DR_RM; ++i)
#pragma unroll
                for (int q = 0; q < DR_PN; ++q) acc[i][q] += a[i] * b[q];
        }
        __syncthreads();  // the next tile overwrites s_w / s_x / metadata
    }

    // Epilogue: bias (folded BN) + activation, rows past the range / positions past the end masked.
#pragma unroll
    for (int i = 0; i < DR_RM; ++i) {
        const int c = c0 + rl + i * DR_T;
        if (c >= c1) continue;
        const float bc = bias != nullptr ? bias[c] : 0.0f;
#pragma unroll
        for (int q = 0; q < DR_PN; ++q) {
            const int p = p0 + pl + q * DR_T;
            if (p >= P) continue;
            const float v = deprune_activate(acc[i][q] + bc, act);
#if DEPRUNE_LAYOUT_NHWC
            deprune_store(y + (static_cast<long long>(n) * P + p) * C + c, v);
#else
            deprune_store(y + (static_cast<long long>(n) * C + c) * P + p, v);
#endif
        }
    }
}
