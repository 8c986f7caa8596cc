// Host emulation of the small CUDA subset used by cuda/*.cu, so that the very same kernel sources
// compile with g++ (-std=c++20 -pthread) and can be tested on machines without a GPU.
//
// Model: a launch runs the grid's blocks ONE AT A TIME on blockDim.x*y*z OS threads created once per
// launch. Every thread loops over all blocks; a barrier separates consecutive blocks, so `__shared__`
// variables (function-local statics, shared by all threads) are reused safely. __syncthreads() is a
// std::barrier over the block's threads. A kernel in which some threads skip a __syncthreads (e.g. an early
// return) is invalid CUDA; here the launch hangs at a barrier instead of silently passing.
//
// What a GPU would catch or leave undefined, the emulation makes visible:
// - Shared memory is POISONED before every block: every byte of the static `__shared__` arrays and of the
//   dynamic buffer is 0xFF (a float NaN, an int -1), so reading shared memory no thread of the block wrote
//   gives NaN in the output instead of the zeros or stale values a GPU may happen to leave there.
// - Static `__shared__` arrays live in the linker section "deprune_shared" (that is how they are found and
//   poisoned); deprune_plugin/kernels/emulation.py reads their sizes from the built library's symbol table.
// - A launch is refused (std::runtime_error, nothing runs) where CUDA refuses it: a block dimension or the
//   grid beyond the CUDA limits (block x, y <= 1024, z <= 64, threads <= 1024; grid x < 2^31, y, z <= 65535,
//   no dimension 0), more threads than the kernel's __launch_bounds__ (the macro records the bound for the
//   kernel it annotates), or more static + dynamic shared memory than the target allows (LaunchLimits).
// - The dynamic shared memory buffer is a heap block of exactly the requested size, so an AddressSanitizer
//   build (emulation.py, sanitize=True) reports reads or writes past it, as it does for global memory.
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
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
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
// Static shared arrays: function-local statics (shared by all threads of the launch; blocks run one at a
// time), kept ("used": the byte count is what the kernel declares, even if the optimiser drops an unread
// array) in one named section, whose bounds the linker provides as __start_/__stop_deprune_shared.
// Dynamic shared memory goes through DEPRUNE_DYNAMIC_SMEM below, never `extern __shared__`.
#define __shared__ static __attribute__((used, section("deprune_shared")))
#define __align__(n) __attribute__((aligned(n)))

// __launch_bounds__(max_threads[, min_blocks[, max_cluster]]) sits between `extern "C" __global__ void` and
// the kernel's name. It ends that declaration (as a dummy function), records max_threads together with the
// bounds of a linker section of its own (deprune_lb_<n>), and reopens the declaration with the kernel placed
// in that section: emu_launch finds the kernel's bound by its address. The kernel gets C linkage (every
// kernel of cuda/ is `extern "C"`); a template kernel cannot carry __launch_bounds__ here.
#define DEPRUNE_EMU_CAT_(a, b) a##b
#define DEPRUNE_EMU_CAT(a, b) DEPRUNE_EMU_CAT_(a, b)
#define DEPRUNE_EMU_STR_(a) #a
#define DEPRUNE_EMU_STR(a) DEPRUNE_EMU_STR_(a)
#define __launch_bounds__(...) DEPRUNE_EMU_LAUNCH_BOUNDS_(__COUNTER__, __VA_ARGS__)
#define DEPRUNE_EMU_LAUNCH_BOUNDS_(id, max_threads, ...)                                                      \
    DEPRUNE_EMU_CAT(deprune_emu_bounds_decl_, id)();                                                           \
    extern "C" const unsigned char DEPRUNE_EMU_CAT(__start_deprune_lb_, id)[]                                  \
        __attribute__((weak, visibility("hidden")));                                                           \
    extern "C" const unsigned char DEPRUNE_EMU_CAT(__stop_deprune_lb_, id)[]                                   \
        __attribute__((weak, visibility("hidden")));                                                           \
    [[maybe_unused]] static const bool DEPRUNE_EMU_CAT(deprune_emu_bounds_recorded_, id) =                    \
        deprune_emu::record_launch_bounds(DEPRUNE_EMU_CAT(__start_deprune_lb_, id),                            \
                                          DEPRUNE_EMU_CAT(__stop_deprune_lb_, id), (max_threads));             \
    extern "C" void __attribute__((section("deprune_lb_" DEPRUNE_EMU_STR(id))))

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

// Bounds of the static shared arrays' section (null when the translation unit declares none).
extern "C" unsigned char __start_deprune_shared[] __attribute__((weak, visibility("hidden")));
extern "C" unsigned char __stop_deprune_shared[] __attribute__((weak, visibility("hidden")));

namespace deprune_emu {
inline std::barrier<>* g_sync_barrier = nullptr;
inline unsigned char* g_dynamic_smem = nullptr;
// Launches share the globals above, so they are serialised (ctypes callers may be concurrent).
inline std::mutex g_launch_mutex;

// CUDA's launch limits (the same on every architecture since sm_30).
constexpr unsigned long long kMaxThreadsPerBlock = 1024;
constexpr unsigned long long kMaxBlockDim[3] = {1024, 1024, 64};
constexpr unsigned long long kMaxGridDim[3] = {2147483647ull, 65535, 65535};

// Shared memory a launch may use. A kernel gets `smem_per_block` (48 KB) unless it opts in; like
// deprune_plugin/kernels/cupy_launch.py, a launch asking for more dynamic shared memory than that counts as
// opted in, and may then use up to `smem_per_block_optin` (the device's maximum; equal to smem_per_block
// means "no opt-in", the default of the emulation). `static_smem` is the kernel's static __shared__ bytes.
struct LaunchLimits {
    unsigned long long smem_per_block = 48 * 1024;
    unsigned long long smem_per_block_optin = 48 * 1024;
    unsigned long long static_smem = 0;
};

// Bytes spanned by the static __shared__ arrays of this translation unit, alignment padding included.
inline unsigned long long static_smem_span() {
    return __start_deprune_shared == nullptr ? 0ull
                                             : static_cast<unsigned long long>(__stop_deprune_shared -
                                                                               __start_deprune_shared);
}

inline void poison_shared(unsigned char* dynamic, std::size_t dynamic_bytes) {
    if (__start_deprune_shared != nullptr)
        std::memset(__start_deprune_shared, 0xFF, static_cast<std::size_t>(static_smem_span()));
    if (dynamic_bytes != 0) std::memset(dynamic, 0xFF, dynamic_bytes);
}

// Runs between blocks (std::barrier completion: after every thread finished block b, before any starts
// block b + 1).
struct PoisonShared {
    unsigned char* dynamic;
    std::size_t dynamic_bytes;
    void operator()() noexcept { poison_shared(dynamic, dynamic_bytes); }
};

// ---- __launch_bounds__ registry (one per translation unit, filled while the library loads) ----------
struct LaunchBound {
    std::uintptr_t begin, end;  // code range of the kernel's section
    unsigned long long max_threads;
};
inline std::vector<LaunchBound>& launch_bounds() {
    static std::vector<LaunchBound> bounds;
    return bounds;
}
inline bool record_launch_bounds(const unsigned char* begin, const unsigned char* end, long long max_threads) {
    launch_bounds().push_back({reinterpret_cast<std::uintptr_t>(begin), reinterpret_cast<std::uintptr_t>(end),
                               static_cast<unsigned long long>(max_threads < 0 ? 0 : max_threads)});
    return true;
}
// The __launch_bounds__ max_threads of the kernel at `fn`, or 0 when it declares none.
inline unsigned long long launch_bound_of(const void* fn) {
    const auto addr = reinterpret_cast<std::uintptr_t>(fn);
    for (const LaunchBound& b : launch_bounds())
        if (b.begin != 0 && addr >= b.begin && addr < b.end) return b.max_threads;
    return 0;
}

inline std::string dims_str(dim3 d) {
    return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

// Throws std::runtime_error naming the limit when CUDA would refuse this launch.
inline void check_launch(const void* kernel, dim3 grid, dim3 block, std::size_t smem_bytes,
                         const LaunchLimits& limits) {
    const unsigned long long b[3] = {block.x, block.y, block.z};
    const unsigned long long g[3] = {grid.x, grid.y, grid.z};
    const char* axis[3] = {"x", "y", "z"};
    for (int i = 0; i < 3; ++i) {
        if (b[i] == 0 || g[i] == 0)
            throw std::runtime_error("invalid configuration: grid " + dims_str(grid) + " and block " +
                                     dims_str(block) + " must have every dimension >= 1");
        if (b[i] > kMaxBlockDim[i])
            throw std::runtime_error(std::string("block.") + axis[i] + " = " + std::to_string(b[i]) +
                                     " exceeds the CUDA limit of " + std::to_string(kMaxBlockDim[i]));
        if (g[i] > kMaxGridDim[i])
            throw std::runtime_error(std::string("grid.") + axis[i] + " = " + std::to_string(g[i]) +
                                     " exceeds the CUDA limit of " + std::to_string(kMaxGridDim[i]));
    }
    const unsigned long long nthreads = b[0] * b[1] * b[2];
    if (nthreads > kMaxThreadsPerBlock)
        throw std::runtime_error("block " + dims_str(block) + " has " + std::to_string(nthreads) +
                                 " threads; CUDA allows at most " + std::to_string(kMaxThreadsPerBlock) +
                                 " threads per block");
    const unsigned long long bound = launch_bound_of(kernel);
    if (bound != 0 && nthreads > bound)
        throw std::runtime_error("block " + dims_str(block) + " has " + std::to_string(nthreads) +
                                 " threads, more than the kernel's __launch_bounds__(" + std::to_string(bound) +
                                 ") (too many resources requested for launch)");
    const unsigned long long stat = limits.static_smem;
    const unsigned long long dyn = smem_bytes;
    if (stat > limits.smem_per_block)
        throw std::runtime_error("static shared memory of " + std::to_string(stat) + " bytes exceeds the " +
                                 std::to_string(limits.smem_per_block) + " bytes a kernel may declare statically");
    const bool opted_in = dyn > limits.smem_per_block && limits.smem_per_block_optin > limits.smem_per_block;
    const unsigned long long limit = opted_in ? limits.smem_per_block_optin : limits.smem_per_block;
    if (stat + dyn > limit) {
        std::string what = "shared memory per block: static " + std::to_string(stat) + " + dynamic " +
                           std::to_string(dyn) + " = " + std::to_string(stat + dyn) + " bytes exceeds ";
        if (opted_in)
            what += "the opt-in maximum of " + std::to_string(limit) + " bytes of the emulated target";
        else
            what += "the " + std::to_string(limit) + " bytes a kernel gets without opt-in" +
                    (dyn > limits.smem_per_block ? " (the emulated target allows no opt-in)" : "");
        throw std::runtime_error(what);
    }
}
}  // namespace deprune_emu

inline void __syncthreads() { deprune_emu::g_sync_barrier->arrive_and_wait(); }

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

// ==== warp-level matrix operations (mma.sync) ====================================================
// Emulates the warp-wide tensor-core instruction the kernels issue as inline PTX on the GPU:
//
//   mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32  d, a, b, c     (D = A * B + C)
//
// A kernel reaches it through a small device function of its own that is inline PTX under nvcc/NVRTC and
// calls deprune_emu_mma_m16n8k16() here otherwise (DEPRUNE_EMU_WARP_MATRIX is defined for that #if).
//
// Faithfulness: every lane hands in exactly the registers the PTX ISA ("Matrix Fragments for
// mma.m16n8k16 with floating point type") gives it, with groupID = lane >> 2, tig = lane % 4:
//   A (16 x 16, row-major), four .b32 registers of two 16-bit elements each (low half = lower column):
//     a[0]: row groupID,     cols tig*2 + {0,1}        a[1]: row groupID + 8, cols tig*2 + {0,1}
//     a[2]: row groupID,     cols tig*2 + 8 + {0,1}    a[3]: row groupID + 8, cols tig*2 + 8 + {0,1}
//   B (16 x 8, "col"), two .b32 registers:  b[0]: rows tig*2 + {0,1}, col groupID
//                                           b[1]: rows tig*2 + 8 + {0,1}, col groupID
//   C, D (16 x 8 fp32): c[0], c[1]: row groupID, cols tig*2 + {0,1};  c[2], c[3]: row groupID + 8, same cols.
// The 32 lanes of a warp (consecutive linear thread ids, as on the GPU) deposit their fragments in a
// per-warp exchange and meet at a per-warp std::barrier; each lane then rebuilds A, B and C from all 32
// deposits and computes its own four D elements (fp32 products of the 16-bit inputs, exact, summed in k
// order in fp32), and a second barrier keeps the exchange alive until every lane has read it. So a
// kernel that puts an element in the wrong register, or a lane that does not take part, gives wrong
// numbers or a hang (like a missing __syncthreads), never the right answer by accident. A warp with
// fewer than 32 threads, or lanes disagreeing on the element type, aborts the process (a GPU would
// leave the result undefined).
#define DEPRUNE_EMU_WARP_MATRIX 1

#include <cstdio>   // fprintf (warp_abort)
#include <cstdlib>  // abort

namespace deprune_emu {
enum class MmaType : int { f16 = 1, bf16 = 2 };

struct WarpExchange {
    std::uint32_t a[32][4];
    std::uint32_t b[32][2];
    float c[32][4];
    int type[32];
};

struct Warp {
    unsigned int size;       // threads of the launch in this warp (32 except a partial last warp)
    std::barrier<> barrier;  // the lanes of this warp only
    WarpExchange exchange;
    explicit Warp(unsigned int n) : size(n), barrier(static_cast<std::ptrdiff_t>(n)) {}
};

// The warps of the running launch (blocks run one at a time, so one set serves every block).
inline std::vector<std::unique_ptr<Warp>>* g_warps = nullptr;

// Creates the launch's warps for emu_launch and removes them when the launch ends.
struct WarpScope {
    std::vector<std::unique_ptr<Warp>> warps;
    explicit WarpScope(unsigned long long nthreads) {
        for (unsigned long long first = 0; first < nthreads; first += 32)
            warps.push_back(std::make_unique<Warp>(static_cast<unsigned int>(std::min(32ull, nthreads - first))));
        g_warps = &warps;
    }
    ~WarpScope() { g_warps = nullptr; }
    WarpScope(const WarpScope&) = delete;
    WarpScope& operator=(const WarpScope&) = delete;
};

// Linear thread id inside the block, x fastest (CUDA's rule for how threads form warps).
inline unsigned int linear_thread_id() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

[[noreturn]] inline void warp_abort(const char* what) {
    std::fprintf(stderr, "deprune host emulation: %s\n", what);
    std::abort();
}

inline float mma_element(std::uint16_t bits, MmaType type) {
    if (type == MmaType::bf16) return deprune_emu_bits_to_float(static_cast<std::uint32_t>(bits) << 16);
    __half h;
    h.x = bits;
    return __half2float(h);
}
}  // namespace deprune_emu

// One mma.sync.aligned.m16n8k16.row.col.f32.<type>.<type>.f32 for the calling lane: d = A * B + c, with A, B
// and C assembled from the fragments of all 32 lanes of the caller's warp (layout above). d may alias c.
inline void deprune_emu_mma_m16n8k16(deprune_emu::MmaType type, float* d, const std::uint32_t* a,
                                     const std::uint32_t* b, const float* c) {
    using namespace deprune_emu;
    if (g_warps == nullptr) warp_abort("mma.sync called outside an emulated launch");
    const unsigned int tid = linear_thread_id();
    Warp& warp = *(*g_warps)[tid / 32];
    const unsigned int lane = tid % 32;
    if (warp.size != 32) warp_abort("mma.sync needs all 32 lanes of a warp (the block has a partial warp)");
    WarpExchange& ex = warp.exchange;
    for (int i = 0; i < 4; ++i) ex.a[lane][i] = a[i];
    for (int i = 0; i < 2; ++i) ex.b[lane][i] = b[i];
    for (int i = 0; i < 4; ++i) ex.c[lane][i] = c[i];
    ex.type[lane] = static_cast<int>(type);
    warp.barrier.arrive_and_wait();  // every lane has deposited its fragments

    for (unsigned int l = 0; l < 32; ++l)
        if (ex.type[l] != static_cast<int>(type)) warp_abort("mma.sync lanes disagree on the element type");
    // Rebuild the operands from the documented fragment layout.
    float A[16][16], B[16][8], Cm[16][8];
    for (unsigned int l = 0; l < 32; ++l) {
        const unsigned int group = l >> 2, tig = l % 4;
        for (int r = 0; r < 4; ++r) {
            const unsigned int row = group + ((r & 1) ? 8 : 0);
            const unsigned int col = tig * 2 + ((r & 2) ? 8 : 0);
            A[row][col] = mma_element(static_cast<std::uint16_t>(ex.a[l][r] & 0xffffu), type);
            A[row][col + 1] = mma_element(static_cast<std::uint16_t>(ex.a[l][r] >> 16), type);
        }
        for (int r = 0; r < 2; ++r) {
            const unsigned int row = tig * 2 + (r ? 8 : 0);
            B[row][group] = mma_element(static_cast<std::uint16_t>(ex.b[l][r] & 0xffffu), type);
            B[row + 1][group] = mma_element(static_cast<std::uint16_t>(ex.b[l][r] >> 16), type);
        }
        for (int r = 0; r < 4; ++r) Cm[group + ((r & 2) ? 8 : 0)][tig * 2 + (r & 1)] = ex.c[l][r];
    }
    float out[4];
    const unsigned int group = lane >> 2, tig = lane % 4;
    for (int r = 0; r < 4; ++r) {
        const unsigned int row = group + ((r & 2) ? 8 : 0), col = tig * 2 + (r & 1);
        float acc = Cm[row][col];
        for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
        out[r] = acc;
    }
    warp.barrier.arrive_and_wait();  // every lane has read the exchange before anyone writes it again
    for (int r = 0; r < 4; ++r) d[r] = out[r];
}
// ==== end of the warp-level matrix operations ====================================================

// ---- launcher ---------------------------------------------------------------------------------
// Runs kernel<<<grid, block, smem_bytes>>>(args...) synchronously. Arguments are converted to the
// kernel's parameter types (e.g. void* -> const float*), which lets generated wrappers pass untyped
// pointers. Throws std::runtime_error, before running anything, when CUDA would refuse the launch
// (deprune_emu::check_launch). The kernels never throw (an exception escaping a worker thread terminates
// the process, as a device trap would abort the context).
template <class... Params, class... Args>
void emu_launch(const deprune_emu::LaunchLimits& limits, void (*kernel)(Params...), dim3 grid, dim3 block,
                std::size_t smem_bytes, Args... args) {
    static_assert(sizeof...(Params) == sizeof...(Args), "emu_launch: argument count mismatch");
    deprune_emu::check_launch(reinterpret_cast<const void*>(kernel), grid, block, smem_bytes, limits);
    const unsigned long long nthreads = 1ull * block.x * block.y * block.z;

    std::lock_guard<std::mutex> lock(deprune_emu::g_launch_mutex);
    // Exactly the requested bytes (16-byte aligned, like CUDA's dynamic shared memory): ASan builds report
    // any access past the end.
    std::unique_ptr<unsigned char[]> smem(new unsigned char[smem_bytes == 0 ? 0 : smem_bytes]);
    deprune_emu::poison_shared(smem.get(), smem_bytes);  // before block 0; the barrier redoes it between blocks
    std::barrier<> sync_barrier(static_cast<std::ptrdiff_t>(nthreads));
    std::barrier<deprune_emu::PoisonShared> block_barrier(static_cast<std::ptrdiff_t>(nthreads),
                                                          deprune_emu::PoisonShared{smem.get(), smem_bytes});
    deprune_emu::g_sync_barrier = &sync_barrier;
    deprune_emu::WarpScope warp_scope(nthreads);  // per-warp barriers and fragment exchange (mma.sync)
    deprune_emu::g_dynamic_smem = smem.get();
    blockDim = block;
    gridDim = grid;

    auto worker = [&](unsigned int tx, unsigned int ty, unsigned int tz) {
        threadIdx = uint3{tx, ty, tz};
        for (unsigned int bz = 0; bz < grid.z; ++bz)
            for (unsigned int by = 0; by < grid.y; ++by)
                for (unsigned int bx = 0; bx < grid.x; ++bx) {
                    blockIdx = uint3{bx, by, bz};
                    kernel(static_cast<Params>(args)...);
                    // Block boundary: nobody starts the next block before every thread has finished this
                    // one; the completion step poisons shared memory for the next block.
                    block_barrier.arrive_and_wait();
                }
    };

    std::vector<std::thread> threads;
    threads.reserve(static_cast<std::size_t>(nthreads));
    for (unsigned int tz = 0; tz < block.z; ++tz)
        for (unsigned int ty = 0; ty < block.y; ++ty)
            for (unsigned int tx = 0; tx < block.x; ++tx) threads.emplace_back(worker, tx, ty, tz);
    for (auto& t : threads) t.join();

    deprune_emu::g_sync_barrier = nullptr;
    deprune_emu::g_dynamic_smem = nullptr;
}

// Default limits: 48 KB without opt-in, static shared memory measured from this translation unit's section.
template <class... Params, class... Args>
void emu_launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem_bytes, Args... args) {
    deprune_emu::LaunchLimits limits;
    limits.static_smem = deprune_emu::static_smem_span();
    emu_launch(limits, kernel, grid, block, smem_bytes, args...);
}
