// centre_columns.cu — subtract each batch's column means from the uploaded activations, in place, before
// the Grams (the first step of every chunk).
//
// Why: LLM residual streams have per-feature means of ~10² and a few "massive" features of 10³–10⁴. A Gram
// of the raw values in f32 (or of bf16 products accumulated in f32) is dominated by n·μᵀμ-sized terms that
// the centring later subtracts, taking most of the digits with them (the same for the RBF distances
// d² = K_ii + K_jj − 2K_ij). HSIC₀, HSIC₁ and the RBF distances are unchanged by subtracting a per-batch
// column mean (centring removes exactly the terms a shift adds), so the Gram kernels work on X − 1μᵀ.
//
// μ is summed in f64. f32 layers store (float)(x − μ) (one rounding), f64 layers x − μ. A 16-bit layer is
// centred by μ rounded to its own dtype (centre_of: exact differences near the mean) and
// rewritten as f16 scaled by a per-layer power of two, 2^e, chosen from the layer's largest column range
// so that every value fits f16 (max |x − μ| ≤ 2^14): f16's 11-bit significand keeps the centred values to
// ~2.4e-4 relative each at worst (bf16 would keep 8 bits; re-rounding in bf16 gave CKA errors up to 7e-6
// on the large-mean family, see src/similarity/cuda/emulate_kernels.py), and the power of two is exact.
// With the centre on the bf16 grid, the values near the mean lose nothing: on the large-mean family
// (tests/cuda_backend.rs, emulated) |ΔCKA| fell from up to 7.6e-6 to 2.6e-8 against the f64 reference.
// gram_mma then reads the layer as f16 (`as_f16`), and centre_pack multiplies the linear Gram by 2^(−2e)
// (the RBF kernel matrix is invariant to the scale: its distances and their median scale together).
//
// Layout: `layers` is the chunk's LayerDesc table (the same as the Gram launches'); a layer's position in
// the chunk is out_off / (n·n) (its Gram slot), which indexes `col_scale` (2 words per layer: the largest
// column range's f32 bits, then e as an int). The host zeroes `col_scale` before each chunk.
//
// column_centre   grid (⌈max cols/256⌉, layers), 256 threads, one column per thread: μ in f64, then
//                 f32/f64 layers rewritten in place; 16-bit layers only report their range (atomicMax on
//                 the bits of a non-negative float orders as the float does). Reads n·d, writes n·d.
// column_to_f16   grid (⌈max cols/256⌉, 16-bit layers), 256 threads: μ again (f64), then each value as
//                 f16((x − μ)·2^e) in place (same 2 bytes per value). Reads 2·n·d, writes n·d.
// Non-finite values: column_centre also records, per layer (layer0 + its slot in the chunk = its index in the
// batch), the first sample holding a NaN or Inf, as ~(first_sample + row) in `nonfinite` (atomicMax; 0 =
// none), so that activations read from device memory are checked too, without a host pass.
// Coalescing: a warp's 32 threads read 32 adjacent columns of one row at a time.
#include "common.cuh"

__device__ __forceinline__ int gram_slot(const LayerDesc& L, int n) {
    return (int)(L.out_off / ((u64)n * (u64)n));
}

__device__ double column_mean(const unsigned char* x, int dtype, int n, int d, int c) {
    double s = 0.0;
    if (dtype == DT_F64) {
        const double* v = (const double*)x;
        for (int i = 0; i < n; ++i) s += v[(u64)i * d + c];
    } else {
        for (int i = 0; i < n; ++i) s += (double)load_as_f32(x, dtype, (u64)i * d + c);
    }
    return s / (double)n;
}

// What a column's values are centred by: its mean μ, or for a 16-bit layer μ rounded to the layer's own
// dtype. Any per-column constant leaves HSIC and the RBF distances unchanged; one on the values' grid
// makes x − μ exact for every x in μ's binade (both are multiples of its ulp), so for the usual LLM
// column (a large mean, a small spread around it) the f16 rewrite below is exact too, where x minus the
// exact mean would round in f16 (~2.4e-4 relative a value).
__device__ double centre_of(double mu, int dtype) {
    if (!isfinite(mu)) return mu;
    const float f = (float)mu;
    if (dtype == DT_BF16) return (double)bf16_bits_to_f32(f32_to_bf16_bits(f));
    if (dtype == DT_F16) return (double)f16_bits_to_f32(f32_to_f16_bits(f));
    return mu;
}

extern "C" __global__ void __launch_bounds__(256)
column_centre(unsigned char* __restrict__ in, const LayerDesc* __restrict__ layers, int n,
              u32* __restrict__ col_scale, u64* __restrict__ nonfinite, u64 first_sample, int layer0) {
    const LayerDesc L = layers[blockIdx.y];
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= L.cols) return;
    unsigned char* x = in + L.in_off;
    const int d = L.cols;
    const double mu = centre_of(column_mean(x, L.dtype, n, d, c), L.dtype);
    int bad = n;  // the first row of this column holding a NaN or Inf
    if (L.dtype == DT_F32) {
        float* v = (float*)x;
        for (int i = 0; i < n; ++i) {
            const float raw = v[(u64)i * d + c];
            if (!isfinite(raw)) bad = min(bad, i);
            v[(u64)i * d + c] = (float)((double)raw - mu);
        }
    } else if (L.dtype == DT_F64) {
        double* v = (double*)x;
        for (int i = 0; i < n; ++i) {
            if (!isfinite(v[(u64)i * d + c])) bad = min(bad, i);
            v[(u64)i * d + c] -= mu;
        }
    } else {
        float lo = 0.0f, hi = 0.0f;
        for (int i = 0; i < n; ++i) {
            const float raw = load_as_f32(x, L.dtype, (u64)i * d + c);
            if (!isfinite(raw)) bad = min(bad, i);
            const float v = (float)((double)raw - mu);
            lo = fminf(lo, v);
            hi = fmaxf(hi, v);
        }
        // max |x − μ| (≥ 0: lo ≤ 0 ≤ hi). A NaN value is skipped by fminf/fmaxf here and reaches the
        // Gram (and the accumulator's finiteness check) as NaN after the conversion.
        atomicMax(&col_scale[2 * gram_slot(L, n)], __float_as_uint(fmaxf(hi, -lo)));
    }
    // The first bad sample of the layer, as ~sample so that zero means none and atomicMax keeps the
    // earliest (the host names the layer and the sample).
    if (bad < n)
        atomicMax((unsigned long long*)&nonfinite[layer0 + gram_slot(L, n)],
                  ~(unsigned long long)(first_sample + (u64)bad));
}

// e with max |x − μ|·2^e ≤ 2^14: range = m·2^k, m ∈ [0.5, 1) ⇒ range < 2^k ⇒ e = 14 − k. Clamped so that
// 2^±2e stays a normal f32 (a zero range gives e = 14; its values are zeros anyway).
__device__ __forceinline__ int centre_scale_exp(u32 range_bits) {
    const float range = __uint_as_float(range_bits);
    if (!(range > 0.0f) || range > 3.0e38f) return 0;
    int k;
    frexpf(range, &k);
    return max(-60, min(60, 14 - k));
}

extern "C" __global__ void __launch_bounds__(256)
column_to_f16(unsigned char* __restrict__ in, const LayerDesc* __restrict__ layers, int n,
              u32* __restrict__ col_scale) {
    const LayerDesc L = layers[blockIdx.y];
    const int slot = gram_slot(L, n);
    const int e = centre_scale_exp(col_scale[2 * slot]);
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c == 0) col_scale[2 * slot + 1] = (u32)e;
    if (c >= L.cols) return;
    unsigned char* x = in + L.in_off;
    const int d = L.cols;
    const double mu = centre_of(column_mean(x, L.dtype, n, d, c), L.dtype);
    u16* v = (u16*)x;
    for (int i = 0; i < n; ++i) {
        const u64 idx = (u64)i * d + c;
        const double centred = (double)load_as_f32(x, L.dtype, idx) - mu;
        v[idx] = f32_to_f16_bits((float)ldexp(centred, e));
    }
}
