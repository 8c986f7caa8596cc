// dw_direct.cu: direct tap-sparse depth-wise convolution with a fused epilogue.
//
//   y[n, c, oy, ox] = act(bias[c] + sum_{t in taps(c)} val[t] * x[n, c, oy*SH - PH + i_t*DH, ox*SW - PW + j_t*DW])
//
// taps(c) is the CSR slice tap_ptr[c] .. tap_ptr[c+1] of (tap_idx = i*KW + j, tap_val) pairs: every output
// only visits its channel's kept taps, so the FMA and shared-memory work scales with the kept-tap count
// while global traffic stays at the dense minimum (each input pixel loaded once per CTA tile + halo).
// BatchNorm is folded into val/bias by the caller. Storage is fp32/fp16/bf16, accumulation always fp32.
// PH / PW are the TOP / LEFT zero padding; the padding may be asymmetric (TensorFlow "SAME"): the bottom /
// right padding only sets OH / OW, which the host computes (deprune_plugin/kernels/launch.py), and every
// input read outside [0, H) x [0, W) is a zero.
//
// Specialisation (#defines prepended by deprune_plugin/kernels/sources.py; the defaults let nvcc
// compile the file on its own):
//   DEPRUNE_SCALAR       float | __half | __nv_bfloat16
//   DEPRUNE_LAYOUT_NHWC  0: NCHW-contiguous x and y, 1: channels_last (NHWC) x and y
//   DEPRUNE_ROWS         NCHW: output rows per thread (register blocking along H)
//   DEPRUNE_PIX          NHWC: output pixels per thread
// Entry point: deprune_dw_direct. Launch geometry is chosen by deprune_plugin/kernels/dw_direct.py:
//   NCHW: block (tile_w, tile_h / DEPRUNE_ROWS), grid (tiles_h * tiles_w, C, N)
//   NHWC: block (channel block cb, tile_h * tile_w / DEPRUNE_PIX), grid (tiles_h * tiles_w, ceil(C / cb), N)
//   dynamic shared memory: see the smem layout comments below.

#ifndef DEPRUNE_SCALAR
#define DEPRUNE_SCALAR float
#endif
#ifndef DEPRUNE_LAYOUT_NHWC
#define DEPRUNE_LAYOUT_NHWC 0
#endif
#ifndef DEPRUNE_ROWS
#define DEPRUNE_ROWS 4
#endif
#ifndef DEPRUNE_PIX
#define DEPRUNE_PIX 4
#endif

#include "deprune_common.cuh"

// __launch_bounds__(256, 2): lets ptxas use up to 128 registers; it then keeps the register tiles
// without spilling on sm_80 and sm_90 (checked by tests/test_kernels_nvcc.py).
extern "C" __global__ void __launch_bounds__(256, 2) deprune_dw_direct(
    const scalar_t* __restrict__ x,        // [N, C, H, W] or [N, H, W, C]
    scalar_t* __restrict__ y,              // [N, C, OH, OW] or [N, OH, OW, C]
    const int* __restrict__ tap_ptr,       // [C + 1]
    const int* __restrict__ tap_idx,       // [nnz], i * KW + j
    const float* __restrict__ tap_val,     // [nnz]
    const float* __restrict__ bias,        // [C] or nullptr
    int N, int C, int H, int W, int OH, int OW, int KH, int KW,
    int SH, int SW, int PH, int PW, int DH, int DW,  // PH, PW: top and left padding
    int tile_h, int tile_w,                // output tile of one CTA (see the launch geometry above)
    int act) {
    const int tiles_w = (OW + tile_w - 1) / tile_w;
    const int oy0 = static_cast<int>(blockIdx.x) / tiles_w * tile_h;
    const int ox0 = static_cast<int>(blockIdx.x) % tiles_w * tile_w;
    const int n = blockIdx.z;
    // Input window of the tile including its halo; (iy0, ix0) may be negative (zero padding).
    const int in_h = (tile_h - 1) * SH + (KH - 1) * DH + 1;
    const int in_w = (tile_w - 1) * SW + (KW - 1) * DW + 1;
    const int iy0 = oy0 * SH - PH;
    const int ix0 = ox0 * SW - PW;
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    const int nthreads = blockDim.x * blockDim.y;
    const int ktaps = KH * KW;

#if !DEPRUNE_LAYOUT_NHWC
    // ---------------------------------------------------------------------------------------------
    // NCHW: one CTA = a tile_h x tile_w output tile of one (n, c) plane; tile_w == blockDim.x and
    // tile_h == blockDim.y * DEPRUNE_ROWS. A warp spans consecutive output columns, so the tile load
    // (consecutive input columns) and the stores are coalesced along W.
    // smem: s_val[ktaps] | s_off[ktaps] (tap offset inside the tile) | s_in[in_h * in_w] (fp32)
    // ---------------------------------------------------------------------------------------------
    (void)N;
    const int c = blockIdx.y;
    DEPRUNE_DYNAMIC_SMEM(float, smem);
    float* s_val = smem;
    int* s_off = reinterpret_cast<int*>(smem + ktaps);
    float* s_in = smem + 2 * ktaps;

    const int t0 = tap_ptr[c];
    const int ntaps = min(tap_ptr[c + 1] - t0, ktaps);
    for (int t = tid; t < ntaps; t += nthreads) {
        const int k = tap_idx[t0 + t];
        const bool ok = k >= 0 && k < ktaps;  // a corrupt index contributes nothing instead of reading out of the tile
        s_val[t] = ok ? tap_val[t0 + t] : 0.0f;
        s_off[t] = ok ? (k / KW) * DH * in_w + (k % KW) * DW : 0;
    }
    // A fully pruned channel only needs its bias: skip the tile load (the branch is CTA-uniform and
    // every thread still reaches the barrier below).
    if (ntaps > 0) {
        const scalar_t* xp = x + (static_cast<long long>(n) * C + c) * H * W;
        for (int e = tid; e < in_h * in_w; e += nthreads) {
            const int ly = e / in_w;
            const int lx = e - ly * in_w;
            const int iy = iy0 + ly;
            const int ix = ix0 + lx;
            float v = 0.0f;
            if (iy >= 0 && iy < H && ix >= 0 && ix < W) v = deprune_to_float(xp[static_cast<long long>(iy) * W + ix]);
            s_in[e] = v;
        }
    }
    __syncthreads();

    // Register blocking: each thread owns DEPRUNE_ROWS vertically adjacent outputs, so one tap
    // (weight + offset read from smem once) feeds DEPRUNE_ROWS FMAs.
    const int ly0 = threadIdx.y * DEPRUNE_ROWS;
    const int row_step = SH * in_w;
    const float* s_base = s_in + ly0 * row_step + threadIdx.x * SW;
    float acc[DEPRUNE_ROWS];
#pragma unroll
    for (int r = 0; r < DEPRUNE_ROWS; ++r) acc[r] = 0.0f;
    for (int t = 0; t < ntaps; ++t) {
        const float w = s_val[t];
        const float* p = s_base + s_off[t];
#pragma unroll
        for (int r = 0; r < DEPRUNE_ROWS; ++r) acc[r] += w * p[r * row_step];
    }

    const float b = bias != nullptr ? bias[c] : 0.0f;
    const int ox = ox0 + threadIdx.x;
    scalar_t* yp = y + (static_cast<long long>(n) * C + c) * OH * OW;
#pragma unroll
    for (int r = 0; r < DEPRUNE_ROWS; ++r) {
        const int oy = oy0 + ly0 + r;
        if (oy < OH && ox < OW)
            deprune_store(yp + static_cast<long long>(oy) * OW + ox, deprune_activate(acc[r] + b, act));
    }
#else
    // ---------------------------------------------------------------------------------------------
    // NHWC: one CTA = a tile_h x tile_w output tile x cb = blockDim.x consecutive channels, with
    // tile_h * tile_w == blockDim.y * DEPRUNE_PIX. threadIdx.x is the channel: every warp access
    // (global load, smem read, global store) touches consecutive channels of one pixel, i.e. is
    // coalesced / bank-conflict free. Channels of a warp may keep different taps: each thread walks
    // its own CSR slice (divergence costs at most max-taps-per-warp iterations).
    // smem: s_in[in_h][in_w][cb] (fp32)
    // ---------------------------------------------------------------------------------------------
    (void)N;
    const int cb = blockDim.x;
    const int c0 = blockIdx.y * cb;
    DEPRUNE_DYNAMIC_SMEM(float, s_in);

    const scalar_t* xn = x + static_cast<long long>(n) * H * W * C;
    for (int e = tid; e < in_h * in_w * cb; e += nthreads) {
        const int ch = e % cb;
        const int pix = e / cb;
        const int ly = pix / in_w;
        const int lx = pix - ly * in_w;
        const int iy = iy0 + ly;
        const int ix = ix0 + lx;
        const int cc = c0 + ch;
        float v = 0.0f;
        if (cc < C && iy >= 0 && iy < H && ix >= 0 && ix < W)
            v = deprune_to_float(xn[(static_cast<long long>(iy) * W + ix) * C + cc]);
        s_in[e] = v;
    }
    __syncthreads();

    const int ch = threadIdx.x;
    const int c = c0 + ch;
    int t0 = 0, t1 = 0;  // channel-tail threads (c >= C) run no taps but stay for uniform control flow
    if (c < C) {
        t0 = tap_ptr[c];
        t1 = t0 + min(tap_ptr[c + 1] - t0, ktaps);
    }
    int base[DEPRUNE_PIX];
    float acc[DEPRUNE_PIX];
#pragma unroll
    for (int q = 0; q < DEPRUNE_PIX; ++q) {
        const int p = threadIdx.y + q * blockDim.y;
        const int ly = p / tile_w;
        const int lx = p - ly * tile_w;
        base[q] = ((ly * SH) * in_w + lx * SW) * cb + ch;
        acc[q] = 0.0f;
    }
    for (int t = t0; t < t1; ++t) {
        const int k = tap_idx[t];
        if (k < 0 || k >= ktaps) continue;  // corrupt index: contribute nothing, never read outside the tile
        const float w = tap_val[t];
        const int off = ((k / KW) * DH * in_w + (k % KW) * DW) * cb;
#pragma unroll
        for (int q = 0; q < DEPRUNE_PIX; ++q) acc[q] += w * s_in[base[q] + off];
    }

    const float b = (c < C && bias != nullptr) ? bias[c] : 0.0f;
    scalar_t* yn = y + static_cast<long long>(n) * OH * OW * C;
#pragma unroll
    for (int q = 0; q < DEPRUNE_PIX; ++q) {
        const int p = threadIdx.y + q * blockDim.y;
        const int oy = oy0 + p / tile_w;
        const int ox = ox0 + p % tile_w;
        if (c < C && oy < OH && ox < OW)
            deprune_store(yn + (static_cast<long long>(oy) * OW + ox) * C + c, deprune_activate(acc[q] + b, act));
    }
#endif
}
