// deprune_vec16.cuh: 16-byte vectors of storage elements (8 fp16 / bf16 or 4 fp32 channels) and their
// conversion to and from fp32 through the raw bits, shared by the channels_last kernels (one uint4: LDG.E.128 /
// STG.E.128 / LDS.128 / STS.128 on the GPU, a plain aligned struct in the host emulation).
// Included after deprune_common.cuh.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
typedef uint4 vec16;  // LDG.E.128 / STG.E.128 / LDS.128 / STS.128
__device__ __forceinline__ float bits_to_f32(unsigned int u) { return __uint_as_float(u); }
__device__ __forceinline__ unsigned int f32_to_bits(float f) { return __float_as_uint(f); }
__device__ __forceinline__ float half_bits_to_f32(unsigned short b) { return __half2float(__ushort_as_half(b)); }
__device__ __forceinline__ unsigned short f32_to_half_bits(float f) { return __half_as_ushort(__float2half(f)); }
__device__ __forceinline__ unsigned short f32_to_bf16_bits(float f) {
    return __bfloat16_as_ushort(__float2bfloat16(f));
}
#else
struct alignas(16) vec16 {
    unsigned int x, y, z, w;
};
inline float bits_to_f32(unsigned int u) { return deprune_emu_bits_to_float(u); }
inline unsigned int f32_to_bits(float f) { return deprune_emu_float_to_bits(f); }
inline float half_bits_to_f32(unsigned short b) { return __half2float(__half{b}); }
inline unsigned short f32_to_half_bits(float f) { return __float2half(f).x; }
inline unsigned short f32_to_bf16_bits(float f) { return __float2bfloat16(f).x; }
#endif

// Zero of a storage type (staging fills padding and channel tails with it).
template <class T> __device__ __forceinline__ T zero();
template <> __device__ __forceinline__ float zero<float>() { return 0.0f; }
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
template <> __device__ __forceinline__ __half zero<__half>() { return __ushort_as_half(0); }
template <> __device__ __forceinline__ __nv_bfloat16 zero<__nv_bfloat16>() { return __ushort_as_bfloat16(0); }
#else
template <> inline __half zero<__half>() { return __half{0}; }
template <> inline __nv_bfloat16 zero<__nv_bfloat16>() { return __nv_bfloat16{0}; }
#endif

// Storage element <-> fp32 through its bits, per storage type.
template <class T> struct Codec;
template <> struct Codec<float> {
    static __device__ __forceinline__ float to_f32(unsigned int b) { return bits_to_f32(b); }
    static __device__ __forceinline__ unsigned int from_f32(float f) { return f32_to_bits(f); }
};
template <> struct Codec<__half> {
    static __device__ __forceinline__ float to_f32(unsigned int b) {
        return half_bits_to_f32(static_cast<unsigned short>(b));
    }
    static __device__ __forceinline__ unsigned int from_f32(float f) { return f32_to_half_bits(f); }
};
template <> struct Codec<__nv_bfloat16> {
    static __device__ __forceinline__ float to_f32(unsigned int b) { return bits_to_f32(b << 16); }  // exact
    static __device__ __forceinline__ unsigned int from_f32(float f) { return f32_to_bf16_bits(f); }
};

// VEC (= 16 / sizeof(scalar_t)) storage elements of one 16-byte vector -> fp32, in channel order.
template <class T>
__device__ __forceinline__ void unpack(const vec16& v, float* f) {
    const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        if constexpr (sizeof(T) == 2) {
            f[2 * k] = Codec<T>::to_f32(w[k] & 0xFFFFu);  // little endian: lower channel in the low half
            f[2 * k + 1] = Codec<T>::to_f32(w[k] >> 16);
        } else {
            f[k] = bits_to_f32(w[k]);
        }
    }
}
template <class T>
__device__ __forceinline__ vec16 pack(const float* f) {
    unsigned int w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        if constexpr (sizeof(T) == 2)
            w[k] = Codec<T>::from_f32(f[2 * k]) | (Codec<T>::from_f32(f[2 * k + 1]) << 16);
        else
            w[k] = f32_to_bits(f[k]);
    }
    vec16 v;
    v.x = w[0];
    v.y = w[1];
    v.z = w[2];
    v.w = w[3];
    return v;
}
