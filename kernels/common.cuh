// common.cuh — shared definitions of the kernels (no CUDA headers needed: NVRTC compiles these without
// an include path).
//
// Inputs arrive as the raw bytes of each layer in its stored dtype; the host packs the layers of a
// batch side by side in one device buffer and passes a table of `LayerDesc`, one per layer of the
// launch (layers of different widths and dtypes share one launch; grid.y walks the table).
#pragma once

#define DT_F32 0
#define DT_F64 1
#define DT_F16 2
#define DT_BF16 3

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;

// Gemma 2's soft-capping of an attention score or a logit, cap · tanh(s / cap) (cap 0: none), and its
// slope 1 − tanh², the factor on its gradient. The SIMT attention kernels and the logits' soft-cap
// (runtime_elementwise.cu) use tanhf (FAST = false); the tensor-core attention (bf16 operands,
// FAST = true) uses 1 − 2 / (e^{2x} + 1) with the fast exp and divide (±1 at the ends, a few 1e-7
// absolute), which needs far fewer registers inside its unrolled tiles, where tanhf made the sm_80
// forward spill.
template <bool FAST>
__device__ __forceinline__ float tanh_cap_slope(float s, float cap, float* slope) {
    if (cap == 0.0f) {
        *slope = 1.0f;
        return s;
    }
    const float th =
        FAST ? 1.0f - __fdividef(2.0f, __expf(__fdividef(2.0f * s, cap)) + 1.0f) : tanhf(s / cap);
    *slope = 1.0f - th * th;
    return cap * th;
}
template <bool FAST>
__device__ __forceinline__ float tanh_cap(float s, float cap) {
    float slope;
    return tanh_cap_slope<FAST>(s, cap, &slope);
}

// ALiBi (BLOOM, MPT, Falcon-RW): the attention adds slope_h · (j − i) to the scaled score of query i and
// key j (relative, so the bias is 0 on the diagonal; BLOOM's slope_h · j differs by a constant per row,
// which the softmax ignores). slope_h is BLOOM's and MPT's geometric sequence for `heads` heads: with p
// the largest power of two ≤ heads, 2^(−max_bias (h + 1) / p) for h < p, then the odd terms of the
// sequence for 2p heads, 2^(−max_bias (2 (h − p) + 1) / (2p)); times `factor` (Falcon adds the bias
// before scaling the scores, so its factor is the scale). factor 0: no ALiBi. The CPU twin is
// `Alibi::slope` (src/runtime/ops/cpu.rs).
__device__ __forceinline__ float alibi_slope(int h, int heads, float max_bias, float factor) {
    if (factor == 0.0f) return 0.0f;
    int p = 1;
    while (p * 2 <= heads) p *= 2;
    const float e = h < p ? max_bias * (float)(h + 1) / (float)p
                          : max_bias * (float)(2 * (h - p) + 1) / (float)(2 * p);
    return factor * exp2f(-e);
}

// One layer of a launch: the 3 little-endian u64 words per layer (24 bytes) that `layer_tables` in
// src/similarity/cuda/mod.rs writes, the third being `cols | dtype << 32`.
struct LayerDesc {
    u64 in_off;   // byte offset of the layer's rows (n × cols, row-major) in the input buffer
    u64 out_off;  // element offset of the layer's output (an n × n Gram, or a packed G row)
    int cols;     // features per sample
    int dtype;    // DT_*
};

// The PTX wrappers below (here and in mma.cuh) have host twins in tests/gpu_emulator/cuda_host.h, which
// compiles these sources with g++ to run them on the CPU (SGLP_HOST_EMULATION).
#ifndef SGLP_HOST_EMULATION
// f16 → f32 without cuda_fp16.h.
__device__ __forceinline__ float f16_bits_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// f32 → f16 bits, round to nearest even, without cuda_fp16.h.
__device__ __forceinline__ u16 f32_to_f16_bits(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// f32 → bf16 bits, round to nearest even (sm_80+), without cuda_bf16.h.
__device__ __forceinline__ u16 f32_to_bf16_bits(float f) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif

// bf16 → f32: the bf16 bits are the high half of the f32 bits.
__device__ __forceinline__ float bf16_bits_to_f32(u16 h) {
    return __uint_as_float(((u32)h) << 16);
}

// Element `idx` of a layer stored as `dtype`, converted to f32 in registers.
__device__ __forceinline__ float load_as_f32(const unsigned char* base, int dtype, u64 idx) {
    switch (dtype) {
        case DT_F32: return ((const float*)base)[idx];
        case DT_F64: return (float)((const double*)base)[idx];
        case DT_F16: return f16_bits_to_f32(((const u16*)base)[idx]);
        default: return bf16_bits_to_f32(((const u16*)base)[idx]);
    }
}

// `name`: the block's dynamic shared memory (the launch's shared_mem_bytes), as bytes. The emulator
// gives each launch one such window (tests/gpu_emulator).
#ifdef SGLP_HOST_EMULATION
#define DYNAMIC_SHARED(name) unsigned char* name = emu::dynamic_shared()
#else
#define DYNAMIC_SHARED(name) extern __shared__ __align__(1024) unsigned char name[]
#endif

// Lower-triangular tile enumeration: tile t ↦ (bi, bj) with bj ≤ bi, row-major over the triangle.
__device__ __forceinline__ void tri_tile(int t, int* bi, int* bj) {
    int i = (int)((sqrtf(8.0f * (float)t + 1.0f) - 1.0f) * 0.5f);
    // Correct float rounding at triangle boundaries.
    while (i * (i + 1) / 2 > t) --i;
    while ((i + 1) * (i + 2) / 2 <= t) ++i;
    *bi = i;
    *bj = t - i * (i + 1) / 2;
}

// Warp sum of a double.
__device__ __forceinline__ double warp_sum_f64(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Block sum of a double (blockDim.x a multiple of 32, ≤ 1024); every thread gets the total. Rows reduced
// in f64 as the CPU twins do (RMSNorm, cross-entropy).
__device__ double block_sum_f64(double v) {
    __shared__ double part[32];
    __shared__ double total;
    v = warp_sum_f64(v);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // part/total may still be read by a previous call
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) t += part[w];
        total = t;
    }
    __syncthreads();
    return total;
}
