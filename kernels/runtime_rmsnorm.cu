// runtime_rmsnorm.cu — RMSNorm (HF LlamaRMSNorm): y = g ⊙ x / sqrt(mean(x²) + eps) per row of d, gain
// g = offset + w (offset 1: GemmaRMSNorm's 1 + w, summed in f32 as transformers does), and its backward. Per-row reductions in f64 (as the CPU). The weight gradient is reduced deterministically, no
// atomics: rmsnorm_backward writes each row's 1/rms into `inv`, rmsnorm_backward_weight sums
// dy ⊙ x · inv over a chunk of rows per (column, chunk) into f64 partials, and rmsnorm_reduce_weight adds
// the chunks in order into dw. One block of 256 threads per row for the row kernels.

#include "common.cuh"

extern "C" __global__ void rmsnorm_forward(const float* __restrict__ x, const float* __restrict__ w,
                                           float offset, int d, double eps, float* __restrict__ y,
                                           int rows) {
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (u64)r * d;
    double ss = 0.0;
    for (int j = threadIdx.x; j < d; j += blockDim.x) ss += (double)xr[j] * (double)xr[j];
    ss = block_sum_f64(ss);
    double inv = 1.0 / sqrt(ss / d + eps);
    float* yr = y + (u64)r * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) yr[j] = (float)((double)xr[j] * inv) * (offset + w[j]);
}

// dx += inv (g⊙dy) − x inv³/d Σ(g⊙dy⊙x); inv[r] = 1/rms of row r (read by the weight kernel).
extern "C" __global__ void rmsnorm_backward(const float* __restrict__ x, const float* __restrict__ w,
                                            float offset, const float* __restrict__ dy, int d, double eps,
                                            float* __restrict__ dx, double* __restrict__ inv_out, int rows) {
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (u64)r * d;
    const float* gr = dy + (u64)r * d;
    double ss = 0.0, dot = 0.0;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        double xv = (double)xr[j];
        ss += xv * xv;
        dot += (double)(offset + w[j]) * (double)gr[j] * xv;
    }
    ss = block_sum_f64(ss);
    dot = block_sum_f64(dot);
    double inv = 1.0 / sqrt(ss / d + eps);
    double c = inv * inv * inv * dot / d;
    float* dxr = dx + (u64)r * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x)
        dxr[j] += (float)(inv * (double)(offset + w[j]) * (double)gr[j] - (double)xr[j] * c);
    if (threadIdx.x == 0) inv_out[r] = inv;
}

// partials[chunk, j] = Σ_{rows of chunk} dy[r, j] x[r, j] inv[r]; grid (ceil(d / blockDim.x), chunks).
extern "C" __global__ void rmsnorm_backward_weight(const float* __restrict__ x, const float* __restrict__ dy,
                                                   const double* __restrict__ inv, int d, int rows,
                                                   int rows_per_chunk, double* __restrict__ partials) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    int r0 = blockIdx.y * rows_per_chunk;
    int r1 = min(rows, r0 + rows_per_chunk);
    double s = 0.0;
    for (int r = r0; r < r1; ++r) s += (double)dy[(u64)r * d + j] * (double)x[(u64)r * d + j] * inv[r];
    partials[(u64)blockIdx.y * d + j] = s;
}

// dw[j] += Σ_chunks partials[chunk, j], chunks in order.
extern "C" __global__ void rmsnorm_reduce_weight(const double* __restrict__ partials, int d, int chunks,
                                                 float* __restrict__ dw) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    double s = 0.0;
    for (int c = 0; c < chunks; ++c) s += partials[(u64)c * d + j];
    dw[j] += (float)s;
}
