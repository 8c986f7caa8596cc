// deprune_common.cuh: what every kernel in cuda/ shares: the GPU / host-emulation switch, dynamic shared
// memory, storage <-> fp32 conversion and the epilogue activation.
//
// Included by each .cu file *after* its DEPRUNE_SCALAR default. deprune_plugin/kernels/sources.py inlines it
// into the specialised source, so NVRTC, nvcc and the host emulation build all see one self-contained text.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
// One raw byte array per kernel, carved by hand: the same name with different element types would
// clash between kernels of one translation unit.
#define DEPRUNE_DYNAMIC_SMEM(type, name)                                  \
    extern __shared__ __align__(16) unsigned char deprune_dynamic_smem_[]; \
    type* name = reinterpret_cast<type*>(deprune_dynamic_smem_)
#else
#include "cuda_host_emulation.h"
#endif

typedef DEPRUNE_SCALAR scalar_t;

// ---- storage <-> fp32 (round-to-nearest-even on the way back) ------------------------------------
__device__ __forceinline__ float deprune_to_float(float v) { return v; }
__device__ __forceinline__ float deprune_to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float deprune_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void deprune_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void deprune_store(__half* p, float v) { *p = __float2half(v); }
__device__ __forceinline__ void deprune_store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

// ---- epilogue activation; codes match deprune_plugin/kernels/activations.py (a test checks) -----
// A runtime code (warp-uniform branch, once per output) instead of a define: six times fewer variants
// to compile for a negligible cost in a memory-bound kernel.
__device__ __forceinline__ float deprune_activate(float v, int act) {
    switch (act) {
        case 1: return fmaxf(v, 0.0f);                                            // relu
        case 2: return fminf(fmaxf(v, 0.0f), 6.0f);                               // relu6
        case 3: return v / (1.0f + expf(-v));                                     // silu
        case 4: return v * fminf(fmaxf(v + 3.0f, 0.0f), 6.0f) / 6.0f;             // hardswish
        case 5: return 0.5f * v * (1.0f + erff(v * 0.7071067811865475f));         // exact (erf) gelu
        default: return v;                                                        // identity
    }
}
