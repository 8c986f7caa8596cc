// dw_direct.cu: direct tap-sparse depth-wise convolution with a fused epilogue.
//
//   y[n, c, oy, ox] = act(bias[c] + sum_{t in taps(c)} val[t] * x[n, c, oy*SH - PH + i_t*DH, ox*SW - PW + j_t*DW])
//
// taps(c) is the CSR slice tap_ptr[c] .. tap_ptr[c+1] of (tap_idx = i*KW + j, tap_val) pairs
// (deprune_plugin/kernels/formats.py, CompactTaps). BatchNorm is folded into val/bias by the caller. Storage
// is fp32/fp16/bf16 (also in shared memory), accumulation always fp32. PH / PW are the TOP / LEFT zero
// padding; the padding may be asymmetric (TensorFlow "SAME"): the bottom / right padding only sets OH / OW,
// which the host computes (deprune_plugin/kernels/launch.py), and every input read outside [0, H) x [0, W)
// is a zero.
//
// Geometry is compile-time (#defines prepended by deprune_plugin/kernels/sources.py, chosen by
// deprune_plugin/kernels/dw_direct.py: dw_direct_plan; the defaults below only let nvcc compile the file
// alone), so every division or modulo in the staging and tap loops is by a constant (a multiply-shift):
//   DEPRUNE_SCALAR            float | __half | __nv_bfloat16
//   DEPRUNE_LAYOUT_NHWC       0: NCHW-contiguous x and y, 1: channels_last (NHWC) x and y
//   DEPRUNE_KH, DEPRUNE_KW    window; DEPRUNE_SH, DEPRUNE_SW stride; DEPRUNE_DH, DEPRUNE_DW dilation
//   DEPRUNE_TILE_H, _TILE_W   output tile of one CTA
//   DEPRUNE_ROWS              output rows per thread (register blocking along H)
//   DEPRUNE_CB                NHWC: channels per CTA (a multiple of DEPRUNE_VEC); NCHW: 1
//   DEPRUNE_VEC               NHWC: channels per thread and per global / shared access: 16 / sizeof(scalar)
//                             (one 16-byte uint4: 8 fp16/bf16 or 4 fp32; needs C % VEC == 0 and 16-byte
//                             aligned x and y, checked by the launcher) or 1 (scalar fallback); NCHW: 1
//   DEPRUNE_THREADS           threads per CTA (blockDim = (DEPRUNE_THREADS, 1, 1))
// Runtime: N, C, H, W, OH, OW, PH, PW, act.
// Entry point: deprune_dw_direct; grid (tiles_h * tiles_w, C / CB (NHWC) or C (NCHW), N).
//
// Where tap pruning saves work:
//   NHWC  each thread owns VEC channels x ROWS output rows of one output column. The CTA first builds a
//         bitmask of kept taps per channel (from the CSR); a thread ORs the masks of its VEC channels. The
//         tap loop is unrolled at compile time over the KH*KW taps (windows up to 7x7) as a sliding
//         window along H: input row ir of window column j is read from shared memory once and feeds every
//         (output row r, tap row i) with r*SH + i*DH == ir. A tap no channel of the vector keeps costs
//         neither its weight reads nor its VEC*ROWS FMAs, and an input row none of whose taps is kept is not
//         read at all. Larger windows loop over taps at run time with the same per-vector skip.
//   NCHW  the CTA owns one channel: it loops over exactly that channel's kept taps (CSR slice), and a fully
//         pruned channel skips its input tile.
//   Global traffic does not shrink (every input pixel is still needed by some kept tap of some channel).

#ifndef DEPRUNE_SCALAR
#define DEPRUNE_SCALAR __half
#endif
#ifndef DEPRUNE_LAYOUT_NHWC
#define DEPRUNE_LAYOUT_NHWC 1
#endif
#include "deprune_window.cuh"
#ifndef DEPRUNE_TILE_H
#define DEPRUNE_TILE_H 16
#endif
#ifndef DEPRUNE_TILE_W
#define DEPRUNE_TILE_W 16
#endif
#ifndef DEPRUNE_ROWS
#define DEPRUNE_ROWS 4
#endif
#ifndef DEPRUNE_CB
#define DEPRUNE_CB 32
#endif
#ifndef DEPRUNE_VEC
#define DEPRUNE_VEC 8
#endif
#ifndef DEPRUNE_THREADS
#define DEPRUNE_THREADS 256
#endif

#include "deprune_common.cuh"
#include "deprune_vec16.cuh"

namespace dwd {

constexpr int KH = DEPRUNE_KH, KW = DEPRUNE_KW, SH = DEPRUNE_SH, SW = DEPRUNE_SW;
constexpr int DH = DEPRUNE_DH, DW = DEPRUNE_DW;
constexpr int TILE_H = DEPRUNE_TILE_H, TILE_W = DEPRUNE_TILE_W, ROWS = DEPRUNE_ROWS;
constexpr int CB = DEPRUNE_CB, VEC = DEPRUNE_VEC, THREADS = DEPRUNE_THREADS;
constexpr int KT = KH * KW;
constexpr int IN_H = (TILE_H - 1) * SH + (KH - 1) * DH + 1;  // input window of the tile, halo included
constexpr int IN_W = (TILE_W - 1) * SW + (KW - 1) * DW + 1;
constexpr int WIN = (ROWS - 1) * SH + (KH - 1) * DH + 1;     // input rows one thread's ROWS outputs read
constexpr int MASK_WORDS = (KT + 31) / 32;
constexpr int INFLIGHT = 4;  // global loads a thread issues before its first shared-memory store

static_assert(TILE_H % ROWS == 0, "DEPRUNE_TILE_H must be a multiple of DEPRUNE_ROWS");
static_assert(CB % VEC == 0, "DEPRUNE_CB must be a multiple of DEPRUNE_VEC");
static_assert(VEC == 1 || VEC * sizeof(scalar_t) == 16, "DEPRUNE_VEC is 1 or one 16-byte vector");
static_assert(THREADS == (CB / VEC) * TILE_W * (TILE_H / ROWS), "DEPRUNE_THREADS must cover the tile");

// VEC consecutive channels at p (16-byte aligned when VEC > 1) -> fp32.
__device__ __forceinline__ void load_lane(const scalar_t* p, float* f) {
    if constexpr (VEC > 1)
        unpack<scalar_t>(*reinterpret_cast<const vec16*>(p), f);
    else
        f[0] = deprune_to_float(*p);
}

// Shared-memory bytes of the NHWC layout: s_in[IN_H][IN_W][CB] storage | s_w[KT][CB] fp32 |
// s_mask[MASK_WORDS][CB] (bit t of word t / 32: tap t kept). s_in first: 16-byte aligned for the vectors;
// its size rounded up to 16 bytes so that s_w stays aligned for any CB (an odd CB of 16-bit scalars).
constexpr int NHWC_IN_BYTES = (IN_H * IN_W * CB * static_cast<int>(sizeof(scalar_t)) + 15) / 16 * 16;
// NCHW: s_val[KT] fp32 | s_off[KT] int | s_in[IN_H][IN_W] storage.

}  // namespace dwd

// __launch_bounds__(256, 2): up to 128 registers per thread; the planner never asks for more than 256
// threads, and tests/test_kernels_nvcc.py / test_dw_direct_sass.py check that ptxas spills nothing.
extern "C" __global__ void __launch_bounds__(256, 2) deprune_dw_direct(
    const scalar_t* __restrict__ x,        // [N, C, H, W] or [N, H, W, C]
    scalar_t* __restrict__ y,              // [N, C, OH, OW] or [N, OH, OW, C]
    const int* __restrict__ tap_ptr,       // [C + 1]
    const int* __restrict__ tap_idx,       // [nnz], i * KW + j
    const float* __restrict__ tap_val,     // [nnz]
    const float* __restrict__ bias,        // [C] or nullptr
    int N, int C, int H, int W, int OH, int OW,
    int PH, int PW,                        // top and left padding
    int act) {
    using namespace dwd;
    (void)N;
    const int tiles_w = (OW + TILE_W - 1) / TILE_W;  // once per CTA
    const int tile_y = static_cast<int>(blockIdx.x) / tiles_w;
    const int oy0 = tile_y * TILE_H;
    const int ox0 = (static_cast<int>(blockIdx.x) - tile_y * tiles_w) * TILE_W;
    const int n = blockIdx.z;
    // Origin of the input window; may be negative (zero padding).
    const int iy0 = oy0 * SH - PH;
    const int ix0 = ox0 * SW - PW;
    const int tid = threadIdx.x;

#if !DEPRUNE_LAYOUT_NHWC
    // ---------------------------------------------------------------------------------------------
    // NCHW: one CTA = a TILE_H x TILE_W output tile of one (n, c) plane; thread tid owns output column
    // tid % TILE_W and rows (tid / TILE_W) * ROWS + r. A warp spans consecutive output columns, so the tile
    // load (consecutive input columns) and the stores are coalesced along W.
    // ---------------------------------------------------------------------------------------------
    const int c = blockIdx.y;
    DEPRUNE_DYNAMIC_SMEM(float, s_val);
    int* s_off = reinterpret_cast<int*>(s_val + KT);
    scalar_t* s_in = reinterpret_cast<scalar_t*>(s_off + KT);

    const int t0 = tap_ptr[c];
    const int ntaps = min(tap_ptr[c + 1] - t0, KT);
    for (int t = tid; t < ntaps; t += THREADS) {
        const int k = tap_idx[t0 + t];
        const bool ok = k >= 0 && k < KT;  // a corrupt index contributes nothing instead of reading out of the tile
        const int i = k / KW;              // constant divisor
        s_val[t] = ok ? tap_val[t0 + t] : 0.0f;
        s_off[t] = ok ? i * DH * IN_W + (k - i * KW) * DW : 0;
    }
    // A fully pruned channel only needs its bias: skip the tile load (the branch is CTA-uniform and
    // every thread still reaches the barrier below).
    if (ntaps > 0) {
        const scalar_t* xp = x + (static_cast<long long>(n) * C + c) * H * W;
        constexpr int ITEMS = IN_H * IN_W;
        // INFLIGHT independent loads per thread before their shared-memory stores.
        for (int e0 = 0; e0 < ITEMS; e0 += THREADS * INFLIGHT) {
            scalar_t v[INFLIGHT];
#pragma unroll
            for (int b = 0; b < INFLIGHT; ++b) {
                const int e = e0 + b * THREADS + tid;
                const int ly = e / IN_W;  // constant divisor
                const int iy = iy0 + ly;
                const int ix = ix0 + e - ly * IN_W;
                v[b] = zero<scalar_t>();
                if (e < ITEMS && iy >= 0 && iy < H && ix >= 0 && ix < W) v[b] = xp[iy * W + ix];
            }
#pragma unroll
            for (int b = 0; b < INFLIGHT; ++b) {
                const int e = e0 + b * THREADS + tid;
                if (e < ITEMS) s_in[e] = v[b];
            }
        }
    }
    __syncthreads();

    // Register blocking: each thread owns ROWS vertically adjacent outputs, so one tap (weight + offset
    // read from shared memory once) feeds ROWS FMAs.
    const int lx = tid % TILE_W;
    const int ly0 = tid / TILE_W * ROWS;
    const scalar_t* s_base = s_in + ly0 * SH * IN_W + lx * SW;
    float acc[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[r] = 0.0f;
    for (int t = 0; t < ntaps; ++t) {
        const float w = s_val[t];
        const scalar_t* p = s_base + s_off[t];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[r] += w * deprune_to_float(p[r * SH * IN_W]);
    }

    const float b = bias != nullptr ? bias[c] : 0.0f;
    const int ox = ox0 + lx;
    scalar_t* yp = y + (static_cast<long long>(n) * C + c) * OH * OW;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int oy = oy0 + ly0 + r;
        if (oy < OH && ox < OW) deprune_store(yp + oy * OW + ox, deprune_activate(acc[r] + b, act));
    }
#else
    // ---------------------------------------------------------------------------------------------
    // NHWC: one CTA = a TILE_H x TILE_W output tile x CB consecutive channels. Thread tid owns the VEC
    // channels (tid % NV) * VEC.. of the CTA's block and output column lx, rows ly0 .. ly0 + ROWS - 1.
    // Consecutive threads take consecutive channel vectors, then consecutive columns: global loads and
    // stores are contiguous runs of CB channels per pixel, shared-memory vectors contiguous per quarter warp
    // at stride 1.
    // ---------------------------------------------------------------------------------------------
    constexpr int NV = CB / VEC;  // vectors (threads) across the channel block
    const int c0 = blockIdx.y * CB;
    DEPRUNE_DYNAMIC_SMEM(scalar_t, s_in);
    float* s_w = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(s_in) + NHWC_IN_BYTES);
    unsigned int* s_mask = reinterpret_cast<unsigned int*>(s_w + KT * CB);

    // Taps: dense fp32 weights s_w[tap][ch] (0 where pruned) and the keep bits: zeroed by all threads, then
    // filled from the CSR by one thread per channel (the only writer of its channel's words).
    for (int e = tid; e < KT * CB; e += THREADS) s_w[e] = 0.0f;
    for (int e = tid; e < MASK_WORDS * CB; e += THREADS) s_mask[e] = 0u;
    __syncthreads();
    for (int ch = tid; ch < CB; ch += THREADS) {
        const int c = c0 + ch;
        if (c < C) {
            const int t0 = tap_ptr[c];
            const int t1 = t0 + min(tap_ptr[c + 1] - t0, KT);
            for (int t = t0; t < t1; ++t) {
                const int k = tap_idx[t];
                if (k < 0 || k >= KT) continue;  // corrupt index: contribute nothing, never read outside the tile
                s_w[k * CB + ch] = tap_val[t];
                s_mask[(k >> 5) * CB + ch] |= 1u << (k & 31);
            }
        }
    }

    // Input tile with halo, INFLIGHT loads per thread in flight (registers) before the shared-memory stores.
    {
        const scalar_t* xn = x + static_cast<long long>(n) * H * W * C;
        constexpr int ITEMS = IN_H * IN_W * NV;
#if DEPRUNE_VEC > 1
        typedef vec16 item_t;
#else
        typedef scalar_t item_t;
#endif
        item_t* s_items = reinterpret_cast<item_t*>(s_in);
        for (int e0 = 0; e0 < ITEMS; e0 += THREADS * INFLIGHT) {
            item_t v[INFLIGHT];
#pragma unroll
            for (int b = 0; b < INFLIGHT; ++b) {
                const int e = e0 + b * THREADS + tid;
                const int pix = e / NV;      // constant divisors: multiply-shift, no division
                const int ly = pix / IN_W;
                const int iy = iy0 + ly;
                const int ix = ix0 + pix - ly * IN_W;
                const int cc = c0 + (e - pix * NV) * VEC;
                // The vector path has C % VEC == 0, so a vector is all in or all out of [0, C).
                const bool in = e < ITEMS && cc < C && iy >= 0 && iy < H && ix >= 0 && ix < W;
#if DEPRUNE_VEC > 1
                v[b] = vec16{0u, 0u, 0u, 0u};
                if (in) v[b] = *reinterpret_cast<const vec16*>(xn + (iy * W + ix) * C + cc);
#else
                v[b] = zero<scalar_t>();
                if (in) v[b] = xn[(iy * W + ix) * C + cc];
#endif
            }
#pragma unroll
            for (int b = 0; b < INFLIGHT; ++b) {
                const int e = e0 + b * THREADS + tid;
                if (e < ITEMS) s_items[e] = v[b];
            }
        }
    }
    __syncthreads();

    const int vi = tid % NV;
    const int pg = tid / NV;
    const int lx = pg % TILE_W;
    const int ly0 = pg / TILE_W * ROWS;
    const int ch0 = vi * VEC;
    // Taps any channel of this thread's vector keeps.
    unsigned int keep[MASK_WORDS];
#pragma unroll
    for (int m = 0; m < MASK_WORDS; ++m) {
        keep[m] = 0u;
#pragma unroll
        for (int l = 0; l < VEC; ++l) keep[m] |= s_mask[m * CB + ch0 + l];
    }
    float acc[ROWS][VEC];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int l = 0; l < VEC; ++l) acc[r][l] = 0.0f;

    // Element (window row wr, window column wc) of this thread's sliding window, channel ch0.
    const scalar_t* s_win = s_in + ((ly0 * SH) * IN_W + lx * SW) * CB + ch0;
#if DEPRUNE_KH <= 7 && DEPRUNE_KW <= 7  // unrolled sliding window; larger windows would explode the code
    {
#pragma unroll
        for (int j = 0; j < KW; ++j) {
            // Weights of window column j (only the kept taps' are read).
            float w[KH][VEC];
#pragma unroll
            for (int i = 0; i < KH; ++i) {
                const int t = i * KW + j;
                if ((keep[t >> 5] >> (t & 31)) & 1u) {
#pragma unroll
                    for (int l = 0; l < VEC; ++l) w[i][l] = s_w[t * CB + ch0 + l];
                }
            }
#pragma unroll
            for (int ir = 0; ir < WIN; ++ir) {
                // Is input row ir used by a kept tap of column j? (Compile-time pairs (r, i), runtime bits.)
                bool used = false;
#pragma unroll
                for (int i = 0; i < KH; ++i) {
                    const int d = ir - i * DH;
                    const int t = i * KW + j;
                    if (d >= 0 && d % SH == 0 && d / SH < ROWS) used |= ((keep[t >> 5] >> (t & 31)) & 1u) != 0u;
                }
                if (!used) continue;
                float v[VEC];
                load_lane(s_win + (ir * IN_W + j * DW) * CB, v);
#pragma unroll
                for (int i = 0; i < KH; ++i) {
                    const int d = ir - i * DH;
                    const int t = i * KW + j;
                    if (d >= 0 && d % SH == 0 && d / SH < ROWS && ((keep[t >> 5] >> (t & 31)) & 1u)) {
#pragma unroll
                        for (int l = 0; l < VEC; ++l) acc[d / SH][l] += w[i][l] * v[l];
                    }
                }
            }
        }
    }
#else
    {
        // Large windows: a runtime loop over the taps, skipping those the vector does not keep.
#pragma unroll 1
        for (int t = 0; t < KT; ++t) {
            unsigned int word = 0u;
#pragma unroll
            for (int l = 0; l < VEC; ++l) word |= s_mask[(t >> 5) * CB + ch0 + l];
            if (!((word >> (t & 31)) & 1u)) continue;
            const int i = t / KW;  // constant divisor
            const int j = t - i * KW;
            float w[VEC];
#pragma unroll
            for (int l = 0; l < VEC; ++l) w[l] = s_w[t * CB + ch0 + l];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                float v[VEC];
                load_lane(s_win + ((r * SH + i * DH) * IN_W + j * DW) * CB, v);
#pragma unroll
                for (int l = 0; l < VEC; ++l) acc[r][l] += w[l] * v[l];
            }
        }
    }
#endif

    // Epilogue: bias + activation, VEC channels per store (one 16-byte store on the vector path).
    float bv[VEC];
#pragma unroll
    for (int l = 0; l < VEC; ++l) {
        const int c = c0 + ch0 + l;
        bv[l] = (bias != nullptr && c < C) ? bias[c] : 0.0f;
    }
    const int ox = ox0 + lx;
    scalar_t* yn = y + static_cast<long long>(n) * OH * OW * C;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int oy = oy0 + ly0 + r;
        if (oy >= OH || ox >= OW) continue;
        float o[VEC];
#pragma unroll
        for (int l = 0; l < VEC; ++l) o[l] = deprune_activate(acc[r][l] + bv[l], act);
        scalar_t* yp = yn + (oy * OW + ox) * C + c0 + ch0;
        if constexpr (VEC > 1) {
            if (c0 + ch0 < C) *reinterpret_cast<vec16*>(yp) = pack<scalar_t>(o);
        } else {
            if (c0 + ch0 < C) deprune_store(yp, o[0]);
        }
    }
#endif
}
