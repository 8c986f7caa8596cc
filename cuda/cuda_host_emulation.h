// Host emulation of the small CUDA subset used by cuda/*.cu, so that the very same kernel sources
// compile with g++ (-std=c++20 -pthread) and can be tested on machines without a GPU.
//
// Model: a launch runs the grid's blocks ONE AT A TIME on blockDim.x*y*z OS threads created once per
// launch. Every thread loops over all blocks; a barrier separates consecutive blocks, so `__shared__`
// variables (mapped to function-local statics, shared by all threads) are reused safely. __syncthreads()
// is a std::barrier over the block's threads (the same one as the block boundary). A kernel in which some
// threads skip a __syncthreads (e.g. an early return) is invalid CUDA; here it desynchronises the barrier
// phases and the launch hangs at its last barrier instead of silently passing.
//
// Never included by nvcc/NVRTC builds: the .cu files include it only when __CUDACC__ is undefined.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#error "cuda_host_emulation.h is for host (g++) builds only"
#endif

#include <math.h>  // expf, erff, fminf, fmaxf in the global namespace, as device code sees them

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

// ---- qualifiers -------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#ifndef __restrict__
#define __restrict__ __restrict
#endif
// Function-local statics are shared by all threads of the launch; blocks run one at a time.
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

// ---- math: expf/erff/fminf/fmaxf come from <math.h>; CUDA's integer min/max overloads: -----------
using std::max;
using std::min;

// ---- launch geometry --------------------------------------------------------------------------
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
    unsigned int x, y, z;
};

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
// Written only by emu_launch before the worker threads start; read-only while they run.
inline dim3 blockDim;
inline dim3 gridDim;

namespace deprune_emu {
inline std::barrier<>* g_block_barrier = nullptr;
inline unsigned char* g_dynamic_smem = nullptr;
// Launches share the globals above, so they are serialised (ctypes callers may be concurrent).
inline std::mutex g_launch_mutex;
}  // namespace deprune_emu

inline void __syncthreads() { deprune_emu::g_block_barrier->arrive_and_wait(); }

// Dynamic shared memory: under nvcc the .cu defines this macro as an `extern __shared__` array.
#define DEPRUNE_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(deprune_emu::g_dynamic_smem)

// ---- half / bfloat16 (storage types; the kernels do all arithmetic in fp32) ---------------------
struct __half {
    std::uint16_t x;
};
struct __nv_bfloat16 {
    std::uint16_t x;
};

inline float deprune_emu_bits_to_float(std::uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
inline std::uint32_t deprune_emu_float_to_bits(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

inline float __half2float(__half h) {
    const std::uint32_t sign = static_cast<std::uint32_t>(h.x & 0x8000u) << 16;
    const std::uint32_t exp = (h.x >> 10) & 0x1fu;
    std::uint32_t mant = h.x & 0x3ffu;
    if (exp == 0x1f) return deprune_emu_bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
    if (exp != 0) return deprune_emu_bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
    if (mant == 0) return deprune_emu_bits_to_float(sign);  // +-0
    // subnormal half: value = mant * 2^-24, exact in fp32
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
}

// Round-to-nearest-even, like CUDA's __float2half / __float2half_rn.
inline __half __float2half(float f) {
    const std::uint32_t u = deprune_emu_float_to_bits(f);
    const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
    const std::uint32_t abs = u & 0x7fffffffu;
    __half h;
    if (abs >= 0x7f800000u) {  // inf or nan (keep a quiet nan)
        h.x = sign | (abs > 0x7f800000u ? 0x7e00u : 0x7c00u);
        return h;
    }
    if (abs >= 0x477ff000u) {  // >= 65520 rounds to inf
        h.x = sign | 0x7c00u;
        return h;
    }
    if (abs < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
        // value / 2^-24 rounded to nearest even integer gives the subnormal mantissa (0..1024).
        const float scaled = deprune_emu_bits_to_float(abs) * 16777216.0f;  // exact scaling by 2^24
        h.x = sign | static_cast<std::uint16_t>(std::nearbyint(scaled));   // default mode is RNE
        return h;
    }
    const std::uint32_t exp = (abs >> 23) - 112u;  // rebias 127 -> 15
    const std::uint32_t mant = abs & 0x7fffffu;
    std::uint32_t r = (exp << 10) | (mant >> 13);
    const std::uint32_t rest = mant & 0x1fffu;  // 13 dropped bits
    if (rest > 0x1000u || (rest == 0x1000u && (r & 1u))) ++r;  // carries into the exponent correctly
    h.x = sign | static_cast<std::uint16_t>(r);
    return h;
}
inline __half __float2half_rn(float f) { return __float2half(f); }

inline float __bfloat162float(__nv_bfloat16 b) {
    return deprune_emu_bits_to_float(static_cast<std::uint32_t>(b.x) << 16);
}

// Round-to-nearest-even, like CUDA's __float2bfloat16 / __float2bfloat16_rn.
inline __nv_bfloat16 __float2bfloat16(float f) {
    const std::uint32_t u = deprune_emu_float_to_bits(f);
    __nv_bfloat16 b;
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // nan: keep sign, force quiet
        b.x = static_cast<std::uint16_t>((u >> 16) | 0x0040u);
        return b;
    }
    const std::uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
    b.x = static_cast<std::uint16_t>((u + rounding) >> 16);
    return b;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }

// ---- launcher ---------------------------------------------------------------------------------
// Runs kernel<<<grid, block, smem_bytes>>>(args...) synchronously. Arguments are converted to the
// kernel's parameter types (e.g. void* -> const float*), which lets generated wrappers pass untyped
// pointers. Throws std::runtime_error on invalid geometry. The kernels never throw (an exception
// escaping a worker thread terminates the process, as a device trap would abort the context).
template <class... Params, class... Args>
void emu_launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem_bytes, Args... args) {
    static_assert(sizeof...(Params) == sizeof...(Args), "emu_launch: argument count mismatch");
    const unsigned long long nthreads = 1ull * block.x * block.y * block.z;
    const unsigned long long nblocks = 1ull * grid.x * grid.y * grid.z;
    if (nthreads == 0 || nthreads > 1024) throw std::runtime_error("emu_launch: block must have 1..1024 threads");
    if (nblocks == 0) return;

    std::lock_guard<std::mutex> lock(deprune_emu::g_launch_mutex);
    std::vector<unsigned char> smem(smem_bytes + 16, 0);
    std::barrier<> barrier(static_cast<std::ptrdiff_t>(nthreads));
    deprune_emu::g_block_barrier = &barrier;
    deprune_emu::g_dynamic_smem = smem.data();
    blockDim = block;
    gridDim = grid;

    auto worker = [&](unsigned int tx, unsigned int ty, unsigned int tz) {
        threadIdx = uint3{tx, ty, tz};
        for (unsigned int bz = 0; bz < grid.z; ++bz)
            for (unsigned int by = 0; by < grid.y; ++by)
                for (unsigned int bx = 0; bx < grid.x; ++bx) {
                    blockIdx = uint3{bx, by, bz};
                    kernel(static_cast<Params>(args)...);
                    // Block boundary: nobody starts the next block (and rewrites shared memory)
                    // before every thread has finished this one.
                    barrier.arrive_and_wait();
                }
    };

    std::vector<std::thread> threads;
    threads.reserve(static_cast<std::size_t>(nthreads));
    for (unsigned int tz = 0; tz < block.z; ++tz)
        for (unsigned int ty = 0; ty < block.y; ++ty)
            for (unsigned int tx = 0; tx < block.x; ++tx) threads.emplace_back(worker, tx, ty, tz);
    for (auto& t : threads) t.join();

    deprune_emu::g_block_barrier = nullptr;
    deprune_emu::g_dynamic_smem = nullptr;
}
