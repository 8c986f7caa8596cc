// dw_dr.cu: the paper's diagonal-wise refactorization (DR) form of a tap-pruned depth-wise conv, run as
// DEPrune runs it: one GEMM per 32-channel balanced range, over the range's K' kept columns only, on
// tensor cores (mma.sync m16n8k16, fp16/bf16 in, fp32 accumulate, sm_80+).
//
// Channels are split into balanced ranges g = [g*GS, min((g+1)*GS, C)). Range g is one sub-GEMM
//
//   out[c, p] = act(bias[c] + sum_j W_g[c, j] * X_g[j, p])      c in range g, p = output position
//
// over its K'_g kept (channel, tap) columns j = col_ptr[g] .. col_ptr[g] + col_kept[g], where
//   W_g[c, j] = col_val[j] if col_chan[j] == c else 0      (DR's block diagonal: one non-zero per column)
//   X_g[j, p] = x[n, col_chan[j], oy*SH - PH + i_j*DH, ox*SW - PW + j_j*DW]   (im2col on the fly, tap = i*KW + j)
// PH / PW are the TOP / LEFT zero padding; the padding may be asymmetric (TensorFlow "SAME"): the bottom /
// right padding only sets OH / OW, computed on the host, and every read outside the image is a zero.
//
// Tiling. A CTA computes the GSP x PT output tile of one range (GSP = GS rounded up to 16 rows, PT output
// positions, flattened oy*OW + ox) of one image. The K loop walks the kept columns in K tiles of KT = 32:
// (1) the tile's column metadata goes to shared memory, (2) the CTA gathers the KT x PT im2col tile X_g
// into shared memory (zeros outside the image), (3) the GEMM update. Two barriers per K tile: the
// per-column weights the GEMM reads are double-buffered by tile parity, so no third barrier is needed
// before the next tile's metadata is written (the old kernel's trailing barrier was redundant).
//
// Tensor-core path (DEPRUNE_DR_MMA=1, fp16/bf16 storage, compiled where __CUDA_ARCH__ >= 800 and in the
// host emulation): A = W_g in m16 x k16 fragments, built in registers from the packed (row, weight) of
// each column (no dense W_g in memory); B = X_g in k16 x n8 fragments read from the [position][column]
// fp16/bf16 tile; C/D = fp32 accumulators. Eight warps split the PT positions; each warp owns all GSP/16
// row tiles of its PT/8 positions. The fp32 weight w enters as two 16-bit A operands, hi = w rounded to the
// storage type and lo = (w - hi) rounded again (two MMAs per tile): the products carry 16 (bf16) or 22 (fp16)
// significant bits of w, so the GEMM multiplies the weights the fallback multiplies in fp32, not weights
// rounded to bf16 (|w| must stay below the storage type's maximum, 65504 for fp16).
//
// K steps and HSR. Kept columns map onto MMA K steps in order: columns 16s .. 16s+15 of the range are
// K step s; a K tile of 32 columns is two K steps. The kernel runs ceil(K'_g / 16) K steps per range, so
// HSR's column tile (32 = two K steps, or 16 = one) is what makes every K step full: a range whose K'
// is a multiple of 16 wastes nothing, and with K' = 16q + r (0 < r < 16) the last K step carries 16 - r
// zero columns: their A entries are 0 and their X_g rows are zeros that are never loaded from memory
// (DRColumns' own padding columns, beyond col_kept, are skipped the same way). On the GPU a partial K
// step costs a full MMA, so time falls in steps of 16 kept columns per range, the step function HSR
// aligns to.
//
// CUDA-core fallback (fp32 storage, or fp16/bf16 compiled for __CUDA_ARCH__ < 800): the same staging and
// the same sums, computed as sparse rank-1 updates: warp w owns rows [w*GSP/8, (w+1)*GSP/8), each lane PT/32
// positions, and a column updates only its own row (one FMA per kept column and position: the zeros of
// W_g are skipped instead of multiplied), with the fp32 weights: both paths give the same results up to the
// order of the fp32 sums and the last bits of the hi + lo weight split.
//
// Epilogue (both paths): the fp32 GSP x PT tile goes through shared memory (aliasing the X tile) and
// is written with coalesced stores (position-fastest in NCHW, channel-fastest in NHWC), bias (folded BN)
// and activation applied.
//
// Unlike the paper's dense sub-GEMM, explicit zeros of W_g only multiply finite data on the fallback; on
// tensor cores a non-finite input (inf/nan) of a column makes that K step's whole 16-row tile nan
// (0 * inf), so, as for any dense DR GEMM, an inf/nan input may poison other outputs of its range.
//
// Specialisation (#defines prepended by deprune_plugin/kernels/dw_dr.py; defaults compile alone):
//   DEPRUNE_SCALAR        float | __half | __nv_bfloat16
//   DEPRUNE_LAYOUT_NHWC   0: NCHW-contiguous, 1: channels_last (NHWC)
//   DEPRUNE_GROUP_SIZE    GS, channels per balanced range (rows of W_g), <= 128
//   DEPRUNE_KTILE         KT, columns per K tile (a multiple of 16)
//   DEPRUNE_DR_PT         PT, output positions per CTA (a multiple of 64; planned on the host)
//   DEPRUNE_DR_MMA        1: tensor cores for fp16/bf16 (where the target has them), 0: CUDA cores
//   DEPRUNE_KH, DEPRUNE_KW, DEPRUNE_SH, DEPRUNE_SW, DEPRUNE_DH, DEPRUNE_DW: window, stride, dilation
//     (compile-time: the tap decode tap / KW and the window offsets are constants)
// Entry point: deprune_dw_dr, block (256, 1, 1), grid (ceil(OH*OW / PT), G, N), no dynamic smem.

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
#ifndef DEPRUNE_DR_PT
#define DEPRUNE_DR_PT 256
#endif
#ifndef DEPRUNE_DR_MMA
#define DEPRUNE_DR_MMA 0
#endif
#include "deprune_window.cuh"

#include "deprune_common.cuh"

// Tensor cores where the target has mma.sync m16n8k16 (sm_80+) and always in the host emulation.
#if DEPRUNE_DR_MMA && (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800)
#define DR_USE_MMA 1
#else
#define DR_USE_MMA 0
#endif

#define DR_THREADS 256
#define DR_WARPS (DR_THREADS / 32)
#define DR_KT DEPRUNE_KTILE
#define DR_PT DEPRUNE_DR_PT
#define DR_GSP (((DEPRUNE_GROUP_SIZE + 15) / 16) * 16)  // rows, rounded up to whole m16 tiles
#define DR_MT (DR_GSP / 16)                            // m16 tiles (MMA path)
#define DR_WN (DR_PT / DR_WARPS)                       // positions per warp (MMA path)
#define DR_NT (DR_WN / 8)                              // n8 tiles per warp (MMA path)
#define DR_XS (DR_KT / 2 + 4)    // 32-bit words per position of the 16-bit X tile; +4 words: the B fragment
                                 // loads (8 positions x 4 column pairs per warp) hit 32 different banks
// Word of column pair kp of position pp in the X tile. A row of DR_XS = 4 mod 8 words puts 8 consecutive
// positions in 8 different 4-bank groups, and positions 8 apart in the same group: the NCHW staging (32
// consecutive positions, one pair) would conflict 4-way. XOR-ing the pair's low 2 bits with (pp / 8) % 4
// moves each run of 8 positions to its own bank of the group (conflict-free); a B fragment load reads 8
// positions of one run, so its 4 pairs are only permuted (still 32 banks).
#define DR_XW(pp, kp) ((pp) * DR_XS + ((kp) ^ (((pp) >> 3) & 3)))
#define DR_RW (DR_GSP / DR_WARPS)  // rows per warp (fallback)
#define DR_QP (DR_PT / 32)         // positions per lane (fallback)
#define DR_YS (DR_PT + 1)          // words per row of the fp32 tiles; odd, so column walks are conflict-free
#if DR_USE_MMA
#define DR_X_WORDS (DR_PT * DR_XS)
#else
#define DR_X_WORDS (DR_KT * DR_YS)
#endif
#define DR_Y_WORDS (DR_GSP * DR_YS)
#define DR_BUF_WORDS (DR_X_WORDS > DR_Y_WORDS ? DR_X_WORDS : DR_Y_WORDS)
#define DR_TAPS (DEPRUNE_KH * DEPRUNE_KW)
#define DR_OUTSIDE (-(1 << 29))  // input coordinate that is never in bounds

static_assert(DEPRUNE_GROUP_SIZE >= 1 && DEPRUNE_GROUP_SIZE <= 128, "group size must be in [1, 128]");
static_assert(DR_KT % 16 == 0 && DR_KT <= DR_THREADS, "the K tile is whole K steps, one column per thread");
static_assert(DR_PT % 64 == 0 && DR_PT >= 64, "positions per CTA: whole n8 tiles per warp, whole warps of lanes");
static_assert(DR_GSP * DR_PT <= 32 * DR_THREADS, "at most 32 fp32 accumulators per thread");
static_assert(DR_THREADS % DR_PT == 0 && DR_THREADS % DR_KT == 0, "fixed staging position / column per thread");

// Resident CTAs per SM the register allocation must allow: 3 (<= 85 registers) up to 64 rows (32 accumulators
// and 16 B-fragment registers fit), 2 for the 128-row ranges.
#define DR_MIN_BLOCKS (DR_GSP <= 64 ? 3 : 2)

#if DR_USE_MMA
static_assert(sizeof(scalar_t) == 2, "the tensor-core path takes fp16 or bf16 storage");
#endif

// 16-bit storage bits of one element (the operands of mma.sync are raw f16/bf16 pairs).
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
__device__ __forceinline__ unsigned int dr_bits(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ unsigned int dr_bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
#else
inline unsigned int dr_bits(__half v) { return v.x; }
inline unsigned int dr_bits(__nv_bfloat16 v) { return v.x; }
#endif
__device__ __forceinline__ unsigned int dr_bits(float) { return 0u; }  // fp32 never takes the MMA path

// d += A * B for one warp: mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 (fragment
// layouts: cuda_host_emulation.h, warp-level matrix section). The scalar argument only picks the type.
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
__device__ __forceinline__ void dr_mma(float (&d)[4], const unsigned int (&a)[4], const unsigned int (&b)[2],
                                       __half) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
__device__ __forceinline__ void dr_mma(float (&d)[4], const unsigned int (&a)[4], const unsigned int (&b)[2],
                                       __nv_bfloat16) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
#else
inline void dr_mma(float (&d)[4], const unsigned int (&a)[4], const unsigned int (&b)[2], __half) {
    deprune_emu_mma_m16n8k16(deprune_emu::MmaType::f16, d, a, b, d);
}
inline void dr_mma(float (&d)[4], const unsigned int (&a)[4], const unsigned int (&b)[2], __nv_bfloat16) {
    deprune_emu_mma_m16n8k16(deprune_emu::MmaType::bf16, d, a, b, d);
}
#endif
__device__ __forceinline__ void dr_mma(float (&)[4], const unsigned int (&)[4], const unsigned int (&)[2], float) {}

// The 16-bit A element of column word `col` ((row << 16) | weight bits) in row `row`: W_g's block diagonal.
__device__ __forceinline__ unsigned int dr_a_elem(unsigned int col, int row) {
    return (col >> 16) == static_cast<unsigned int>(row) ? (col & 0xffffu) : 0u;
}

// One im2col element X_g[column, position] of image xn: input (iy, ix) of the column's channel (element
// offset `off`: the channel in NHWC, its plane in NCHW), or 0 outside the image. 32-bit index arithmetic:
// one image has < 2^31 elements (checked on the host).
__device__ __forceinline__ bool dr_inside(int iy, int ix, int H, int W) {
    return static_cast<unsigned int>(iy) < static_cast<unsigned int>(H) &&
           static_cast<unsigned int>(ix) < static_cast<unsigned int>(W);
}
__device__ __forceinline__ int dr_index(int iy, int ix, int off, int W, int C) {
#if DEPRUNE_LAYOUT_NHWC
    return (iy * W + ix) * C + off;
#else
    (void)C;
    return off + iy * W + ix;
#endif
}
__device__ __forceinline__ unsigned int dr_gather_bits(const scalar_t* __restrict__ xn, int iy, int ix, int off,
                                                       int H, int W, int C) {
    return dr_inside(iy, ix, H, W) ? dr_bits(xn[dr_index(iy, ix, off, W, C)]) : 0u;
}
__device__ __forceinline__ float dr_gather(const scalar_t* __restrict__ xn, int iy, int ix, int off, int H, int W,
                                           int C) {
    return dr_inside(iy, ix, H, W) ? deprune_to_float(xn[dr_index(iy, ix, off, W, C)]) : 0.0f;
}

extern "C" __global__ void __launch_bounds__(DR_THREADS, DR_MIN_BLOCKS) deprune_dw_dr(
    const scalar_t* __restrict__ x,        // [N, C, H, W] or [N, H, W, C]
    scalar_t* __restrict__ y,              // [N, C, OH, OW] or [N, OH, OW, C]
    const int* __restrict__ col_ptr,       // [G + 1] padded column offsets of the ranges
    const int* __restrict__ col_chan,      // [ncols] layer channel of each column
    const int* __restrict__ col_tap,       // [ncols] i * KW + j
    const float* __restrict__ col_val,     // [ncols] weight (BN folded)
    const int* __restrict__ col_kept,      // [G] K'_g: the range's kept columns (the rest is padding)
    const float* __restrict__ bias,        // [C] or nullptr
    int C, int H, int W, int OH, int OW, int PH, int PW,  // PH, PW: top and left padding
    int act) {
    // X tile during the K loop, then the fp32 output tile (the two are never live together).
    __shared__ __align__(16) float s_buf[DR_BUF_WORDS];
    __shared__ int s_py[DR_PT];     // oy * SH - PH per CTA position (DR_OUTSIDE past the end)
    __shared__ int s_px[DR_PT];     // ox * SW - PW
    __shared__ int s_coff[DR_KT];   // element offset of the column's channel (plane in NCHW)
    __shared__ int s_dy[DR_KT];     // tap row offset i * DH (DR_OUTSIDE: masked column)
    __shared__ int s_dx[DR_KT];     // tap column offset j * DW
#if DR_USE_MMA
    __shared__ unsigned int s_ahi[2][DR_KT];  // (row in range << 16) | bits of hi(weight); 0xffff0000: no row
    __shared__ unsigned int s_alo[2][DR_KT];  // (row in range << 16) | bits of lo(weight) = weight - hi
#else
    __shared__ int s_row[2][DR_KT];    // row in range, -1: masked
    __shared__ float s_wv[2][DR_KT];   // fp32 weight
#endif

    const int g = blockIdx.y;
    const int n = blockIdx.z;
    const int c0 = g * DEPRUNE_GROUP_SIZE;
    const int c1 = min(c0 + DEPRUNE_GROUP_SIZE, C);
    const int P = OH * OW;
    const int p0 = blockIdx.x * DR_PT;
    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;

    for (int e = tid; e < DR_PT; e += DR_THREADS) {
        const int p = p0 + e;
        const int oy = p / OW;  // once per position and CTA, not per element
        const int ox = p - oy * OW;
        s_py[e] = p < P ? oy * DEPRUNE_SH - PH : DR_OUTSIDE;
        s_px[e] = p < P ? ox * DEPRUNE_SW - PW : DR_OUTSIDE;
    }

#if DR_USE_MMA
    const int group = lane >> 2;  // PTX groupID
    const int tig = lane & 3;     // PTX threadID_in_group
    const int wn0 = warp * DR_WN;
    // Warp-uniform: a warp whose positions all lie past the end skips its MMAs (but not the barriers).
    const bool warp_live = p0 + wn0 < P;
    unsigned int* s_xw = reinterpret_cast<unsigned int*>(s_buf);  // [DR_PT][DR_XS]: column pairs per position
    float acc[DR_MT][DR_NT][4];
#pragma unroll
    for (int mt = 0; mt < DR_MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < DR_NT; ++nt)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[mt][nt][r] = 0.0f;
#else
    float* s_xf = s_buf;  // [DR_KT][DR_YS]: positions per column
    const int rbase = warp * DR_RW;
    float acc[DR_RW][DR_QP];
#pragma unroll
    for (int i = 0; i < DR_RW; ++i)
#pragma unroll
        for (int q = 0; q < DR_QP; ++q) acc[i][q] = 0.0f;
#endif

    const scalar_t* xn = x + static_cast<long long>(n) * C * H * W;
    const int k_begin = col_ptr[g];
    const int k_end = k_begin + col_kept[g];  // padding columns past K'_g are never read
    int parity = 0;
    for (int k0 = k_begin; k0 < k_end; k0 += DR_KT, parity ^= 1) {
        // (1) Column metadata. A column past K'_g, or whose channel / tap lies outside the range / window,
        // is masked: no row (zero in W_g) and an out-of-bounds input coordinate (zero in X_g, no load).
        if (tid < DR_KT) {
            const int j = k0 + tid;
            int chan = -1, tap = -1;
            float v = 0.0f;
            if (j < k_end) {
                chan = col_chan[j];
                tap = col_tap[j];
                v = col_val[j];
            }
            const bool ok = chan >= c0 && chan < c1 && tap >= 0 && tap < DR_TAPS;
            const int ti = tap / DEPRUNE_KW;  // compile-time divisor
#if DEPRUNE_LAYOUT_NHWC
            s_coff[tid] = ok ? chan : 0;
#else
            s_coff[tid] = ok ? chan * H * W : 0;
#endif
            s_dy[tid] = ok ? ti * DEPRUNE_DH : DR_OUTSIDE;
            s_dx[tid] = ok ? (tap - ti * DEPRUNE_KW) * DEPRUNE_DW : DR_OUTSIDE;
#if DR_USE_MMA
            scalar_t hi, lo;
            deprune_store(&hi, v);
            deprune_store(&lo, v - deprune_to_float(hi));  // exact in fp32: hi is v rounded
            const unsigned int row = ok ? static_cast<unsigned int>(chan - c0) << 16 : 0xffff0000u;
            s_ahi[parity][tid] = row | (ok ? dr_bits(hi) : 0u);
            s_alo[parity][tid] = row | (ok ? dr_bits(lo) : 0u);
#else
            s_row[parity][tid] = ok ? chan - c0 : -1;
            s_wv[parity][tid] = ok ? v : 0.0f;
#endif
        }
        __syncthreads();

        // (2) im2col tile X_g, zero outside the image (padding), past the last position and for masked
        // columns. Each thread keeps one column (pair) for the whole tile in NHWC, one position in NCHW
        // (THREADS is a multiple of KT/2 and of PT), so that half of the metadata sits in registers.
        // NHWC: column-fastest (the columns of one tap are nearby channels of one pixel); NCHW:
        // position-fastest (consecutive positions read consecutive input columns).
#if DR_USE_MMA
#if DEPRUNE_LAYOUT_NHWC
        {
            const int kp = tid % (DR_KT / 2);
            const int dy0 = s_dy[2 * kp], dx0 = s_dx[2 * kp], off0 = s_coff[2 * kp];
            const int dy1 = s_dy[2 * kp + 1], dx1 = s_dx[2 * kp + 1], off1 = s_coff[2 * kp + 1];
#pragma unroll 4
            for (int pp = tid / (DR_KT / 2); pp < DR_PT; pp += DR_THREADS / (DR_KT / 2)) {
                const int py = s_py[pp], px = s_px[pp];
                const unsigned int lo = dr_gather_bits(xn, py + dy0, px + dx0, off0, H, W, C);
                const unsigned int hi = dr_gather_bits(xn, py + dy1, px + dx1, off1, H, W, C);
                s_xw[DR_XW(pp, kp)] = lo | (hi << 16);
            }
        }
#else
        {
            const int pp = tid % DR_PT;
            const int py = s_py[pp], px = s_px[pp];
#pragma unroll 4
            for (int kp = tid / DR_PT; kp < DR_KT / 2; kp += DR_THREADS / DR_PT) {
                const int k = 2 * kp;
                const unsigned int lo = dr_gather_bits(xn, py + s_dy[k], px + s_dx[k], s_coff[k], H, W, C);
                const unsigned int hi = dr_gather_bits(xn, py + s_dy[k + 1], px + s_dx[k + 1], s_coff[k + 1], H, W, C);
                s_xw[DR_XW(pp, kp)] = lo | (hi << 16);
            }
        }
#endif
#else
#if DEPRUNE_LAYOUT_NHWC
        {
            const int k = tid % DR_KT;
            const int dy = s_dy[k], dx = s_dx[k], off = s_coff[k];
#pragma unroll 4
            for (int pp = tid / DR_KT; pp < DR_PT; pp += DR_THREADS / DR_KT)
                s_xf[k * DR_YS + pp] = dr_gather(xn, s_py[pp] + dy, s_px[pp] + dx, off, H, W, C);
        }
#else
        {
            const int pp = tid % DR_PT;
            const int py = s_py[pp], px = s_px[pp];
#pragma unroll 4
            for (int k = tid / DR_PT; k < DR_KT; k += DR_THREADS / DR_PT)
                s_xf[k * DR_YS + pp] = dr_gather(xn, py + s_dy[k], px + s_dx[k], s_coff[k], H, W, C);
        }
#endif
#endif
        __syncthreads();

        // (3) GEMM update over the tile's K steps (warp-uniform bounds).
        const int kcount = min(DR_KT, k_end - k0);
#if DR_USE_MMA
        if (warp_live) {
            const int ksteps = (kcount + 15) / 16;
            for (int ks = 0; ks < ksteps; ++ks) {
                // B fragments: column pairs tig and tig + 4 of this K step at position wn0 + nt*8 + group.
                unsigned int b[DR_NT][2];
#pragma unroll
                for (int nt = 0; nt < DR_NT; ++nt) {
                    const int pp = wn0 + nt * 8 + group;
                    b[nt][0] = s_xw[DR_XW(pp, ks * 8 + tig)];
                    b[nt][1] = s_xw[DR_XW(pp, ks * 8 + tig + 4)];
                }
                // A fragments from four columns per lane: tig*2 + {0, 1} (a[0], a[1]) and tig*2 + 8 + {0, 1}
                // (a[2], a[3]); one m16 tile at a time keeps 8 A registers live (hi and lo).
                const int kc = ks * 16 + tig * 2;
                const unsigned int h0 = s_ahi[parity][kc], h1 = s_ahi[parity][kc + 1];
                const unsigned int h8 = s_ahi[parity][kc + 8], h9 = s_ahi[parity][kc + 9];
                const unsigned int l0 = s_alo[parity][kc], l1 = s_alo[parity][kc + 1];
                const unsigned int l8 = s_alo[parity][kc + 8], l9 = s_alo[parity][kc + 9];
#pragma unroll
                for (int mt = 0; mt < DR_MT; ++mt) {
                    const int r0 = mt * 16 + group;
                    const int r1 = r0 + 8;
                    unsigned int ah[4], al[4];
                    ah[0] = dr_a_elem(h0, r0) | (dr_a_elem(h1, r0) << 16);
                    ah[1] = dr_a_elem(h0, r1) | (dr_a_elem(h1, r1) << 16);
                    ah[2] = dr_a_elem(h8, r0) | (dr_a_elem(h9, r0) << 16);
                    ah[3] = dr_a_elem(h8, r1) | (dr_a_elem(h9, r1) << 16);
                    al[0] = dr_a_elem(l0, r0) | (dr_a_elem(l1, r0) << 16);
                    al[1] = dr_a_elem(l0, r1) | (dr_a_elem(l1, r1) << 16);
                    al[2] = dr_a_elem(l8, r0) | (dr_a_elem(l9, r0) << 16);
                    al[3] = dr_a_elem(l8, r1) | (dr_a_elem(l9, r1) << 16);
#pragma unroll
                    for (int nt = 0; nt < DR_NT; ++nt) {
                        dr_mma(acc[mt][nt], ah, b[nt], scalar_t());
                        dr_mma(acc[mt][nt], al, b[nt], scalar_t());
                    }
                }
            }
        }
#else
        for (int k = 0; k < kcount; ++k) {
            const int rk = s_row[parity][k] - rbase;  // warp-uniform
            if (static_cast<unsigned int>(rk) < static_cast<unsigned int>(DR_RW)) {
                const float w = s_wv[parity][k];
                float xv[DR_QP];
#pragma unroll
                for (int q = 0; q < DR_QP; ++q) xv[q] = s_xf[k * DR_YS + lane + 32 * q];
#pragma unroll
                for (int i = 0; i < DR_RW; ++i)
                    if (rk == i)
#pragma unroll
                        for (int q = 0; q < DR_QP; ++q) acc[i][q] = fmaf(w, xv[q], acc[i][q]);
            }
        }
#endif
    }

    // Epilogue: the fp32 tile through shared memory (it aliases the X tile: wait for the last GEMM reads).
    __syncthreads();
    float* s_y = s_buf;  // [DR_GSP][DR_YS]
#if DR_USE_MMA
#pragma unroll
    for (int mt = 0; mt < DR_MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < DR_NT; ++nt)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int row = mt * 16 + group + ((r & 2) ? 8 : 0);
                const int col = wn0 + nt * 8 + tig * 2 + (r & 1);
                s_y[row * DR_YS + col] = acc[mt][nt][r];
            }
#else
#pragma unroll
    for (int i = 0; i < DR_RW; ++i)
#pragma unroll
        for (int q = 0; q < DR_QP; ++q) s_y[(rbase + i) * DR_YS + lane + 32 * q] = acc[i][q];
#endif
    __syncthreads();

    for (int e = tid; e < DR_GSP * DR_PT; e += DR_THREADS) {
#if DEPRUNE_LAYOUT_NHWC
        const int r = e % DR_GSP;  // channel-fastest: consecutive threads store consecutive channels
        const int pp = e / DR_GSP;
#else
        const int pp = e % DR_PT;  // position-fastest
        const int r = e / DR_PT;
#endif
        const int c = c0 + r;
        const int p = p0 + pp;
        if (c >= c1 || p >= P) continue;
        const float v = deprune_activate(s_y[r * DR_YS + pp] + (bias != nullptr ? bias[c] : 0.0f), act);
#if DEPRUNE_LAYOUT_NHWC
        deprune_store(y + (static_cast<long long>(n) * P + p) * C + c, v);
#else
        deprune_store(y + (static_cast<long long>(n) * C + c) * P + p, v);
#endif
    }
}
