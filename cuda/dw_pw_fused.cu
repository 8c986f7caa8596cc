// dw_pw_fused.cu: a depth-wise conv (tap-sparse, folded BN, activation) and the 1x1 conv that reads its
// output (folded BN, optional residual add) in one kernel; the DW output never leaves the chip.
//
//   d[n, p, c]  = act(dw_bias[c] + sum_{t in taps(c)} val[t] * x[n, tap t of output pixel p, c])
//   y[n, p, o]  = pw_bias[o] + sum_c d[n, p, c] * pw_w[o, c]  (+ res[n, p, o])
//
// x, y and res are channels_last (NHWC); pw_w is [CO, C] row-major in the storage type; the biases fp32.
// The kept taps come as two tables the launcher builds once per weight (deprune_plugin/kernels/dw_pw_fused.py:
// fused_tap_tables): tap_w[KT][C] fp32 (the BN-folded weight, 0 where pruned; tap t = i*KW + j) and
// vec_keep[MASK_WORDS][C / VEC] (bit t: some channel of the 16-byte vector keeps tap t), so a chunk's taps
// are staged with the same coalesced loads as its input. Accumulation is fp32 throughout; the DW result is
// rounded to the storage type once (where the unfused pair writes it to memory), so the fused and the
// unfused pair round alike.
//
// One CTA = a TILE_H x TILE_W tile of output pixels (P = TILE_H * TILE_W, 16 .. 128) of one image (or WALK
// such tiles, one below the other) x a block of COB output channels. Per tile it walks the C expanded
// channels in chunks of KC:
//   1. stage the chunk's input tile with halo (16-byte vectors, zeros outside the image; the rows the previous
//      tile of a walk shares come from shared memory), its DW taps (dense fp32 [KT][KC] + keep bits) and its
//      PW weights [COB][KC] into shared memory;
//   2. DW: one item per (DW_ROWS vertically adjacent pixels, 16-byte channel vector): the taps no channel of
//      the vector keeps are skipped; bias, activation, one rounding, the result into the A tile s_a[P][KC];
//   3. PW: s_acc[P][COB] += s_a[P][KC] * s_b[COB][KC]^T, on tensor cores (mma.sync m16n8k16, fp16/bf16 in,
//      fp32 accumulate: each warp owns one m16 row tile and TPW n8 column tiles, accumulators in registers)
//      or, for fp32 storage and before sm_80, on CUDA cores (a thread per pixel and COB*P/256 outputs).
// Epilogue: + pw_bias (+ res), rounded, stored NHWC. Channels past C (the last chunk) and outputs past CO
// are zero-filled / masked, so C and CO need not divide KC / COB (C must be a multiple of the vector).
//
// Geometry is compile-time (#defines prepended by deprune_plugin/kernels/sources.py, chosen by
// deprune_plugin/kernels/dw_pw_fused.py: dw_pw_fused_plan; the defaults below only let nvcc compile the file
// alone):
//   DEPRUNE_SCALAR          float | __half | __nv_bfloat16
//   DEPRUNE_KH, _KW, _SH, _SW, _DH, _DW   window, stride, dilation
//   DEPRUNE_TILE_H, _TILE_W output pixels per CTA (P = TILE_H * TILE_W in {16, 32, 64, 128})
//   DEPRUNE_KC              expanded channels per chunk (a multiple of 16)
//   DEPRUNE_COB             output channels per CTA (a multiple of 8; (P/16) * (COB/8) a multiple of 8)
//   DEPRUNE_FUSED_MMA       1: tensor cores where the target has them (sm_80+, 16-bit storage), 0: CUDA cores
//   DEPRUNE_WALK            output tiles a CTA computes one below the other: the input rows two vertically
//                           adjacent tiles share (the halo) are kept in shared memory for the next tile
//                           (per chunk: a C-sized buffer after the fixed regions, sized by the launcher)
//                           instead of being loaded again
//   DEPRUNE_DW_ROWS         output rows one DW item computes (1 or 2; divides TILE_H): its input rows are read
//                           and converted once for every tap row that uses them, its weights once for both rows
//   DEPRUNE_ACT             the DW activation's code (deprune_common.cuh), or -1: the runtime argument `act`.
//                           A fused pair is specialised per layer anyway, and a constant code folds the
//                           activation switch away (six inlined activations per channel otherwise)
// Runtime: N, C, H, W, OH, OW, CO, PH, PW (top / left padding), act.
// Entry point: deprune_dw_pw_fused; grid (tiles_w * ceil(tiles_h / WALK), ceil(CO / COB), N), block 256;
// dynamic shared memory SMEM_BYTES + (KEEP_HALO ? ceil(C / KC) * HALO_ITEMS * 16 : 0) bytes (the launcher's
// fused_smem_bytes).

#ifndef DEPRUNE_SCALAR
#define DEPRUNE_SCALAR __half
#endif
#include "deprune_window.cuh"
#ifndef DEPRUNE_TILE_H
#define DEPRUNE_TILE_H 8
#endif
#ifndef DEPRUNE_TILE_W
#define DEPRUNE_TILE_W 8
#endif
#ifndef DEPRUNE_KC
#define DEPRUNE_KC 32
#endif
#ifndef DEPRUNE_COB
#define DEPRUNE_COB 32
#endif
#ifndef DEPRUNE_FUSED_MMA
#define DEPRUNE_FUSED_MMA 1
#endif
#ifndef DEPRUNE_WALK
#define DEPRUNE_WALK 1
#endif
#ifndef DEPRUNE_ACT
#define DEPRUNE_ACT -1
#endif
#ifndef DEPRUNE_DW_ROWS
#define DEPRUNE_DW_ROWS 2
#endif

#include "deprune_common.cuh"
#include "deprune_vec16.cuh"

// Tensor cores where the target has mma.sync m16n8k16 (sm_80+) and always in the host emulation.
#if DEPRUNE_FUSED_MMA && (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800)
#define FU_USE_MMA 1
#else
#define FU_USE_MMA 0
#endif

namespace fu {

constexpr int KH = DEPRUNE_KH, KW = DEPRUNE_KW, SH = DEPRUNE_SH, SW = DEPRUNE_SW;
constexpr int DH = DEPRUNE_DH, DW = DEPRUNE_DW;
constexpr int TILE_H = DEPRUNE_TILE_H, TILE_W = DEPRUNE_TILE_W, P = TILE_H * TILE_W;
constexpr int KC = DEPRUNE_KC, COB = DEPRUNE_COB, WALK = DEPRUNE_WALK, ROWS = DEPRUNE_DW_ROWS;
constexpr int WIN = (ROWS - 1) * SH + (KH - 1) * DH + 1;  // input rows one DW item reads per window column
constexpr int THREADS = 256, WARPS = THREADS / 32;
constexpr int KT = KH * KW, MASK_WORDS = (KT + 31) / 32;
constexpr int IN_H = (TILE_H - 1) * SH + (KH - 1) * DH + 1;  // input window of the tile, halo included
constexpr int IN_W = (TILE_W - 1) * SW + (KW - 1) * DW + 1;
constexpr int VEC = 16 / static_cast<int>(sizeof(scalar_t));  // channels per 16-byte vector
constexpr int NVC = KC / VEC;                                  // vectors per chunk and pixel
// Elements per row of s_a and s_b: KC + 16 bytes. KC * sizeof is a multiple of 32 bytes (8 words), so a row is
// 4 words mod 8: 8 consecutive rows start in 8 different 4-bank groups. The MMA fragment loads (8 rows x 4
// words per warp) and the CUDA-core path's 16-byte reads (8 rows per quarter-warp phase) hit 32 different
// banks; rows stay 16-byte aligned for the vector stores. (+8 elements, right for 16-bit types, is +32 bytes
// for fp32: 8 words mod 32, 4 bank groups, 8-way conflicts on the fp32 GEMM's reads.)
constexpr int AS = KC + 16 / static_cast<int>(sizeof(scalar_t));
constexpr int MT = P / 16, NT = COB / 8;  // m16 / n8 tiles of the CTA's output
constexpr int TPW = MT * NT / WARPS;      // n8 tiles per warp (MMA path)
constexpr int ACC = P * COB / THREADS;    // accumulators per thread (CUDA-core path)
constexpr int INFLIGHT = 4;               // global loads a thread issues before its shared-memory stores
// Input rows the next tile of a walk shares with this one (the window moves down TILE_H * SH rows).
constexpr int OVERLAP = IN_H - TILE_H * SH > 0 ? IN_H - TILE_H * SH : 0;
constexpr bool KEEP_HALO = WALK > 1 && OVERLAP > 0;
constexpr int HALO_ITEMS = OVERLAP * IN_W * NVC;  // 16-byte vectors of one chunk's shared rows

static_assert(P == 16 || P == 32 || P == 64 || P == 128, "P = TILE_H * TILE_W must be 16, 32, 64 or 128");
static_assert(KC % 16 == 0 && KC >= 16, "DEPRUNE_KC must be a multiple of 16");
static_assert(ROWS >= 1 && TILE_H % ROWS == 0, "DEPRUNE_DW_ROWS must divide DEPRUNE_TILE_H");
static_assert(COB % 8 == 0 && (MT * NT) % WARPS == 0, "DEPRUNE_COB: whole n8 tiles, the same number per warp");
static_assert(THREADS % P == 0 && COB % (THREADS / P) == 0, "CUDA-core path: whole outputs per thread");
static_assert(TPW <= 10 && ACC <= 40, "at most 40 fp32 accumulators per thread (more spill)");
#if FU_USE_MMA
static_assert(sizeof(scalar_t) == 2, "the tensor-core path takes fp16 or bf16 storage");
#endif

// Shared memory (bytes, each region 16-byte aligned): s_in[IN_H*IN_W][KC] | s_a[P][AS] | s_b[COB][AS] storage,
// s_w[KT][KC] fp32 | s_mask[MASK_WORDS][NVC] u32 (the chunk's vectors' keep bits) | with KEEP_HALO, per chunk
// the OVERLAP rows a walk's next tile reuses (s_halo).
__host__ __device__ constexpr int align16(int b) { return (b + 15) / 16 * 16; }
constexpr int IN_BYTES = align16(IN_H * IN_W * KC * static_cast<int>(sizeof(scalar_t)));
constexpr int A_BYTES = align16(P * AS * static_cast<int>(sizeof(scalar_t)));
constexpr int B_BYTES = align16(COB * AS * static_cast<int>(sizeof(scalar_t)));
constexpr int W_BYTES = KT * KC * 4;
constexpr int SMEM_BYTES = align16(IN_BYTES + A_BYTES + B_BYTES + W_BYTES + MASK_WORDS * NVC * 4);

// Two adjacent 16-bit outputs, moved as one 4-byte word (the MMA epilogue).
struct __align__(4) pair16 {
    scalar_t v[2];
};

__device__ __forceinline__ vec16 zero_vec() { return vec16{0u, 0u, 0u, 0u}; }

// Whether keep bit t is set (t a compile-time constant in the unrolled tap loops).
__device__ __forceinline__ bool kept(const unsigned int* keep, int t) { return (keep[t >> 5] >> (t & 31)) & 1u; }

// ---- tensor-core step -----------------------------------------------------------------------------
// d += A * B for one warp: mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 (fragment layouts:
// cuda_host_emulation.h, warp-level matrix section). The scalar argument only picks the element type.
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define FU_MMA_PTX(type)                                                                                      \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." type "." type                                      \
                 ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"                    \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                              \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
__device__ __forceinline__ void mma(float (&d)[4], const unsigned int (&a)[4], const unsigned int (&b)[2], __half) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    FU_MMA_PTX("f16");
#endif
}
__device__ __forceinline__ void mma(float (&d)[4], const unsigned int (&a)[4], const unsigned int (&b)[2],
                                    __nv_bfloat16) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    FU_MMA_PTX("bf16");
#endif
}
#undef FU_MMA_PTX
#else
inline void mma(float (&d)[4], const unsigned int (&a)[4], const unsigned int (&b)[2], __half) {
    deprune_emu_mma_m16n8k16(deprune_emu::MmaType::f16, d, a, b, d);
}
inline void mma(float (&d)[4], const unsigned int (&a)[4], const unsigned int (&b)[2], __nv_bfloat16) {
    deprune_emu_mma_m16n8k16(deprune_emu::MmaType::bf16, d, a, b, d);
}
#endif
__device__ __forceinline__ void mma(float (&)[4], const unsigned int (&)[4], const unsigned int (&)[2], float) {}

}  // namespace fu

// __launch_bounds__(256, FU_MIN_BLOCKS): the tensor-core path keeps two CTAs per SM (<= 128 registers, the
// <= 40 accumulators included); the CUDA-core path (fp32 storage, pre-sm_80) needs more registers for the same
// accumulators and its fp32 DW vectors, so it asks for one (<= 255 registers) rather than spill.
#if FU_USE_MMA
#define FU_MIN_BLOCKS 2
#else
#define FU_MIN_BLOCKS 1
#endif
extern "C" __global__ void __launch_bounds__(256, FU_MIN_BLOCKS) deprune_dw_pw_fused(
    const scalar_t* __restrict__ x,        // [N, H, W, C]
    scalar_t* __restrict__ y,              // [N, OH, OW, CO]
    const float* __restrict__ tap_w,       // [KT, C]
    const unsigned int* __restrict__ vec_keep,  // [MASK_WORDS, C / VEC]
    const float* __restrict__ dw_bias,     // [C] or nullptr
    const scalar_t* __restrict__ pw_w,     // [CO, C]
    const float* __restrict__ pw_bias,     // [CO] or nullptr
    const scalar_t* __restrict__ res,      // [N, OH, OW, CO] or nullptr
    int N, int C, int H, int W, int OH, int OW, int CO,
    int PH, int PW,                        // top and left padding
    int act) {
    using namespace fu;
    (void)N;
    const int tiles_w = (OW + TILE_W - 1) / TILE_W;
    const int walk = static_cast<int>(blockIdx.x) / tiles_w;  // this CTA's WALK tiles, top to bottom
    const int ox0 = (static_cast<int>(blockIdx.x) - walk * tiles_w) * TILE_W;
    const int co0 = blockIdx.y * COB;
    const int n = blockIdx.z;
    const int ix0 = ox0 * SW - PW;  // origin of the input window; may be negative (zero padding)
    const int tid = threadIdx.x;
    const int warp = tid / 32, lane = tid % 32;

    DEPRUNE_DYNAMIC_SMEM(unsigned char, smem);
    scalar_t* s_in = reinterpret_cast<scalar_t*>(smem);
    scalar_t* s_a = reinterpret_cast<scalar_t*>(smem + IN_BYTES);
    scalar_t* s_b = reinterpret_cast<scalar_t*>(smem + IN_BYTES + A_BYTES);
    float* s_w = reinterpret_cast<float*>(smem + IN_BYTES + A_BYTES + B_BYTES);
    unsigned int* s_mask = reinterpret_cast<unsigned int*>(smem + IN_BYTES + A_BYTES + B_BYTES + W_BYTES);
    vec16* s_halo = reinterpret_cast<vec16*>(smem + SMEM_BYTES);  // [ceil(C / KC)][HALO_ITEMS] when KEEP_HALO

    const scalar_t* xn = x + static_cast<long long>(n) * H * W * C;

#if FU_USE_MMA
    // Warp w owns m16 tile w % MT (constant: MT divides WARPS) and n8 tiles (w + WARPS * j) / MT.
    const int group = lane >> 2, tig = lane & 3;
    const int mrow = (warp % MT) * 16;
#endif
#pragma unroll 1
    for (int step = 0; step < WALK; ++step) {
    const int oy0 = (walk * WALK + step) * TILE_H;
    if (oy0 >= OH) break;  // CTA-uniform: every thread leaves together
    const int iy0 = oy0 * SH - PH;
#if FU_USE_MMA
    float acc[TPW][4];
#pragma unroll
    for (int j = 0; j < TPW; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
#else
    // Thread tid owns pixel tid % P and output channels tid / P + (THREADS / P) * j.
    float acc[ACC];
#pragma unroll
    for (int j = 0; j < ACC; ++j) acc[j] = 0.0f;
#endif

    for (int c0 = 0; c0 < C; c0 += KC) {
        vec16* halo = s_halo + (c0 / KC) * HALO_ITEMS;
        // (1) Stage the chunk's taps (zeros past C), its 1x1 weights and its input tile, all loads independent.
        for (int e = tid; e < KT * KC; e += THREADS) {
            const int t = e / KC, c = c0 + e - t * KC;
            s_w[e] = c < C ? tap_w[static_cast<long long>(t) * C + c] : 0.0f;
        }
        for (int e = tid; e < MASK_WORDS * NVC; e += THREADS) {
            const int w = e / NVC, cv = c0 / VEC + e - w * NVC;
            s_mask[e] = cv < C / VEC ? vec_keep[w * (C / VEC) + cv] : 0u;
        }
        // PW weights of the chunk, [COB][KC] (zeros past CO and C).
        for (int e = tid; e < COB * NVC; e += THREADS) {
            const int o = e / NVC, v = e - o * NVC;
            const int c = c0 + v * VEC;
            vec16 val = zero_vec();
            if (co0 + o < CO && c < C)
                val = *reinterpret_cast<const vec16*>(pw_w + static_cast<long long>(co0 + o) * C + c);
            *reinterpret_cast<vec16*>(s_b + o * AS + v * VEC) = val;
        }
        // Input tile with halo, INFLIGHT 16-byte loads per thread in flight before their stores.
        {
            constexpr int ITEMS = IN_H * IN_W * NVC;
#pragma unroll 1
            for (int e0 = 0; e0 < ITEMS; e0 += THREADS * INFLIGHT) {
                vec16 v[INFLIGHT];
#pragma unroll
                for (int b = 0; b < INFLIGHT; ++b) {
                    const int e = e0 + b * THREADS + tid;
                    const int pix = e / NVC;  // constant divisors
                    const int ly = pix / IN_W;
                    const int iy = iy0 + ly, ix = ix0 + pix - ly * IN_W;
                    const int c = c0 + (e - pix * NVC) * VEC;
                    v[b] = zero_vec();
                    if (KEEP_HALO && step > 0 && e < HALO_ITEMS)
                        v[b] = halo[e];  // rows the previous tile of the walk staged last
                    else if (e < ITEMS && c < C && iy >= 0 && iy < H && ix >= 0 && ix < W)
                        v[b] = *reinterpret_cast<const vec16*>(xn + (static_cast<long long>(iy) * W + ix) * C + c);
                }
#pragma unroll
                for (int b = 0; b < INFLIGHT; ++b) {
                    const int e = e0 + b * THREADS + tid;
                    if (e < ITEMS) *reinterpret_cast<vec16*>(s_in + e * VEC) = v[b];
                }
            }
        }
        __syncthreads();
        // The bottom OVERLAP rows are the next tile's top rows: kept for it (every read of this chunk's halo
        // buffer happened before the barrier above; the next read is the next tile's staging).
        if (KEEP_HALO && step + 1 < WALK) {
            const vec16* tail = reinterpret_cast<const vec16*>(s_in) + (IN_H - OVERLAP) * IN_W * NVC;
            for (int e = tid; e < HALO_ITEMS; e += THREADS) halo[e] = tail[e];
        }

        // (2) DW: item = (ROWS vertically adjacent pixels, vector v), the vector's kept taps only. Per window
        // column j the input rows the item's ROWS outputs read are loaded (and converted) once each and feed
        // every (output row r, tap row i) with r * SH + i * DH == ir; a row no kept tap reads is skipped.
        // Not unrolled: the trip count is a constant, and unrolled items keep several vectors' taps in flight
        // (register spills).
#pragma unroll 1
        for (int it = tid; it < (P / ROWS) * NVC; it += THREADS) {
            const int q = it / NVC, v = it - q * NVC;
            const int py0 = q / TILE_W * ROWS, px = q - q / TILE_W * TILE_W;
            unsigned int keep[MASK_WORDS];
#pragma unroll
            for (int w = 0; w < MASK_WORDS; ++w) keep[w] = s_mask[w * NVC + v];
            float a[ROWS][VEC];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
#pragma unroll
                for (int e = 0; e < VEC; ++e) a[r][e] = 0.0f;
            }
            const scalar_t* base = s_in + ((py0 * SH) * IN_W + px * SW) * KC + v * VEC;
#pragma unroll
            for (int j = 0; j < KW; ++j) {
#pragma unroll
                for (int ir = 0; ir < WIN; ++ir) {
                    bool needed = false;
#pragma unroll
                    for (int i = 0; i < KH; ++i) {
                        const int r = ir - i * DH;  // output row this (input row, tap row) feeds, if any
                        if (r >= 0 && r % SH == 0 && r / SH < ROWS) needed |= kept(keep, i * KW + j);
                    }
                    if (!needed) continue;
                    float xv[VEC];
                    unpack<scalar_t>(*reinterpret_cast<const vec16*>(base + (ir * IN_W + j * DW) * KC), xv);
#pragma unroll
                    for (int i = 0; i < KH; ++i) {
                        const int r = ir - i * DH;
                        if (r < 0 || r % SH != 0 || r / SH >= ROWS || !kept(keep, i * KW + j)) continue;
                        const float* wt = s_w + (i * KW + j) * KC + v * VEC;
#pragma unroll
                        for (int e = 0; e < VEC; ++e) a[r / SH][e] += wt[e] * xv[e];
                    }
                }
            }
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                    const int c = c0 + v * VEC + e;
                    a[r][e] = deprune_activate(a[r][e] + (dw_bias != nullptr && c < C ? dw_bias[c] : 0.0f),
                                               DEPRUNE_ACT >= 0 ? DEPRUNE_ACT : act);
                }
                *reinterpret_cast<vec16*>(s_a + ((py0 + r) * TILE_W + px) * AS + v * VEC) = pack<scalar_t>(a[r]);
            }
        }
        __syncthreads();

        // (3) PW GEMM over the chunk.
#if FU_USE_MMA
        {
            const unsigned int* a32 = reinterpret_cast<const unsigned int*>(s_a);
            const unsigned int* b32 = reinterpret_cast<const unsigned int*>(s_b);
            constexpr int AW = AS / 2;  // 32-bit words per row
            // Not unrolled: an unrolled K loop hoists every step's B fragments (2 * TPW registers each) next to
            // the TPW * 4 accumulators and spills.
#pragma unroll 1
            for (int ks = 0; ks < KC / 16; ++ks) {
                const int kw = ks * 8 + tig;  // word of columns ks*16 + tig*2 + {0, 1}
                unsigned int af[4];
                af[0] = a32[(mrow + group) * AW + kw];
                af[1] = a32[(mrow + group + 8) * AW + kw];
                af[2] = a32[(mrow + group) * AW + kw + 4];
                af[3] = a32[(mrow + group + 8) * AW + kw + 4];
#pragma unroll
                for (int j = 0; j < TPW; ++j) {
                    const int ncol = ((warp + WARPS * j) / MT) * 8 + group;
                    unsigned int bf[2];
                    bf[0] = b32[ncol * AW + kw];
                    bf[1] = b32[ncol * AW + kw + 4];
                    mma(acc[j], af, bf, scalar_t());
                }
            }
        }
#else
        {
            const int p = tid % P;
            const int o0 = tid / P;
            // s_a in 16-byte reads (VEC channels): a quarter-warp reads 8 consecutive rows (no bank conflict, see
            // AS). s_b element reads: one row per warp (a broadcast), two rows AS words apart when P == 16.
#pragma unroll 1
            for (int k0 = 0; k0 < KC; k0 += VEC) {
                float av[VEC];
                unpack<scalar_t>(*reinterpret_cast<const vec16*>(s_a + p * AS + k0), av);
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
#pragma unroll
                    for (int j = 0; j < ACC; ++j)
                        acc[j] += av[e] * deprune_to_float(s_b[(o0 + (THREADS / P) * j) * AS + k0 + e]);
                }
            }
        }
#endif
        __syncthreads();  // the next chunk overwrites s_in, s_a, s_b
    }

    // Epilogue: + pw_bias (+ res), rounded once, NHWC stores.
    scalar_t* yn = y + static_cast<long long>(n) * OH * OW * CO;
    const scalar_t* rn = res != nullptr ? res + static_cast<long long>(n) * OH * OW * CO : nullptr;
#if FU_USE_MMA
    // Fully unrolled: acc may only be indexed by compile-time constants. A rolled loop indexes acc[j] at run
    // time, which puts the whole array in local memory (a stack frame, STL/LDL every chunk) while ptxas still
    // reports 0 spill bytes (tests/test_dw_pw_fused_sass.py checks the stack frame and LDL/STL too).
    // A thread's two outputs of a row are adjacent channels (o even): one 4-byte load of the residual and one
    // 4-byte store when CO is even and y / res are 4-byte aligned (then pix * CO + o is even too), else per
    // element.
    const bool pairs = CO % 2 == 0 &&
                       ((reinterpret_cast<unsigned long long>(y) | reinterpret_cast<unsigned long long>(res)) & 3) == 0;
#pragma unroll
    for (int j = 0; j < TPW; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // rows group and group + 8
            const int p = mrow + group + 8 * h;
            const int oy = oy0 + p / TILE_W, ox = ox0 + p % TILE_W;
            if (oy >= OH || ox >= OW) continue;
            const long long pix = static_cast<long long>(oy) * OW + ox;
            const int o0 = co0 + ((warp + WARPS * j) / MT) * 8 + tig * 2;
            if (o0 >= CO) continue;
            float v[2];
#pragma unroll
            for (int q = 0; q < 2; ++q)
                v[q] = acc[j][2 * h + q] + (pw_bias != nullptr && o0 + q < CO ? pw_bias[o0 + q] : 0.0f);
            if (pairs) {  // CO even and o0 < CO: o0 + 1 < CO
                if (rn != nullptr) {
                    const pair16 r = *reinterpret_cast<const pair16*>(rn + pix * CO + o0);
                    v[0] += deprune_to_float(r.v[0]);
                    v[1] += deprune_to_float(r.v[1]);
                }
                pair16 out;
                deprune_store(&out.v[0], v[0]);
                deprune_store(&out.v[1], v[1]);
                *reinterpret_cast<pair16*>(yn + pix * CO + o0) = out;
                continue;
            }
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                const int o = o0 + q;
                if (o >= CO) continue;
                float w = v[q];
                if (rn != nullptr) w += deprune_to_float(rn[pix * CO + o]);
                deprune_store(yn + pix * CO + o, w);
            }
        }
    }
#else
    {
        const int p = tid % P;
        const int oy = oy0 + p / TILE_W, ox = ox0 + p % TILE_W;
        if (oy < OH && ox < OW) {
            const long long pix = static_cast<long long>(oy) * OW + ox;
#pragma unroll
            for (int j = 0; j < ACC; ++j) {
                const int o = co0 + tid / P + (THREADS / P) * j;
                if (o >= CO) continue;
                float v = acc[j] + (pw_bias != nullptr ? pw_bias[o] : 0.0f);
                if (rn != nullptr) v += deprune_to_float(rn[pix * CO + o]);
                deprune_store(yn + pix * CO + o, v);
            }
        }
    }
#endif
    }  // the walk
}
