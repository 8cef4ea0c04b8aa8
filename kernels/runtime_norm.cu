// runtime_norm.cu — the decoders' norms per row of d values and their backward. RMSNorm (HF LlamaRMSNorm,
// centre 0): y = g ⊙ x / sqrt(mean(x²) + eps); LayerNorm (PyTorch's layer_norm, centre 1):
// y = g ⊙ (x − μ) / sqrt(mean((x − μ)²) + eps) + b (b may be null). Gain g = offset + w (offset 1:
// GemmaRMSNorm's 1 + w, summed in f32 as transformers does). Per-row reductions in f64 (as the CPU). The
// weight gradient is reduced deterministically, no atomics: norm_backward writes each row's μ and 1/σ,
// norm_backward_weight sums dy ⊙ (x − μ) / σ over a chunk of rows per (column, chunk) into f64 partials,
// and norm_reduce_weight adds the chunks in order into dw. (The bias gradient is the column sums of dy:
// runtime_linear.cu's linear_backward_bias.) One block of 256 threads per row for the row kernels.
// The weight and bias hold `groups` rows of d and row r takes row r mod groups (1: one shared row; the
// heads: Cohere's per-head q/k norms); the weight kernels then see x and dy as wide rows of groups·d.

#include "common.cuh"

// Row r's μ (0 for RMSNorm) and 1/σ; every thread of the block gets them.
__device__ __forceinline__ void norm_row_stats(const float* __restrict__ xr, int d, double eps, int centre,
                                               double* mean, double* inv) {
    double m = 0.0;
    if (centre) {
        double s = 0.0;
        for (int j = threadIdx.x; j < d; j += blockDim.x) s += (double)xr[j];
        m = block_sum_f64(s) / d;
    }
    double ss = 0.0;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        double v = (double)xr[j] - m;
        ss += v * v;
    }
    ss = block_sum_f64(ss);
    *mean = m;
    *inv = 1.0 / sqrt(ss / d + eps);
}

extern "C" __global__ void norm_forward(const float* __restrict__ x, const float* __restrict__ w,
                                        const float* __restrict__ b, float offset, int d, int groups,
                                        double eps, int centre, float* __restrict__ y, int rows) {
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (u64)r * d;
    u64 at = (u64)(r % groups) * d;
    double mean, inv;
    norm_row_stats(xr, d, eps, centre, &mean, &inv);
    float* yr = y + (u64)r * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x)
        yr[j] = (float)(((double)xr[j] - mean) * inv) * (offset + (w ? w[at + j] : 0.0f)) +
                (b ? b[at + j] : 0.0f);
}

// With x̃ = x − μ: dx += inv (g⊙dy) − x̃ inv³/d Σ(g⊙dy⊙x̃) (LayerNorm: − inv/d Σ(g⊙dy) too);
// mean_out[r], inv_out[r] = μ and 1/σ of row r (read by the weight kernel).
extern "C" __global__ void norm_backward(const float* __restrict__ x, const float* __restrict__ w,
                                         float offset, const float* __restrict__ dy, int d, int groups,
                                         double eps, int centre, float* __restrict__ dx,
                                         double* __restrict__ mean_out, double* __restrict__ inv_out,
                                         int rows) {
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (u64)r * d;
    const float* wr = w ? w + (u64)(r % groups) * d : nullptr;
    const float* gr = dy + (u64)r * d;
    double mean, inv;
    norm_row_stats(xr, d, eps, centre, &mean, &inv);
    double dot = 0.0, sum = 0.0;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        double gdy = (double)(offset + (wr ? wr[j] : 0.0f)) * (double)gr[j];
        dot += gdy * ((double)xr[j] - mean);
        sum += gdy;
    }
    dot = block_sum_f64(dot);
    sum = centre ? block_sum_f64(sum) : 0.0;
    double c = inv * inv * inv * dot / d;
    double shift = inv * sum / d;
    float* dxr = dx + (u64)r * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x)
        dxr[j] += (float)(inv * (double)(offset + (wr ? wr[j] : 0.0f)) * (double)gr[j] - ((double)xr[j] - mean) * c
                          - shift);
    if (threadIdx.x == 0) {
        mean_out[r] = mean;
        inv_out[r] = inv;
    }
}

// partials[chunk, j] = Σ_{wide rows R of chunk} dy[R, j] (x[R, j] − mean[r]) inv[r] over the weight's
// wd = groups·d values j, wide rows of wd (R of `wide` in all), r = R·groups + j / d the row of d that
// value j of wide row R sits in; grid (ceil(wd / blockDim.x), chunks).
extern "C" __global__ void norm_backward_weight(const float* __restrict__ x, const float* __restrict__ dy,
                                                const double* __restrict__ mean, const double* __restrict__ inv,
                                                int d, int groups, int wide, int rows_per_chunk,
                                                double* __restrict__ partials) {
    int wd = groups * d;
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= wd) return;
    int r0 = blockIdx.y * rows_per_chunk;
    int r1 = min(wide, r0 + rows_per_chunk);
    double s = 0.0;
    for (int R = r0; R < r1; ++R) {
        u64 r = (u64)R * groups + j / d;
        s += (double)dy[(u64)R * wd + j] * ((double)x[(u64)R * wd + j] - mean[r]) * inv[r];
    }
    partials[(u64)blockIdx.y * wd + j] = s;
}

// dw[j] += Σ_chunks partials[chunk, j], chunks in order.
extern "C" __global__ void norm_reduce_weight(const double* __restrict__ partials, int d, int chunks,
                                              float* __restrict__ dw) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    double s = 0.0;
    for (int c = 0; c < chunks; ++c) s += partials[(u64)c * d + j];
    dw[j] += (float)s;
}
